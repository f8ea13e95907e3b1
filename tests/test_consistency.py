"""No stale sets and no revived values, on real redis-server processes.

Each test drives a race with events, not sleeps: the origin blocks until the
test lets it return, so a fill is in flight exactly while the invalidation (or
the other leader) happens. Two :class:`~memofill.Memofill` instances stand for
two processes; each reads the marks itself.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from memofill import CacheFill, Dataset, Memofill
from memofill.codec import read_header
from tests.support.redis_servers import RedisServer

PATIENCE_S = 10.0
QUOTE = "quote:{symbol}"
POLICIES = {
    QUOTE: Dataset(
        QUOTE,
        ttl_s=300,
        cache_fill=CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=5, poll_max_ms=50),
    ),
    "plain:{symbol}": Dataset("plain:{symbol}", ttl_s=300),
}


@pytest.fixture
def prefix() -> str:
    return f"c{uuid.uuid4().hex[:8]}:"


class Origin:
    """An upstream whose value changes on every call; a call may be held until let go."""

    def __init__(self) -> None:
        self.versions = itertools.count(1)
        self.entered = threading.Event()
        self.go = threading.Event()
        self.go.set()

    def hold(self) -> None:
        self.entered.clear()
        self.go.clear()

    def __call__(self, symbol: str) -> dict[str, Any]:
        version = next(self.versions)
        self.entered.set()
        assert self.go.wait(PATIENCE_S)
        return {"symbol": symbol, "version": version}


def instance(server: RedisServer, prefix: str, **policies: Any) -> Memofill:
    return Memofill(server.client(), prefix=prefix, policies=POLICIES | policies, meta_check_ms=50)


@pytest.fixture
def origin() -> Iterator[Origin]:
    origin = Origin()
    yield origin
    origin.go.set()


def in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(result=call()))
    thread.start()
    return thread, out


@pytest.mark.parametrize("dataset", [QUOTE, "plain:{symbol}"])
def test_a_fill_in_flight_never_undoes_an_invalidate(
    redis_server: RedisServer, prefix: str, origin: Origin, dataset: str
) -> None:
    """The fetch began before ``invalidate()``; its write lands after it and is refused."""
    cache = instance(redis_server, prefix)
    fetch = cache.cached_dataset(dataset)(origin)
    origin.hold()
    thread, out = in_thread(lambda: fetch.call_with_outcome("ACME"))
    assert origin.entered.wait(PATIENCE_S)
    fetch.invalidate("ACME")
    origin.go.set()
    thread.join(PATIENCE_S)
    first = out["result"]
    assert first.value == {"symbol": "ACME", "version": 1}  # its caller gets what it fetched
    expected = "fill_refused" if dataset == QUOTE else "legacy"
    assert first.outcome == expected
    other = instance(redis_server, prefix).cached_dataset(dataset)(origin)
    second = other.call_with_outcome("ACME")  # another process, after the invalidation
    assert second.value == {"symbol": "ACME", "version": 2}
    assert fetch("ACME") == {"symbol": "ACME", "version": 2}


def test_a_leader_whose_lease_ran_out_never_writes_over_the_newer_value(
    redis_server: RedisServer, prefix: str, origin: Origin
) -> None:
    short = Dataset(
        QUOTE,
        ttl_s=300,
        cache_fill=CacheFill(lease_ms=200, wait_ms=100, poll_min_ms=5, poll_max_ms=20),
    )
    late, prompt = (instance(redis_server, prefix, **{QUOTE: short}) for _ in range(2))
    slow = late.cached_dataset(QUOTE)(origin)
    origin.hold()
    thread, out = in_thread(lambda: slow.call_with_outcome("ACME"))
    assert origin.entered.wait(PATIENCE_S)
    redis_server.client().delete(late.lock_key(QUOTE, symbol="ACME"))  # the lease ran out

    def fast(symbol: str) -> dict[str, Any]:
        return {"symbol": symbol, "version": 100}

    assert prompt.cached_dataset(QUOTE)(fast)("ACME") == {"symbol": "ACME", "version": 100}
    origin.go.set()
    thread.join(PATIENCE_S)
    assert (out["result"].outcome, out["result"].value["version"]) == ("fill_refused", 1)
    assert slow("ACME") == {"symbol": "ACME", "version": 100}  # never back to the older one


def test_deleting_the_marks_never_revives_an_invalidated_value(
    redis_server: RedisServer, prefix: str, origin: Origin
) -> None:
    cache = instance(redis_server, prefix)
    assert cache.cached_dataset(QUOTE)(origin)("ACME")["version"] == 1
    cache.invalidate_dataset(QUOTE)
    redis_server.client().delete(f"{prefix}#meta")  # an eviction, a DEL, a restart
    fresh = instance(redis_server, prefix).cached_dataset(QUOTE)(origin)
    result = fresh.call_with_outcome("ACME")  # a process that never heard of the mark
    assert (result.outcome, result.value["version"]) == ("leader_fill", 2)


def test_a_restart_costs_refills_and_never_serves_what_it_may_have_lost(
    own_redis_server: RedisServer, prefix: str, origin: Origin
) -> None:
    """A restart from disk may lose the last invalidations: values from before it are refilled."""
    cache = instance(own_redis_server, prefix)
    assert cache.cached_dataset(QUOTE)(origin)("ACME")["version"] == 1
    own_redis_server.client().save()  # the value survives the restart on disk
    own_redis_server.restart()
    assert own_redis_server.client().exists(f"{prefix}quote:ACME")
    fresh = instance(own_redis_server, prefix).cached_dataset(QUOTE)(origin)
    assert fresh.call_with_outcome("ACME").value["version"] == 2


def test_a_refresh_from_a_fresh_process_writes_what_others_serve(
    redis_server: RedisServer, prefix: str, origin: Origin
) -> None:
    admin = instance(redis_server, prefix)
    admin.invalidate_dataset(QUOTE)
    warmer = instance(redis_server, prefix).cached_dataset(QUOTE)(origin)
    assert warmer.refresh("ACME")["version"] == 1  # its first action on the dataset
    reader = instance(redis_server, prefix).cached_dataset(QUOTE)(origin)
    result = reader.call_with_outcome("ACME")
    assert (result.outcome, result.value["version"]) == ("hit", 1)
    raw = redis_server.client().get(f"{prefix}quote:ACME")
    header = read_header(raw) if isinstance(raw, bytes) else None
    assert header is not None
    assert header.stamp > int(redis_server.client().hget(f"{prefix}#meta", f"hard:{QUOTE}") or 0)


def test_a_call_after_invalidate_joins_no_fill_in_flight_in_its_process(
    redis_server: RedisServer, prefix: str, origin: Origin
) -> None:
    cache = instance(redis_server, prefix)
    fetch = cache.cached_dataset(QUOTE)(origin)
    origin.hold()
    first, first_out = in_thread(lambda: fetch("ACME"))
    assert origin.entered.wait(PATIENCE_S)
    fetch.invalidate("ACME")
    origin.entered.clear()
    second, second_out = in_thread(lambda: fetch("ACME"))
    origin.go.set()
    first.join(PATIENCE_S)
    second.join(PATIENCE_S)
    assert first_out["result"]["version"] == 1
    assert second_out["result"]["version"] == 2  # started after the invalidation
