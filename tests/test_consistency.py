"""No stale sets and no revived values, on real redis-server processes.

Each test drives a race with events, not sleeps: the origin blocks until the
test lets it return, so a fill is in flight exactly while the invalidation (or
the other leader) happens. Two :class:`~memofill.Memofill` instances stand for
two processes; each reads the marks itself.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from memofill import CacheFill, Dataset, Memofill, NearCache
from memofill.codec import read_header
from tests.support.helpers import HeldOrigin, closed_at_end
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


class Origin(HeldOrigin):
    """An upstream of quotes whose version counts up; a call may be held. Decorated itself:
    its one parameter is the key's field."""

    def __init__(self) -> None:
        super().__init__(lambda args, version: {"symbol": args[0], "version": version})

    def __call__(self, symbol: str) -> Any:  # type: ignore[override]
        return super().__call__(symbol)


def instance(server: RedisServer, prefix: str, **policies: Any) -> Memofill:
    client = server.client()
    closed_at_end(client)
    return Memofill(client, prefix=prefix, policies=POLICIES | policies, meta_check_ms=50)


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
    admin = redis_server.client()
    admin.delete(late.lock_key(QUOTE, symbol="ACME"))  # the lease ran out
    admin.close()

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
    admin = redis_server.client()
    admin.delete(f"{prefix}#meta")  # an eviction, a DEL, a restart
    admin.close()
    fresh = instance(redis_server, prefix).cached_dataset(QUOTE)(origin)
    result = fresh.call_with_outcome("ACME")  # a process that never heard of the mark
    assert (result.outcome, result.value["version"]) == ("leader_fill", 2)


def test_a_restart_costs_refills_and_never_serves_what_it_may_have_lost(
    own_redis_server: RedisServer, prefix: str, origin: Origin
) -> None:
    """A restart from disk may lose the last invalidations: values from before it are refilled."""
    cache = instance(own_redis_server, prefix)
    assert cache.cached_dataset(QUOTE)(origin)("ACME")["version"] == 1
    admin = own_redis_server.client()
    admin.save()  # the value survives the restart on disk
    admin.close()
    own_redis_server.restart()
    admin = own_redis_server.client()
    assert admin.exists(f"{prefix}quote:ACME")
    admin.close()
    fresh = instance(own_redis_server, prefix).cached_dataset(QUOTE)(origin)
    assert fresh.call_with_outcome("ACME").value["version"] == 2


@pytest.mark.parametrize("kind", ["call", "refresh"])
def test_a_caller_that_joins_a_fill_across_a_restart_gets_no_older_value(
    own_redis_server: RedisServer, prefix: str, origin: Origin, kind: str
) -> None:
    """A restart without persistence loses the key's tomb, so the fill's late write lands.

    The fill's lock went with it: its joiners read the marks again, find the
    meta hash born after the fill's stamp, and fill anew; the leader's caller,
    which began before the invalidation, gets what it fetched.
    """
    cache, other = instance(own_redis_server, prefix), instance(own_redis_server, prefix)
    fetch = cache.cached_dataset(QUOTE)(origin)
    run = fetch.refresh if kind == "refresh" else fetch
    origin.hold()
    leader, leader_out = in_thread(lambda: run("ACME"))
    assert origin.entered.wait(PATIENCE_S)
    other.cached_dataset(QUOTE)(origin).invalidate("ACME")
    joiner, joiner_out = in_thread(lambda: run("ACME"))
    wait_for_joiner(cache)
    own_redis_server.restart()  # nothing on disk: the tomb, the lock and the marks are gone
    origin.entered.clear()
    origin.go.set()
    leader.join(PATIENCE_S)
    joiner.join(PATIENCE_S)
    assert leader_out["result"]["version"] == 1
    assert joiner_out["result"]["version"] == 2


