"""While Redis is unreachable: recent values are served from the process, and Redis is left alone.

:class:`LocalStore` and :class:`Breaker` with a fake clock, then both through
``@cached_dataset`` on a fakeredis server that is disconnected and reconnected.
The same on a real server that is stopped is in ``test_real_redis.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from memofill import Memofill
from memofill.fallback import (
    EVICTION_LOG_INTERVAL_S,
    MAX_LOCAL_ENTRIES,
    MAX_LOCAL_TTL_S,
    PROBE_S,
    TIMEOUTS_TO_OPEN,
    Breaker,
    LocalStore,
    entry_bytes,
)
from tests.conftest import POLICIES
from tests.support.helpers import FakeClock

# --- LocalStore ------------------------------------------------------------------------


def test_the_local_store_keeps_a_value_for_its_ttl_but_at_most_30_seconds() -> None:
    clock = FakeClock()
    store = LocalStore(clock=clock)
    store.put("short", "s", ttl_s=5)
    store.put("long", "l", ttl_s=900)
    clock.now += 4.9
    assert (store.get("short"), store.get("long")) == ("s", "l")
    clock.now += 0.2
    assert store.get("short", None) is None
    clock.now = 100.0 + MAX_LOCAL_TTL_S - 0.1
    assert store.get("long") == "l"
    clock.now = 100.0 + MAX_LOCAL_TTL_S
    assert store.get("long", None) is None
    assert MAX_LOCAL_TTL_S == 30.0


def test_the_local_store_is_bounded_and_drops_the_oldest_first() -> None:
    store = LocalStore(max_entries=3, clock=FakeClock())
    for key in "abc":
        store.put(key, key, ttl_s=10)
    store.put("a", "a2", ttl_s=10)  # a write makes an entry the newest again
    store.put("d", "d", ttl_s=10)
    assert len(store) == 3
    assert store.get("b", None) is None
    assert [store.get(k) for k in "acd"] == ["a2", "c", "d"]
    assert MAX_LOCAL_ENTRIES == 5000


def test_the_local_store_forgets_a_discarded_key() -> None:
    store = LocalStore(clock=FakeClock())
    store.put("a", b"1", ttl_s=10)
    store.discard("a")
    store.discard("never-there")
    assert store.get("a", None) is None
    assert len(store) == 0
    assert store.bytes == 0


def test_the_local_store_is_bounded_in_bytes_and_counts_what_it_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = LocalStore(clock=clock, max_bytes=10_000)
    value = b"x" * 1_000
    cost = entry_bytes("k00", value)
    with caplog.at_level(logging.INFO, logger="memofill"):
        for index in range(30):
            store.put(f"k{index:02}", value, ttl_s=10)
    assert store.bytes == len(store) * cost <= store.max_bytes
    assert len(store) == store.max_bytes // cost
    # The newest are kept, the oldest dropped, and every drop counted.
    assert store.get("k29") == value
    assert store.get("k00", None) is None
    assert store.evictions == 30 - len(store)
    assert store.evicted_bytes == store.evictions * cost
    # Told once, not per eviction; told again only after the interval, with the new count.
    told = [r for r in caplog.records if "local store full" in r.getMessage()]
    assert len(told) == 1
    assert told[0].levelno == logging.INFO
    clock.now += EVICTION_LOG_INTERVAL_S
    with caplog.at_level(logging.INFO, logger="memofill"):
        store.put("k30", value, ttl_s=10)
    told = [r for r in caplog.records if "local store full" in r.getMessage()]
    assert len(told) == 2
    assert told[1].evictions == store.evictions  # type: ignore[attr-defined]


def test_a_value_over_a_quarter_of_the_budget_is_not_kept_and_pushes_nothing_out() -> None:
    store = LocalStore(clock=FakeClock(), max_bytes=10_000)
    store.put("small", b"s" * 100, ttl_s=10)
    store.put("small-then-huge", b"s" * 100, ttl_s=10)
    store.put("huge", b"h" * 3_000, ttl_s=10)
    store.put("small-then-huge", b"h" * 3_000, ttl_s=10)  # replaced by a huge one: forgotten
    assert store.get("small") == b"s" * 100
    assert store.get("huge", None) is None
    assert store.get("small-then-huge", None) is None
    assert store.too_large == 2
    assert store.evictions == 0
    assert store.bytes == entry_bytes("small", b"s" * 100)


# --- Breaker ---------------------------------------------------------------------------


def test_the_breaker_opens_for_its_cool_down_then_closes() -> None:
    clock = FakeClock()
    breaker = Breaker(cooldown_s=1.0, clock=clock)
    assert not breaker.is_open
    breaker.trip()
    assert breaker.is_open
    clock.now += 0.99
    assert breaker.is_open
    clock.now += 0.02
    assert not breaker.is_open
    breaker.trip()
    breaker.reset()
    assert not breaker.is_open


def test_a_refused_connection_opens_the_breaker_at_once() -> None:
    breaker = Breaker(cooldown_s=1.0, clock=FakeClock())
    breaker.failed(timed_out=False)
    assert breaker.is_open


def test_time_outs_open_the_breaker_only_when_three_come_in_a_row() -> None:
    clock = FakeClock()
    breaker = Breaker(cooldown_s=1.0, clock=clock)
    breaker.failed(timed_out=True)
    breaker.failed(timed_out=True)
    assert not breaker.is_open  # one slow moment of a busy process is not an outage
    breaker.answered()  # a reply between them: they were not in a row
    breaker.failed(timed_out=True)
    breaker.failed(timed_out=True)
    assert not breaker.is_open
    clock.now += 1.5  # more than the cool-down since the last: a new row starts
    breaker.failed(timed_out=True)
    breaker.failed(timed_out=True)
    assert not breaker.is_open
    breaker.failed(timed_out=True)
    assert breaker.is_open
    assert breaker.timeouts == 0


def test_after_a_refused_connection_one_call_at_a_time_probes_redis() -> None:
    clock = FakeClock()
    breaker = Breaker(cooldown_s=5.0, clock=clock)
    breaker.failed(timed_out=False)
    assert breaker.is_open
    assert breaker.skips()
    clock.now += PROBE_S
    assert not breaker.skips()  # this call probes...
    assert breaker.skips()  # ...and the others skip Redis while it does
    breaker.failed(timed_out=False)  # the probe was refused too
    assert breaker.skips()
    clock.now += PROBE_S
    assert not breaker.skips()
    breaker.reset()  # the probe was answered
    assert not breaker.is_open
    assert not breaker.skips()


def test_after_time_outs_no_call_probes_before_the_cool_down_ends() -> None:
    clock = FakeClock()
    breaker = Breaker(cooldown_s=1.0, clock=clock)
    for _ in range(TIMEOUTS_TO_OPEN):
        breaker.failed(timed_out=True)
    assert breaker.is_open
    clock.now += 0.99  # a probe now would cost its caller a whole socket time-out
    assert breaker.skips()
    clock.now += 0.01
    assert not breaker.skips()
    assert not breaker.is_open


# --- through the decorator -------------------------------------------------------------


class CountingGets:
    """Counts the GETs memofill sends (as attempts: a refused one counts too)."""

    def __init__(self, mf: Memofill) -> None:
        commands: Any = mf._async or mf._sync
        self.sent = 0
        original = commands.get

        def get(key: str) -> Any:
            self.sent += 1
            return original(key)

        commands.get = get


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def raw(server: fakeredis.FakeServer) -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis(server=server)
    yield client
    client.close()


def test_warm_values_are_served_while_redis_is_down_and_redis_is_skipped_for_the_cool_down(
    server: fakeredis.FakeServer, raw: fakeredis.FakeRedis
) -> None:
    mf = Memofill(raw, prefix="f:", policies=POLICIES, breaker_cooldown_s=0.2)
    clock = FakeClock()  # the breaker's: no probe falls due however slow the calls below
    mf.breaker._clock = clock
    gets = CountingGets(mf)
    calls: list[str] = []
    fetch = mf.cached_dataset("item:{name}")(lambda name: calls.append(name) or name.upper())
    assert fetch("a") == "A"
    server.connected = False
    assert fetch.call_with_outcome("a").outcome == "fallback_hit"
    assert mf.breaker.is_open
    sent = gets.sent
    for _ in range(5):
        assert fetch.call_with_outcome("a").outcome == "fallback_hit"
    assert gets.sent == sent  # not one GET while the breaker is open
    cold = fetch.call_with_outcome("b")
    assert (cold.value, cold.outcome) == ("B", "lock_error")
    assert fetch.call_with_outcome("b").outcome == "fallback_hit"
    assert gets.sent == sent
    assert calls == ["a", "b"]
    server.connected = True
    clock.now += 0.25
    assert fetch.call_with_outcome("a").outcome == "hit"
    assert gets.sent == sent + 1
    assert mf.counters.snapshot()["item:{name}"]["fallback_hit"] == 7


def test_a_fill_that_began_before_a_dataset_invalidation_is_not_served_in_an_outage(
    server: fakeredis.FakeServer, raw: fakeredis.FakeRedis
) -> None:
    mf = Memofill(raw, prefix="g:", policies=POLICIES, breaker_cooldown_s=5)
    started, release = threading.Event(), threading.Event()
    phase = ["before"]

    def origin(name: str) -> str:
        generation = phase[0]
        if generation == "before":
            started.set()
            release.wait(timeout=10)
        return generation

    fetch = mf.cached_dataset("item:{name}")(origin)
    filling = threading.Thread(target=fetch, args=("a",))
    filling.start()
    assert started.wait(timeout=10)
    phase[0] = "after"
    mf.invalidate_dataset("item:{name}")  # drops every local copy; the fill is still running
    release.set()
    filling.join(timeout=10)
    assert mf.local_store.outage_entry(mf.final_key("item:{name}", name="a")) is not None
    server.connected = False
    result = fetch.call_with_outcome("a")  # the copy its fill kept is of the old generation
    assert (result.value, result.outcome) == ("after", "lock_error")


def test_none_is_not_kept_locally(server: fakeredis.FakeServer, raw: fakeredis.FakeRedis) -> None:
    mf = Memofill(raw, prefix="f:", policies=POLICIES)
    calls: list[str] = []

    @mf.cached_dataset("item:{name}")
    def fetch(name: str) -> None:
        calls.append(name)

    fetch("a")
    server.connected = False
    assert fetch.call_with_outcome("a").outcome == "lock_error"
    assert calls == ["a", "a"]


def test_an_error_redis_answers_does_not_open_the_breaker(raw: fakeredis.FakeRedis) -> None:
    mf = Memofill(raw, prefix="f:", policies=POLICIES)
    raw.rpush("f:item:a", "not a string")  # GET on it: WRONGTYPE
    fetch = mf.cached_dataset("item:{name}")(lambda name: name)
    assert fetch("a") == "a"
    assert not mf.breaker.is_open
    assert fetch.call_with_outcome("a").outcome == "hit"  # the fill replaced the list


def test_invalidate_while_redis_is_down_forgets_the_local_copy_and_says_it_failed(
    server: fakeredis.FakeServer, raw: fakeredis.FakeRedis
) -> None:
    mf = Memofill(raw, prefix="f:", policies=POLICIES)
    calls: list[str] = []
    fetch = mf.cached_dataset("item:{name}")(lambda name: calls.append(name) or name)
    fetch("a")
    server.connected = False
    with pytest.raises(RedisConnectionError):
        fetch.invalidate("a")
    assert fetch.call_with_outcome("a").outcome == "lock_error"  # no stale local copy
    assert calls == ["a", "a"]


@pytest.fixture
async def async_raw(server: fakeredis.FakeServer) -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis(server=server)
    yield client
    await client.aclose()


async def test_asyncio_callers_get_the_same_fallback(
    server: fakeredis.FakeServer, async_raw: fakeredis.FakeAsyncRedis
) -> None:
    mf = Memofill(async_raw, prefix="f:", policies=POLICIES)
    gets = CountingGets(mf)

    @mf.cached_dataset("item:{name}")
    async def fetch(name: str) -> str:
        return name.upper()

    assert await fetch("a") == "A"
    server.connected = False
    assert (await fetch.call_with_outcome("a")).outcome == "fallback_hit"
    sent = gets.sent
    assert (await fetch.call_with_outcome("a")).outcome == "fallback_hit"
    assert (await fetch.call_with_outcome("b")).outcome == "lock_error"
    assert gets.sent == sent
