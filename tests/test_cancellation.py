"""Cancelled asyncio fills on a private redis-server: a leader frees its lock, a wait just stops.

A leader cancelled before its value is stored (its task cancelled, or
:func:`asyncio.run` returning while it fetches) releases its lock token-safely
and tells its followers, one of which takes the fill over at once rather than
after ``wait_ms``. A follower whose callers have all gone stops without calling
the origin. Origin calls are counted with ``INCR`` on the server, so a spawned
process's calls count too.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import sys
import threading
import time
from typing import Any

import pytest
import redis
import redis.asyncio

from memofill import CacheFill, Dataset, Memofill
from memofill.commands import Commands
from memofill.coordinator import fill
from memofill.drivers import run_async
from memofill.fallback import Breaker
from memofill.keys import lock_key, wake_key
from memofill.steps import CANCELLED, Plan
from tests.support.fault_helpers import note
from tests.support.helpers import notify_after_acquire
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis_server]

#: Followers would wait 20 s for a leader that never signals: a take-over must come far sooner.
SLOW_FILL = CacheFill(lease_ms=30_000, wait_ms=20_000, poll_min_ms=10, poll_max_ms=200)
#: Half of ``wait_ms``: a generous bound, that a follower waiting out ``wait_ms`` cannot meet.
TAKE_OVER_BOUND_S = SLOW_FILL.wait_ms / 2000
PATIENCE_S = 30.0


def policies(cache_fill: CacheFill = SLOW_FILL) -> dict[str, Dataset]:
    return {"slow:{name}": Dataset("slow:{name}", ttl_s=60, cache_fill=cache_fill)}


def leader_until_asyncio_run_returns(port: int, prefix: str, stop_key: str) -> None:
    """A process whose ``asyncio.run`` returns while its fill is fetching (spawned)."""

    async def main() -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=port)
        counter = redis.asyncio.Redis(host="127.0.0.1", port=port)
        mf = Memofill(client, prefix=prefix, policies=policies())

        @mf.cached_dataset("slow:{name}")
        async def origin(name: str) -> dict[str, str]:
            await counter.incr(prefix + "origin")
            await asyncio.sleep(PATIENCE_S * 10)
            return {"name": name, "by": "cancelled leader"}

        asyncio.get_running_loop().create_task(origin("a"))
        while not await counter.exists(stop_key):
            await asyncio.sleep(0.01)
        # main returns with the fill in flight: asyncio.run cancels it.

    asyncio.run(main())


def test_asyncio_run_returning_mid_fetch_frees_the_lock_and_a_follower_takes_over_at_once(
    redis_server: RedisServer, real_client: redis.Redis, prefix: str, request: Any
) -> None:
    key = f"{prefix}slow:a"
    ctx = multiprocessing.get_context("spawn")
    leader = ctx.Process(
        target=leader_until_asyncio_run_returns,
        args=(redis_server.port, prefix, prefix + "stop"),
        daemon=True,
    )
    leader.start()
    try:
        deadline = time.monotonic() + PATIENCE_S
        while not (real_client.get(prefix + "origin") and real_client.exists(lock_key(key))):
            assert time.monotonic() < deadline, "the leader never started its fetch"
            time.sleep(0.01)
        held_by = real_client.get(lock_key(key))

        mf = Memofill(redis_server.client(), prefix=prefix, policies=policies())
        calls: list[str] = []

        @mf.cached_dataset("slow:{name}")
        def origin(name: str) -> dict[str, str]:
            calls.append(name)
            real_client.incr(prefix + "origin")
            return {"name": name, "by": "follower"}

        following = notify_after_acquire(mf)
        seen: dict[str, Any] = {}
        follower = threading.Thread(target=lambda: seen.update(r=origin.call_with_outcome("a")))
        follower.start()
        assert following.wait(PATIENCE_S)
        assert real_client.get(lock_key(key)) == held_by  # it is following the leader
        told_at = time.monotonic()
        real_client.set(prefix + "stop", 1)
        leader.join(PATIENCE_S)
        assert leader.exitcode == 0
        # Right after the leader's process is gone, its token no longer holds the lock.
        assert real_client.get(lock_key(key)) != held_by
        follower.join(PATIENCE_S)
        took_s = time.monotonic() - told_at
    finally:
        if leader.is_alive():
            leader.kill()
    note(request, "take_over_s", round(took_s, 3))
    assert seen["r"].value == {"name": "a", "by": "follower"}
    assert seen["r"].outcome == "leader_fill"  # it took the lock over, not fetched around it
    assert took_s < TAKE_OVER_BOUND_S
    assert calls == ["a"]
    assert int(real_client.get(prefix + "origin") or 0) == 2  # the cancelled one, the take-over
    assert real_client.exists(lock_key(key)) == 0


async def test_a_leader_task_cancelled_mid_fetch_releases_its_lock_and_tells_followers(
    redis_server: RedisServer, real_client: redis.Redis, prefix: str
) -> None:
    key = f"{prefix}slow:a"
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    fetching = asyncio.Event()

    async def fetch() -> str:
        fetching.set()
        await asyncio.sleep(PATIENCE_S * 10)
        return "never"

    plan = Plan("slow:{name}", key, ttl_ms=60_000, negative_ttl_ms=0, cache_fill=SLOW_FILL)
    steps = fill(plan, time.monotonic, random.Random(0))
    task = asyncio.ensure_future(run_async(steps, Commands(client), fetch, Breaker()))
    try:
        await asyncio.wait_for(fetching.wait(), PATIENCE_S)
        assert real_client.exists(lock_key(key)) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert real_client.exists(lock_key(key)) == 0
        entry = real_client.xrevrange(wake_key(key), count=1)
        assert entry[0][1] == {b"result": CANCELLED.encode()}
    finally:
        await client.aclose()


async def test_a_follower_whose_callers_all_gave_up_never_calls_the_origin(
    redis_server: RedisServer, real_client: redis.Redis, prefix: str
) -> None:
    short = CacheFill(lease_ms=10_000, wait_ms=800, poll_min_ms=10, poll_max_ms=100)
    key = f"{prefix}slow:a"
    # Another process holds the lock and fetches for longer than this one's wait_ms.
    real_client.set(lock_key(key), "someone-else", px=10_000)
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    mf = Memofill(client, prefix=prefix, policies=policies(short))
    try:

        @mf.cached_dataset("slow:{name}")
        async def origin(name: str) -> str:
            real_client.incr(prefix + "origin")
            return name

        callers = [asyncio.ensure_future(origin("a")) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert len(mf.task_flights) == 1  # one fill, following
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        # Past the follower's wait_ms, after which a fill still running would fetch.
        await asyncio.sleep(short.wait_ms / 1000 * 2)
        assert real_client.get(prefix + "origin") is None
        assert len(mf.task_flights) == 0
        assert all(
            task.done() for task in asyncio.all_tasks() if task is not asyncio.current_task()
        )
    finally:
        await client.aclose()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 does not count cancellations")
async def test_a_fill_whose_cancellation_a_reply_swallowed_never_calls_the_origin(
    redis_server: RedisServer, real_client: redis.Redis, prefix: str
) -> None:
    """As redis-py does on a busy loop: the wait returns its reply and drops the cancellation."""
    short = CacheFill(lease_ms=10_000, wait_ms=500, poll_min_ms=10, poll_max_ms=100)
    key = f"{prefix}slow:a"
    real_client.set(lock_key(key), "someone-else", px=10_000)
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    mf = Memofill(client, prefix=prefix, policies=policies(short))
    commands: Any = mf._async
    waiting = commands.wait

    async def swallowing_wait(*args: Any) -> Any:
        try:
            return await waiting(*args)
        except asyncio.CancelledError:
            return None  # the reply of a wait that timed out: nothing yet

    commands.wait = swallowing_wait
    try:

        @mf.cached_dataset("slow:{name}")
        async def origin(name: str) -> str:
            real_client.incr(prefix + "origin")
            return name

        caller = asyncio.ensure_future(origin("a"))
        await asyncio.sleep(0.2)
        assert len(mf.task_flights) == 1  # one fill, following
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        await asyncio.sleep(short.wait_ms / 1000 * 2)  # past the wait, when it would fetch
        assert real_client.get(prefix + "origin") is None
        assert len(mf.task_flights) == 0
    finally:
        await client.aclose()