def test_a_fill_whose_lock_a_restart_lost_writes_nothing_an_invalidation_would_have_refused(
    own_redis_server: RedisServer, prefix: str, origin: Origin
) -> None:
    """The restart lost the tomb of an invalidation made while the fill fetched: its write,
    which the tomb would have refused, is refused for the lost lock, so no call after the
    invalidation is served it, not even in a process that has not read the marks since."""
    client = own_redis_server.client()
    closed_at_end(client)
    cache = Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=60_000)
    other = instance(own_redis_server, prefix)
    fetch = cache.cached_dataset(QUOTE)(origin)
    assert fetch("WARM")["version"] == 1  # the marks read: not again for a minute
    origin.hold()
    leader, leader_out = in_thread(lambda: fetch.call_with_outcome("ACME"))
    assert origin.entered.wait(PATIENCE_S)
    other.cached_dataset(QUOTE)(origin).invalidate("ACME")
    own_redis_server.restart()  # nothing on disk: the tomb and the lock are gone
    origin.go.set()
    leader.join(PATIENCE_S)
    led = leader_out["result"]
    # Its write is refused as restarted; a client that does not send a command again after a
    # lost connection (redis-py 6) may fail to send it at all. Either way nothing is stored.
    assert led.value["version"] == 2
    admin = own_redis_server.client()
    assert admin.get(fetch.redis_key("ACME")) is None
    admin.close()
    after = fetch.call_with_outcome("ACME")
    assert (after.outcome, after.value["version"]) == ("leader_fill", 3)


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
    admin = redis_server.client()
    raw = admin.get(f"{prefix}quote:ACME")
    header = read_header(raw) if isinstance(raw, bytes) else None
    assert header is not None
    assert header.stamp > int(admin.hget(f"{prefix}#meta", f"hard:{QUOTE}") or 0)
    admin.close()


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


@pytest.mark.parametrize("written_first", [False, True])
def test_a_caller_that_joins_after_another_process_invalidated_gets_no_older_value(
    redis_server: RedisServer, prefix: str, origin: Origin, written_first: bool
) -> None:
    """Joined in its own process, a call still never gets what another process invalidated.

    The invalidation lands while the fill fetches (its write is then refused) or
    after its write (the key is deleted before the joiners are served): either
    way the joiner fills anew, while the leader's caller, which began first, gets
    what it fetched.
    """
    cache, other = instance(redis_server, prefix), instance(redis_server, prefix)
    fetch = cache.cached_dataset(QUOTE)(origin)
    if written_first:
        landed = threading.Event()
        write = cache._sync.write  # type: ignore[union-attr]

        def write_then_wait(*args: Any) -> Any:
            reply = write(*args)
            landed.set()
            assert proceed.wait(PATIENCE_S)
            return reply

        proceed = threading.Event()
        cache._sync.write = write_then_wait  # type: ignore[union-attr]
    origin.hold()
    leader, leader_out = in_thread(lambda: fetch("ACME"))
    assert origin.entered.wait(PATIENCE_S)
    if written_first:
        origin.go.set()
        assert landed.wait(PATIENCE_S)
    other.cached_dataset(QUOTE)(origin).invalidate("ACME")
    joiner, joiner_out = in_thread(lambda: fetch.call_with_outcome("ACME"))
    wait_for_joiner(cache)
    origin.entered.clear()
    origin.go.set()
    if written_first:
        proceed.set()
    leader.join(PATIENCE_S)
    joiner.join(PATIENCE_S)
    assert leader_out["result"]["version"] == 1
    assert joiner_out["result"].value["version"] == 2


def wait_for_joiner(cache: Memofill) -> None:
    """Until a second caller waits on the fill in flight (the flight counts its joiners)."""
    flights = cache.thread_flights._flights
    deadline = time.monotonic() + PATIENCE_S
    while not any(flight.joiners for flight in list(flights.values())):
        assert time.monotonic() < deadline, "no caller joined the fill"
        time.sleep(0.001)


