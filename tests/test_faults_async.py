"""asyncio callers under faults: cancelled, timed out, and Redis failing under them.

One cancelled or timed-out caller must neither cancel the shared fill nor
leave anything behind: the fill runs on for the others (and for the cache),
no waiter hangs, and when everything is done no task is left over. Two
``Memofill`` instances on one loop stand for two processes: each has its own
singleflight, so they meet only through Redis.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

from memofill import CacheFill, Memofill
from memofill.codec import encode
from memofill.keys import lock_key, wake_key
from memofill.testing import stored_payload
from tests.support.fault_helpers import (
    MARGIN_S,
    PATIENT_SOCKET_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    Target,
    dataset,
    make_async_client,
    measure,
    recorded,
)
from tests.support.helpers import failures
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis_server]

#: Followers wait long enough for any fill here, however busy the machine: the tests' exact
#: origin counts are then what the contract promises, not what a quiet run happened to do.
FILL = CacheFill(lease_ms=60_000, wait_ms=30_000, poll_min_ms=10, poll_max_ms=100)
POLICIES = {"fault:{name}": dataset(FILL)}


@pytest.fixture
def prefix() -> str:
    return f"a{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def cache(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = make_async_client(Target(redis_server.port, socket_timeout=PATIENT_SOCKET_TIMEOUT_S))
    yield client
    await client.aclose()


class Origin:
    """An async fetch that counts its calls and takes ``fetch_s``."""

    def __init__(self, fetch_s: float, gate: asyncio.Event | None = None) -> None:
        self.fetch_s = fetch_s
        self.gate = gate
        self.calls = 0
        self.finished = 0

    async def __call__(self, name: str) -> dict[str, str]:
        self.calls += 1
        if self.gate is not None:  # held back until the test lets it go
            await self.gate.wait()
        await asyncio.sleep(self.fetch_s)
        self.finished += 1
        return {"name": name}


#: Every instance a test made, so that its client is closed whatever the test's fate.
_opened: list[Memofill] = []


@pytest.fixture(autouse=True)
async def _close_instances() -> AsyncIterator[None]:
    yield
    instances = list(_opened)
    _opened.clear()
    await close(*instances)


async def instance(
    port: int, prefix: str, origin: Origin, socket_timeout: float = PATIENT_SOCKET_TIMEOUT_S
) -> tuple[Memofill, Any]:
    """A Memofill on its own asyncio client (one process's worth) and its cached fetch.

    Patient by default: only a test that stalls Redis wants the short fault time-outs.
    """
    client = make_async_client(Target(port, socket_timeout=socket_timeout))
    mf = Memofill(async_client=client, prefix=prefix, policies=POLICIES)
    _opened.append(mf)

    @mf.cached_dataset("fault:{name}")
    async def fetch(name: str) -> dict[str, str]:
        return await origin(name)

    return mf, fetch


async def close(*instances: Memofill) -> None:
    for mf in instances:
        commands = mf.commands_for(True)
        assert commands is not None
        await commands.client.aclose()


async def until(condition: Callable[[], object], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def assert_nothing_left_behind(*instances: Memofill) -> None:
    """Every shared fill has finished and no task but this test's is alive."""
    await until(lambda: all(len(mf.task_flights) == 0 for mf in instances))
    await asyncio.sleep(0)  # let the done callbacks run
    assert asyncio.all_tasks() == {asyncio.current_task()}


#: What it means when a caller whose wait_for ran out is still waiting: redis-py returns the
#: reply of a read whose task was cancelled (on a loop that stalled), and the caller went on.
LOST_CANCEL = "a caller's time-out expired, yet it kept waiting: its cancellation was lost"


def lost_cancels(late: set[asyncio.Task[Any]]) -> int:
    """How many callers kept waiting after their time-out: none from Python 3.11.

    Python 3.10 does not count cancellation requests, so memofill cannot tell
    that redis-py dropped one (see
    ``test_a_cancellation_the_redis_reply_swallowed_still_ends_the_call``): on a
    stalled loop such a caller waits on for the fill and gets its value.
    """
    if sys.version_info >= (3, 11):
        assert not late, LOST_CANCEL
    return len(late)


def split_served(results: list[Any]) -> tuple[list[Any], list[BaseException]]:
    """Values returned and exceptions raised, apart."""
    return (
        [r for r in results if not isinstance(r, BaseException)],
        [r for r in results if isinstance(r, BaseException)],
    )


def logged(records: list[dict[str, Any]]) -> Counter[tuple[str, str | None]]:
    return Counter((r["outcome"], r["error"]) for r in records)


def outcomes(results: list[Any]) -> Counter[str]:
    return Counter(
        "cancelled"
        if isinstance(r, asyncio.CancelledError)
        else "timeout"
        if isinstance(r, (TimeoutError, asyncio.TimeoutError))  # one class from Python 3.11
        else type(r).__name__
        if isinstance(r, BaseException)
        else r.outcome
        for r in results
    )


async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = await call
    return result, time.monotonic() - started


# -- cancelled and timed-out callers ---------------------------------------------------------


async def test_callers_cancelled_mid_fetch_leave_the_fill_running(
    redis_server: RedisServer,
    cache: redis.asyncio.Redis,
    prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    origin = Origin(fetch_s=0.4)
    mf, fetch = await instance(redis_server.port, prefix, origin)
    with recorded() as records:
        tasks = [asyncio.create_task(timed(fetch.call_with_outcome("x"))) for _ in range(8)]
        await until(lambda: origin.calls == 1)
        for task in tasks[:4]:  # the first caller, which started the fill, among them
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert outcomes(results[:4]) == Counter(cancelled=4)
    served = [result for result, _ in results[4:]]
    longest = max(waited for _, waited in results[4:])
    measure(request, origin.calls, longest, logged(records))
    survivors = Counter(r.outcome for r in served)
    # Whichever caller's read missed first started the fill; the rest joined it.
    assert survivors in (Counter(leader_fill=1, local_join=3), Counter(local_join=4))
    assert all(r.value == {"name": "x"} for r in served)
    assert longest < origin.fetch_s + MARGIN_S
    assert (origin.calls, origin.finished) == (1, 1)
    assert await cache.get(lock_key(f"{prefix}fault:x")) is None  # released, not left to expire
    assert stored_payload(await cache.get(f"{prefix}fault:x")) == encode({"name": "x"})
    # One record for the fill, even when the caller that started it was cancelled.
    assert Counter(r["outcome"] for r in records) == survivors | Counter(leader_fill=1)
    await assert_nothing_left_behind(mf)


async def test_every_caller_cancelled_mid_fetch_the_fill_still_lands(
    redis_server: RedisServer,
    cache: redis.asyncio.Redis,
    prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    origin = Origin(fetch_s=0.3)
    mf, fetch = await instance(redis_server.port, prefix, origin)
    with recorded() as records:
        tasks = [asyncio.create_task(fetch("x")) for _ in range(3)]
        await until(lambda: origin.calls == 1)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert outcomes(results) == Counter(cancelled=3)
        await assert_nothing_left_behind(mf)
    assert origin.finished == 1
    assert stored_payload(await cache.get(f"{prefix}fault:x")) == encode({"name": "x"})
    assert await cache.get(lock_key(f"{prefix}fault:x")) is None
    assert Counter(r["outcome"] for r in records) == Counter(leader_fill=1)
    measure(request, origin.calls, None, logged(records))
    assert (await fetch.call_with_outcome("x")).outcome == "hit"


async def test_followers_cancelled_mid_wait(
    redis_server: RedisServer,
    cache: redis.asyncio.Redis,
    prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    """Another process holds the lock; some of this process's waiters give up."""
    key = f"{prefix}fault:x"
    assert await cache.set(lock_key(key), b"another-process", nx=True, px=FILL.lease_ms)
    origin = Origin(fetch_s=0)
    mf, fetch = await instance(redis_server.port, prefix, origin)
    with recorded() as records:
        tasks = [asyncio.create_task(timed(fetch.call_with_outcome("x"))) for _ in range(6)]
        timeouts = [asyncio.create_task(asyncio.wait_for(fetch("x"), 0.1)) for _ in range(2)]
        await asyncio.sleep(0.2)
        for task in tasks[:3]:
            task.cancel()
        # Their 0.1 s are up before the value exists, however slow the loop.
        _, late = await asyncio.wait(timeouts, timeout=10)
        # The other process's leader writes the value and wakes the followers.
        await cache.set(key, encode({"name": "x"}), px=60_000)
        await cache.xadd(wake_key(key), {"filled": "1"})
        results = await asyncio.gather(*tasks, *timeouts, return_exceptions=True)
    lost = lost_cancels(late)
    values, errors = split_served(results[6:])
    assert values == [{"name": "x"}] * lost
    assert outcomes(errors) == Counter(timeout=2 - lost)
    assert outcomes(results[:3]) == Counter(cancelled=3)
    served = [result for result, _ in results[3:6]]
    survivors = Counter(r.outcome for r in served)
    assert survivors in (Counter(follower_hit=1, local_join=2), Counter(local_join=3))
    assert all(r.value == {"name": "x"} for r in served)
    longest = max(waited for _, waited in results[3:6])
    measure(request, origin.calls, longest, logged(records))
    assert longest < 0.2 + FILL.poll_max_ms / 1000 + MARGIN_S
    assert origin.calls == 0
    expected = survivors | Counter(follower_hit=1)
    if lost:  # the callers that kept waiting joined the fill too
        assert Counter(r["outcome"] for r in records) - expected == Counter(local_join=lost)
    else:
        assert Counter(r["outcome"] for r in records) == expected
    await assert_nothing_left_behind(mf)


async def test_wait_for_timeouts_around_calls(
    redis_server: RedisServer,
    cache: redis.asyncio.Redis,
    prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    gate = asyncio.Event()
    origin = Origin(fetch_s=0.4, gate=gate)
    leader_mf, leader = await instance(redis_server.port, prefix, origin)
    follower_mf, follower = await instance(redis_server.port, prefix, origin)
    with recorded() as records:
        short = [
            asyncio.create_task(asyncio.wait_for(f("x"), 0.1))
            for f in (leader, follower, leader, follower)
        ]
        patient = [
            asyncio.create_task(
                timed(asyncio.wait_for(f.call_with_outcome("x"), FILL.wait_ms / 1000))
            )
            for f in (leader, follower)
        ]
        # The fetch goes on once the short waits are over, however slow the loop.
        _, late = await asyncio.wait(short, timeout=10)
        gate.set()
        results = await asyncio.gather(*short, *patient, return_exceptions=True)
    lost = lost_cancels(late)
    values, errors = split_served(results[:4])
    assert values == [{"name": "x"}] * lost
    assert outcomes(errors) == Counter(timeout=4 - lost)
    served = [result for result, _ in results[4:]]
    measure(request, origin.calls, max(s for _, s in results[4:]), logged(records))
    assert [r.value for r in served] == [{"name": "x"}] * 2
    assert Counter(r.outcome for r in served) in (
        Counter(leader_fill=1, follower_hit=1),
        Counter(local_join=1, follower_hit=1),
        Counter(leader_fill=1, local_join=1),
        Counter(local_join=2),
    )
    assert origin.calls == 1
    await assert_nothing_left_behind(leader_mf, follower_mf)
    assert (await follower.call_with_outcome("x")).outcome == "hit"


# -- Redis failing under asyncio callers -----------------------------------------------------


async def test_script_flush_mid_fill_is_recovered(
    redis_server: RedisServer,
    cache: redis.asyncio.Redis,
    prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    origin = Origin(fetch_s=0.3)
    _, leader = await instance(redis_server.port, prefix, origin)
    _, follower = await instance(redis_server.port, prefix, origin)
    with recorded() as records:
        first = asyncio.create_task(leader.call_with_outcome("x"))
        await until(lambda: origin.calls == 1)
        second = asyncio.create_task(timed(follower.call_with_outcome("x")))
        await cache.script_flush()
        led, (followed, waited) = await asyncio.gather(first, second)
    assert (led.outcome, followed.outcome) == ("leader_fill", "follower_hit")
    assert waited < 0.3 + MARGIN_S
    assert origin.calls == 1
    assert await cache.get(lock_key(f"{prefix}fault:x")) is None
    assert [r["error"] for r in records] == [None, None]
    measure(request, origin.calls, waited, logged(records))


@pytest.mark.parametrize("fault", ["pause", "kill"])
async def test_redis_paused_or_killed_while_async_followers_wait(
    own_redis_server: RedisServer, prefix: str, fault: str, request: pytest.FixtureRequest
) -> None:
    origin = Origin(fetch_s=0.4)
    port = own_redis_server.port
    leader_mf, leader = await instance(port, prefix, origin, SOCKET_TIMEOUT_S)
    follower_mf, follower = await instance(port, prefix, origin, SOCKET_TIMEOUT_S)
    with recorded() as records:
        first = asyncio.create_task(timed(leader.call_with_outcome("x")))
        await until(lambda: origin.calls == 1)
        followers = [asyncio.create_task(timed(follower.call_with_outcome("x"))) for _ in range(3)]
        await asyncio.sleep(0.1)
        if fault == "pause":
            own_redis_server.pause()
        else:
            own_redis_server.kill()
        try:
            results = await asyncio.gather(first, *followers)
        finally:
            own_redis_server.resume()
    assert [r.value for r, _ in results] == [{"name": "x"}] * 4
    assert origin.calls == 2  # the leader's fetch and one local fetch in the other "process"
    longest = max(waited for _, waited in results)
    measure(request, origin.calls, longest, logged(records))
    assert longest < SOCKET_TIMEOUT_S + 2 * origin.fetch_s + MARGIN_S
    error = "TimeoutError" if fault == "pause" else "ConnectionError"
    assert failures(Counter((r["outcome"], r["error"]) for r in records)) == Counter(
        {("leader_fill", error): 1, ("lock_error", error): 1, ("local_join", error): 2}
    )
    await assert_nothing_left_behind(leader_mf, follower_mf)


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 does not count cancellation requests"
)
async def test_a_cancellation_the_redis_reply_swallowed_still_ends_the_call(
    redis_server: RedisServer, prefix: str
) -> None:
    """redis-py returns a reply that was already waiting and drops the ``CancelledError``.

    The loop is blocked while the ``GET`` is in flight, so its reply is waiting
    when the caller is cancelled: redis-py hands the reply back, and the caller
    must not go on to join (and wait for) a fill it was told to leave.
    """
    origin = Origin(fetch_s=0.2)
    mf, fetch = await instance(redis_server.port, prefix, origin)
    assert (await fetch("warm")) == {"name": "warm"}  # the connection is open and warm
    call = asyncio.create_task(fetch("x"))
    await asyncio.sleep(0)  # the GET is sent
    time.sleep(0.06)  # and its reply arrives while the loop is blocked
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert origin.calls == 1  # only the warm-up: the cancelled miss never fetched
    await assert_nothing_left_behind(mf)
