"""Pools, time-outs and forks against a real redis-server: none of them may break coordination.

A full pool makes a caller wait for a connection, never fetch on its own; a
blocking wait on the wake stream ends before the socket time-out whatever
Redis's timer granularity; one slow reply does not open the breaker; and a
process forked while a fill is in flight serves that key in the child.
Stampedes run beside a CPU-bound thread, as a busy worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

import memofill
from memofill import CacheFill, Memofill
from memofill.codec import encode
from tests.support.fault_helpers import dataset, wait_until
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis_server]

#: Followers wait long enough for any fill, however busy the machine: one origin call per
#: key is then what the contract promises, not what a quiet run happened to do.
FILL = CacheFill(lease_ms=60_000, wait_ms=30_000, poll_min_ms=10, poll_max_ms=100)
POLICIES = {"fault:{name}": dataset(FILL)}
#: Long pauses between reads: each blocking wait then asks for as long as the socket
#: time-out allows.
LONG_POLLS = {
    "fault:{name}": dataset(
        CacheFill(lease_ms=60_000, wait_ms=30_000, poll_min_ms=10, poll_max_ms=1_000)
    )
}
RUNS = 5


@contextlib.contextmanager
def cpu_bound_thread() -> Iterator[None]:
    """A thread that keeps one core busy and contends for the GIL, as request work does."""
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(i * i for i in range(20_000))

    thread = threading.Thread(target=burn, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def counting_fetch(
    mf: Memofill, counter: redis.Redis, origin: str, fetch_s: float, *, is_async: bool
) -> Any:
    """A cached fetch that counts its calls per name under ``origin`` on ``counter``."""
    if is_async:

        @mf.cached_dataset("fault:{name}")
        async def fetch_async(name: str) -> dict[str, Any]:
            counter.hincrby(origin, name, 1)
            await asyncio.sleep(fetch_s)
            return {"name": name}

        return fetch_async

    @mf.cached_dataset("fault:{name}")
    def fetch(name: str) -> dict[str, Any]:
        counter.hincrby(origin, name, 1)
        time.sleep(fetch_s)
        return {"name": name}

    return fetch


def origin_calls(counter: redis.Redis, origin: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in counter.hgetall(origin).items()}


def new_prefix() -> str:
    return f"p{uuid.uuid4().hex[:8]}:"


# --- one process, asyncio ---------------------------------------------------------------


def async_client(server: RedisServer, pool: str) -> Any:
    """The recommended client (a blocking pool), or a plain pool that refuses past its size."""
    if pool == "blocking":
        return memofill.redis_client(server.url, asyncio=True, max_connections=8)
    return redis.asyncio.Redis(
        port=server.port, max_connections=8, socket_timeout=1.0, retry=AsyncRetry(NoBackoff(), 1)
    )


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("pool", ["blocking", "plain"])
async def test_200_asyncio_requests_in_one_process_cost_one_origin_call_per_cold_key(
    redis_server: RedisServer, pool: str, run: int
) -> None:
    """Two instances stand for two workers (each its own pool and singleflight, meeting only
    in Redis); 200 requests on 40 cold keys through pools of 8 connections."""
    prefix, origin = new_prefix(), f"origin:{uuid.uuid4().hex}"
    counter = redis_server.client()
    clients = [async_client(redis_server, pool), async_client(redis_server, pool)]
    instances = [Memofill(c, prefix=prefix, policies=POLICIES) for c in clients]
    fetches = [counting_fetch(mf, counter, origin, 0.3, is_async=True) for mf in instances]
    names = [f"k{i % 40}" for i in range(200)]
    try:
        with cpu_bound_thread():
            values = await asyncio.gather(*(fetches[i % 2](name) for i, name in enumerate(names)))
    finally:
        for client in clients:
            await client.aclose()
    assert [v["name"] for v in values] == names
    assert origin_calls(counter, origin) == dict.fromkeys(names, 1)
    assert not any(mf.breaker.is_open for mf in instances)
    assert not any(mf.counters.snapshot()["fault:{name}"].get("lock_error") for mf in instances)


async def test_400_asyncio_hits_through_a_small_plain_pool_call_no_origin(
    redis_server: RedisServer,
) -> None:
    """A ``GET`` refused by a full pool waits for a connection: a hit never becomes a fetch."""
    prefix, origin = new_prefix(), f"origin:{uuid.uuid4().hex}"
    counter = redis_server.client()
    names = [f"k{i}" for i in range(400)]
    for name in names:
        counter.set(f"{prefix}fault:{name}", encode({"name": name}), ex=60)
    client = redis.asyncio.Redis(
        port=redis_server.port, max_connections=20, retry=AsyncRetry(NoBackoff(), 1)
    )
    mf = Memofill(client, prefix=prefix, policies=POLICIES)
    fetch = counting_fetch(mf, counter, origin, 0.1, is_async=True)
    try:
        results = await asyncio.gather(*(fetch.call_with_outcome(name) for name in names))
    finally:
        await client.aclose()
    assert [r.value for r in results] == [{"name": name} for name in names]
    assert origin_calls(counter, origin) == {}
    # Every caller was served from Redis: plain hits, or the recheck of a lock taken
    # once its GET found the pool full.
    assert {r.outcome for r in results} <= {"hit", "leader_recheck_hit"}


# --- a blocking wait near the socket time-out -------------------------------------------


@pytest.mark.parametrize("socket_timeout", [0.25, 0.3])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "asyncio"])
async def test_a_wait_near_the_socket_timeout_on_a_healthy_redis_is_not_a_failure(
    redis_server: RedisServer, is_async: bool, socket_timeout: float
) -> None:
    """A 1.5 s fetch: the follower blocks on XREAD many times, each ending on Redis's 100 ms
    timer (BLOCK 200 returns after about 300 ms); none may cost an origin call or open the
    breaker."""
    prefix, origin = new_prefix(), f"origin:{uuid.uuid4().hex}"
    counter = redis_server.client()
    settings: dict[str, Any] = {
        "port": redis_server.port,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
    }
    if is_async:
        clients: list[Any] = [
            redis.asyncio.Redis(**settings, retry=AsyncRetry(NoBackoff(), 0)) for _ in range(2)
        ]
    else:
        clients = [redis.Redis(**settings, retry=Retry(NoBackoff(), 0)) for _ in range(2)]
    leader, follower = (Memofill(c, prefix=prefix, policies=LONG_POLLS) for c in clients)
    fetch_leader = counting_fetch(leader, counter, origin, 1.5, is_async=is_async)
    fetch_follower = counting_fetch(follower, counter, origin, 1.5, is_async=is_async)
    if is_async:
        lead = asyncio.ensure_future(fetch_leader.call_with_outcome("x"))
        await asyncio.to_thread(wait_until, lambda: origin_calls(counter, origin) == {"x": 1})
        followed = await fetch_follower.call_with_outcome("x")
        led = await lead
        for client in clients:
            await client.aclose()
    else:
        with ThreadPoolExecutor(1) as pool:
            lead_sync = pool.submit(fetch_leader.call_with_outcome, "x")
            wait_until(lambda: origin_calls(counter, origin) == {"x": 1})
            followed = fetch_follower.call_with_outcome("x")
            led = lead_sync.result()
    assert (led.outcome, followed.outcome) == ("leader_fill", "follower_hit")
    assert followed.value == {"name": "x"}
    assert origin_calls(counter, origin) == {"x": 1}
    assert not follower.breaker.is_open
    assert follower.breaker.timeouts == 0


# --- three processes --------------------------------------------------------------------


def stampede_process(
    url: str, prefix: str, mode: str, barrier: Any, reports: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """One worker: ``RUNS`` times, 100 concurrent callers on 5 cold keys beside a busy thread."""
    is_async = mode == "asyncio"
    client = memofill.redis_client(url, asyncio=is_async, max_connections=10)
    mf = Memofill(client, prefix=prefix, policies=POLICIES)
    counter = redis.Redis.from_url(url)
    fetch = counting_fetch(mf, counter, f"{prefix}origin", 0.5, is_async=is_async)

    def report(run: int, names: list[str], results: list[Any]) -> None:
        ok = all(r.value == {"name": n} for r, n in zip(results, names, strict=True))
        reports.put((run, ok, Counter(r.outcome for r in results), mf.breaker.is_open))

    async def runs_async() -> None:
        # One event loop for every run: an asyncio client's connections belong to one loop.
        for run in range(RUNS):
            names = [f"r{run}k{i % 5}" for i in range(100)]
            await asyncio.to_thread(barrier.wait, 60)
            report(run, names, await asyncio.gather(*map(fetch.call_with_outcome, names)))
        await client.aclose()

    with cpu_bound_thread():
        if is_async:
            asyncio.run(runs_async())
            return
        for run in range(RUNS):
            names = [f"r{run}k{i % 5}" for i in range(100)]
            barrier.wait(timeout=60)
            with ThreadPoolExecutor(len(names)) as pool:
                report(run, names, list(pool.map(fetch.call_with_outcome, names)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_300_requests_across_3_processes_cost_one_origin_call_per_cold_key(
    redis_server: RedisServer, mode: str
) -> None:
    prefix = new_prefix()
    ctx = multiprocessing.get_context("spawn")
    barrier, reports = ctx.Barrier(3), ctx.Queue()
    processes = [
        ctx.Process(
            target=stampede_process,
            args=(redis_server.url, prefix, mode, barrier, reports),
            daemon=True,
        )
        for _ in range(3)
    ]
    for process in processes:
        process.start()
    try:
        got = [reports.get(timeout=120) for _ in range(3 * RUNS)]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert all(process.exitcode == 0 for process in processes)
    assert all(ok for _, ok, _, _ in got), got
    assert not any(tripped for *_, tripped in got), got
    calls = origin_calls(redis_server.client(), f"{prefix}origin")
    expected = {f"r{run}k{i}": 1 for run in range(RUNS) for i in range(5)}
    assert calls == expected, [outcomes for *_, outcomes, _ in got]


# --- fork ------------------------------------------------------------------------------


def child_stampede(
    fetch: Callable[[str], Any], started: Any, results: Any
) -> None:  # pragma: no cover - runs in a forked process
    """In the child: 8 threads on the key the parent is filling, 8 on another."""
    started.set()
    names = ["inflight"] * 8 + ["other"] * 8
    with ThreadPoolExecutor(len(names)) as pool:
        values = list(pool.map(fetch, names))
    results.put([v == {"name": n} for v, n in zip(values, names, strict=True)])


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["plain", "blocking"])
def test_a_fork_while_a_fill_is_in_flight_leaves_the_child_working(
    redis_server: RedisServer, pool: str
) -> None:
    """The child inherits the parent's table of fills but not the thread finishing one; it
    must not wait for it. The parent's fill lands while the child's callers follow it."""
    prefix, origin = new_prefix(), f"origin:{uuid.uuid4().hex}"
    counter = redis_server.client()
    if pool == "blocking":
        client = memofill.redis_client(redis_server.url, max_connections=20)
    else:
        client = redis.Redis(port=redis_server.port, socket_timeout=10)
    mf = Memofill(client, prefix=prefix, policies=POLICIES)
    release = threading.Event()

    @mf.cached_dataset("fault:{name}")
    def fetch(name: str) -> dict[str, Any]:
        counter.hincrby(origin, name, 1)
        if name == "inflight":
            release.wait(timeout=60)
        time.sleep(0.2)
        return {"name": name}

    assert fetch("warm") == {"name": "warm"}  # the parent's pool has a connection to inherit
    ctx = multiprocessing.get_context("fork")
    started, results = ctx.Event(), ctx.Queue()
    with ThreadPoolExecutor(1) as parent:
        filling = parent.submit(fetch, "inflight")
        wait_until(lambda: origin_calls(counter, origin).get("inflight") == 1)
        child = ctx.Process(target=child_stampede, args=(fetch, started, results))
        with warnings.catch_warnings():
            # Python 3.12+ warns of any fork from a threaded process: forking one is the point.
            warnings.simplefilter("ignore", DeprecationWarning)
            child.start()
        try:
            assert started.wait(timeout=30)
            release.set()
            assert filling.result(timeout=30) == {"name": "inflight"}
            got = results.get(timeout=60)
        finally:
            release.set()
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
                child.join()
    assert child.exitcode == 0
    assert got == [True] * 16
    assert origin_calls(counter, origin) == {"warm": 1, "inflight": 1, "other": 1}