def test_no_read_in_flight_keeps_a_near_copy_across_its_own_processs_invalidation(
    redis_server: RedisServer, prefix: str
) -> None:
    """Readers keep reserving near copies while the process invalidates: none outlives it."""
    near = Dataset(QUOTE, ttl_s=300, near_ms=60_000, cache_fill=POLICIES[QUOTE].cache_fill)
    client = redis_server.client()
    closed_at_end(client)
    cache = Memofill(
        client,
        prefix=prefix,
        policies={QUOTE: near},
        near=NearCache(invalidation="ttl"),
        meta_check_ms=50,
    )
    versions = itertools.count(1)
    fetch = cache.cached_dataset(QUOTE)(lambda symbol: {"version": next(versions)})
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            fetch("ACME")

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for _ in range(300):
            before = fetch("ACME")["version"]
            fetch.invalidate("ACME")
            assert fetch("ACME")["version"] > before
    finally:
        stop.set()
        for reader in readers:
            reader.join(PATIENCE_S)


class FailingMarks:
    """``read_meta`` of one :class:`~memofill.commands.Commands`, timing out ``times`` times."""

    def __init__(self, commands: Any, times: int) -> None:
        self.read_meta, self.left = commands.read_meta, times
        commands.read_meta = self

    def __call__(self, *args: Any) -> Any:
        if self.left:
            self.left -= 1
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return self.read_meta(*args)


def invalidated_elsewhere(redis_server: RedisServer, prefix: str, cache: Memofill) -> None:
    """Another process invalidates the dataset; ``cache``'s marks fall due, unread."""
    instance(redis_server, prefix).invalidate_dataset(QUOTE)
    cache._state.generations.next_check = 0.0  # as after meta_check_ms


@pytest.mark.parametrize("kept", [True, False], ids=["outage-copy-kept", "nothing-kept"])
def test_a_value_is_never_judged_by_marks_that_could_not_be_read_again(
    redis_server: RedisServer, prefix: str, origin: Origin, kept: bool
) -> None:
    """A read of the marks that times out leaves them due: the call reads them once more
    after its ``GET``; failing again, it goes on as in an outage, never serving as a hit
    the value Redis returned (the history check's seed 598130 found one served so)."""
    client = redis_server.client()
    closed_at_end(client)
    cache = Memofill(
        client, prefix=prefix, policies=POLICIES, meta_check_ms=50,
        local_store_bytes=(32 << 20) if kept else 0,
    )  # fmt: skip
    fetch = cache.cached_dataset(QUOTE)(origin)
    assert fetch("ACME")["version"] == 1
    invalidated_elsewhere(redis_server, prefix, cache)
    FailingMarks(cache._sync, times=1)
    retried = fetch.call_with_outcome("ACME")
    assert (retried.value["version"], retried.outcome) == (2, "leader_fill")

    invalidated_elsewhere(redis_server, prefix, cache)
    FailingMarks(cache._sync, times=2)
    unjudged = fetch.call_with_outcome("ACME")
    if kept:  # the outage copy, which docs/invalidation.rst allows while Redis is unreachable
        assert (unjudged.value["version"], unjudged.outcome) == (2, "fallback_hit")
    else:  # a fill without the lock, as in an outage
        assert unjudged.value["version"] == 3
        assert unjudged.outcome != "hit"
    assert fetch("ACME")["version"] > 2  # read again, the marks reject the invalidated value


async def test_an_asyncio_call_is_never_judged_by_marks_that_could_not_be_read_again(
    redis_server: RedisServer, prefix: str
) -> None:
    client = redis.asyncio.Redis(port=redis_server.port)
    cache = Memofill(
        client, prefix=prefix, policies=POLICIES, meta_check_ms=50, local_store_bytes=0
    )
    versions = itertools.count(1)

    async def quote(symbol: str) -> dict[str, Any]:
        return {"symbol": symbol, "version": next(versions)}

    fetch = cache.cached_dataset(QUOTE)(quote)
    try:
        assert (await fetch("ACME"))["version"] == 1
        invalidated_elsewhere(redis_server, prefix, cache)
        FailingMarks(cache._async, times=1)
        retried = await fetch.call_with_outcome("ACME")
        assert (retried.value["version"], retried.outcome) == (2, "leader_fill")
        invalidated_elsewhere(redis_server, prefix, cache)
        FailingMarks(cache._async, times=2)
        unjudged = await fetch.call_with_outcome("ACME")
        assert unjudged.value["version"] == 3
        assert unjudged.outcome != "hit"
    finally:
        await client.aclose()
