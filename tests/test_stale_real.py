"""Serve stale while one caller refreshes, on real redis-servers, across processes.

What the contract promises, not timings of one run: after the warm fill no caller
misses (so none waits on the origin), the origin is called once per expiry,
nothing is served older than ``ttl_s + stale_s``, a failing origin is called at
most once per ``refresh_retry_ms`` fleet-wide and no error reaches a caller until
``stale_if_error_s`` ends. Latencies belong in ``bench/``.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from memofill import Memofill
from memofill.codec import read_header
from memofill.keys import lock_key
from memofill.testing import stored_payload
from tests.support import stale_workers
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]


def new_prefix() -> str:
    return f"swr{uuid.uuid4().hex[:8]}:"


def warm(url: str, prefix: str, spec: dict[str, Any]) -> float:
    """Fill the key from this process; return when its fetch began (wall clock)."""
    client = redis.Redis.from_url(url)
    cache = Memofill(
        client, prefix=prefix, policies={stale_workers.KEY: stale_workers.dataset(spec)}
    )
    fetch = cache.cached_dataset(stale_workers.KEY)(stale_workers.origin_sync(client, prefix, 0.0))
    result = fetch.call_with_outcome("k")
    assert result.outcome == "leader_fill"
    client.close()
    return float(result.value["at"])


def every_call(results: list[dict[str, Any]]) -> list[tuple[float, float, str, Any]]:
    return [call for result in results for call in result["calls"]]


def total(results: list[dict[str, Any]], name: str) -> int:
    return sum(result["counts"].get(name, 0) for result in results)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_expiry_under_load_nobody_misses_and_the_origin_is_called_once_per_expiry(
    redis_server: RedisServer, mode: str
) -> None:
    spec = {
        "mode": mode,
        "ttl_s": 0.5,
        "stale_s": 2.0,
        "fill": {
            "lease_ms": 2_000,
            "wait_ms": 1_500,
            "poll_min_ms": 10,
            "poll_max_ms": 200,
            "refresh_retry_ms": 1_000,
        },
        "fetch_s": 0.15,
        "duration_s": 2.0,
        "callers": 4,
        "pause_s": 0.015,
    }
    prefix = new_prefix()
    _, results = stale_workers.run_fleet(
        redis_server.url, prefix, spec, 3, lambda: warm(redis_server.url, prefix, spec)
    )
    calls = every_call(results)
    assert len(calls) > 100
    assert {outcome for _, _, outcome, _ in calls} <= {"hit", "stale_hit"}  # nobody waited
    assert {"hit", "stale_hit"} <= {outcome for _, _, outcome, _ in calls}
    # Never older than ttl_s + stale_s since its fetch began.
    oldest = max(began - at for began, _, _, at in calls)
    assert oldest <= spec["ttl_s"] + spec["stale_s"]
    origin = int(redis_server.client().get(prefix + "origin"))
    refreshes = total(results, "refresh_fill")
    assert refreshes >= 2
    assert origin == 1 + refreshes  # every origin call after the warm fill was a refresh
    # One refresh per expiry: a value is refreshed only once it has gone stale.
    starts = sorted({at for _, _, _, at in calls})
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(gap >= spec["ttl_s"] * 0.9 for gap in gaps)


def test_origin_down_with_stale_if_error_backs_off_fleet_wide_then_fails(
    redis_server: RedisServer,
) -> None:
    spec = {
        "mode": "sync",
        "ttl_s": 0.3,
        "stale_s": 0.6,
        "stale_if_error_s": 2.0,
        "fill": {
            "lease_ms": 1_000,
            "wait_ms": 800,
            "poll_min_ms": 10,
            "poll_max_ms": 200,
            "refresh_retry_ms": 400,
        },
        "fetch_s": 0.02,
        "duration_s": 3.0,
        "callers": 3,
        "pause_s": 0.01,
    }
    prefix = new_prefix()
    client = redis_server.client()

    def warm_then_fail() -> tuple[float, float]:
        at = warm(redis_server.url, prefix, spec)
        client.set(prefix + "down", 1)
        return at, time.time()

    (at, down_since), results = stale_workers.run_fleet(
        redis_server.url, prefix, spec, 3, warm_then_fail
    )
    outage_s = time.time() - down_since
    calls = every_call(results)
    failed_calls = int(client.get(prefix + "origin")) - 1
    assert failed_calls <= outage_s / 0.4 + 1
    window_ends = at + spec["ttl_s"] + spec["stale_if_error_s"]
    before = [call for call in calls if call[0] < window_ends - 0.05]
    after = [call for call in calls if call[0] > window_ends + 0.05]
    assert before
    assert after
    assert all(outcome != "raised" for _, _, outcome, _ in before)
    # A caller that joined another's miss in its process is a local_join (of a stale_on_error).
    assert {outcome for _, _, outcome, _ in before} <= {"stale_hit", "stale_on_error", "local_join"}
    assert all(outcome == "raised" for _, _, outcome, _ in after)
    errors = [error for _, _, _, error in after]
    assert set(errors) <= {"FillError", "RuntimeError"}
    assert errors.count("FillError") > errors.count("RuntimeError")


def test_early_refresh_keeps_a_hot_key_fresh_with_few_lock_attempts(
    redis_server: RedisServer,
) -> None:
    spec = {
        "mode": "sync",
        "ttl_s": 0.4,
        "stale_s": 2.0,
        "fill": {
            "lease_ms": 1_000,
            "wait_ms": 800,
            "poll_min_ms": 10,
            "poll_max_ms": 200,
            "early_beta": 1.0,
            "refresh_retry_ms": 1_000,
        },
        "fetch_s": 0.03,
        "duration_s": 2.5,
        "callers": 3,
        "pause_s": 0.005,
    }
    prefix = new_prefix()
    _, results = stale_workers.run_fleet(
        redis_server.url, prefix, spec, 3, lambda: warm(redis_server.url, prefix, spec)
    )
    cycles = total(results, "refresh_fill")
    attempts = sum(
        total(results, name)
        for name in (
            "refresh_fill",
            "refresh_busy",
            "refresh_recheck_hit",
            "refresh_error",
            "refresh_lock_error",
        )
    )
    assert cycles >= 3
    assert attempts / cycles <= 3.2
    origin = int(redis_server.client().get(prefix + "origin"))
    assert origin == 1 + cycles, [result["counts"] for result in results]
    assert {outcome for _, _, outcome, _ in every_call(results)} <= {"hit", "stale_hit"}
    hits, stale = total(results, "hit"), total(results, "stale_hit")
    assert stale / (hits + stale) <= 0.05  # refreshed before going stale (the first cycle aside)


def stale_entry(url: str, prefix: str, spec: dict[str, Any]) -> None:
    """Fill the key, then age its header so that it is stale now."""
    warm(url, prefix, spec)
    client = redis.Redis.from_url(url)
    key = prefix + "swr:k"
    raw = client.get(key)
    header = read_header(raw)
    assert header is not None
    from memofill.codec import HEADER_LEN, header_bytes  # noqa: PLC0415

    soft = round(time.time() * 1000) - 10
    aged = header._replace(fetch_start_ms=soft - round(spec["ttl_s"] * 1000), soft_until_ms=soft)
    client.set(key, header_bytes(aged) + raw[HEADER_LEN:], keepttl=True)
    client.close()


FAULT_SPEC: dict[str, Any] = {
    "ttl_s": 60,
    "stale_s": 30,
    "fill": {
        "lease_ms": 1_000,
        "wait_ms": 800,
        "poll_min_ms": 10,
        "poll_max_ms": 100,
        "refresh_retry_ms": 1_000,
    },
}


def test_a_leader_killed_mid_refresh_stale_keeps_being_served_then_a_refresh_succeeds(
    redis_server: RedisServer,
) -> None:
    prefix = new_prefix()
    stale_entry(redis_server.url, prefix, FAULT_SPEC)
    context = multiprocessing.get_context("spawn")
    ready = context.Manager().Event()
    leader = context.Process(
        target=stale_workers.hold_a_refresh, args=(redis_server.url, prefix, FAULT_SPEC, ready)
    )
    leader.start()
    try:
        assert ready.wait(30)
        assert leader.pid is not None
        leader.kill()
        leader.join()
        client = redis_server.client()
        lock = lock_key(prefix + "swr:k")
        assert 0 < client.pttl(lock) <= 1_000  # no lock outlives its lease
        cache = Memofill(
            client, prefix=prefix, policies={stale_workers.KEY: stale_workers.dataset(FAULT_SPEC)}
        )
        fetch = cache.cached_dataset(stale_workers.KEY)(
            stale_workers.origin_sync(client, prefix, 0.0)
        )
        deadline = time.monotonic() + 10
        while client.exists(lock) and time.monotonic() < deadline:
            assert fetch.call_with_outcome("k").outcome == "stale_hit"
            time.sleep(0.02)
        assert not client.exists(lock)
        # The next stale read after the lease (and this process's busy memo) refreshes.
        end = time.monotonic() + 5
        while not cache.counters.snapshot()[stale_workers.KEY].get("refresh_fill"):
            assert time.monotonic() < end
            assert fetch.call_with_outcome("k").outcome in {"stale_hit", "hit"}
            time.sleep(0.02)
        assert cache.counters.snapshot()[stale_workers.KEY]["refresh_fill"] == 1
        assert fetch.call_with_outcome("k").outcome == "hit"
    finally:
        if leader.is_alive():
            leader.kill()


def run_then_shut_down(main: Any) -> Any:
    """``asyncio.run(main(client))``, then close the client: as ``asyncio.run`` does, the
    tasks still running when ``main`` returns are cancelled and run to their end first."""
    loop = asyncio.new_event_loop()
    try:
        client = loop.run_until_complete(_async_client(main.url))
        result = loop.run_until_complete(main(client))
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(_settle(tasks))
        loop.run_until_complete(client.aclose())
        return result
    finally:
        loop.close()


async def _settle(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


async def _async_client(url: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url)


def test_an_asyncio_refresh_cancelled_at_loop_shutdown_releases_its_lock(
    redis_server: RedisServer,
) -> None:
    prefix = new_prefix()
    stale_entry(redis_server.url, prefix, FAULT_SPEC)
    policies = {stale_workers.KEY: stale_workers.dataset(FAULT_SPEC)}
    lock = lock_key(prefix + "swr:k")
    slow = {"on": True}

    async def main(client: redis.asyncio.Redis) -> str:
        cache = Memofill(async_client=client, prefix=prefix, policies=policies)
        started = asyncio.Event()

        @cache.cached_dataset(stale_workers.KEY)
        async def fetch(name: str) -> dict[str, Any]:
            started.set()
            if slow["on"]:
                await asyncio.sleep(30)
            return {"name": name, "at": time.time()}

        outcome = (await fetch.call_with_outcome("k")).outcome
        if slow["on"]:
            await asyncio.wait_for(started.wait(), 10)
            assert await client.exists(lock)
        else:
            await asyncio.gather(*cache.refreshes.tasks)
        # Returning with the refresh in flight: the loop's shut-down cancels its task.
        return outcome

    main.url = redis_server.url  # type: ignore[attr-defined]
    assert run_then_shut_down(main) == "stale_hit"
    sync = redis_server.client()
    assert not sync.exists(lock)  # released token-safely, not left to its lease
    assert read_header(sync.get(prefix + "swr:k")).soft_until_ms < time.time() * 1000  # still stale
    slow["on"] = False
    assert run_then_shut_down(main) == "stale_hit"
    assert read_header(sync.get(prefix + "swr:k")).soft_until_ms > time.time() * 1000  # refreshed
    sync.close()


def test_redis_restarted_mid_refresh_stale_keeps_being_served_and_the_next_refresh_succeeds(
    tmp_path: Any,
) -> None:
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
    try:
        prefix = new_prefix()
        stale_entry(server.url, prefix, FAULT_SPEC)
        client = server.client(socket_timeout=1)
        cache = Memofill(
            client, prefix=prefix, policies={stale_workers.KEY: stale_workers.dataset(FAULT_SPEC)}
        )
        gate = {"slow": True}

        def origin(name: str) -> dict[str, Any]:
            if gate["slow"]:
                time.sleep(0.5)
            return {"name": name, "at": time.time()}

        fetch = cache.cached_dataset(stale_workers.KEY)(origin)
        assert fetch.call_with_outcome("k").outcome == "stale_hit"
        time.sleep(0.1)  # the refresh is fetching
        server.restart()
        outcomes = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # every caller gets a value, never an error
            outcomes.add(fetch.call_with_outcome("k").outcome)
            time.sleep(0.02)
        # A restart may have lost invalidations: once a read of the marks notices it, values
        # stamped before it are refilled (a leader_fill), never served.
        assert outcomes <= {"stale_hit", "hit", "fallback_hit", "leader_fill", "local_join"}
        gate["slow"] = False
        lock = lock_key(prefix + "swr:k")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            cache.breaker.reset()
            if fetch.call_with_outcome("k").outcome == "hit":
                break
            time.sleep(0.05)
        assert fetch.call_with_outcome("k").outcome == "hit"
        pttl = server.client().pttl(lock)
        assert pttl == -2 or 0 < pttl <= 1_000
        assert stored_payload(server.client().get(prefix + "swr:k"))
    finally:
        server.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_refresh_in_flight_does_not_hold_the_process_exit(
    redis_server: RedisServer, mode: str
) -> None:
    """A process whose 30 s refresh fetch is in flight exits at once; a short refresh lands.

    Pool threads used to be joined at exit (``ThreadPoolExecutor``), so the
    process waited for the fetch: 30 s here, for ever for a hung one.
    """
    repository = Path(__file__).resolve().parent.parent
    with subprocess.Popen(
        [sys.executable, "-m", "tests.support.exit_worker", redis_server.url, new_prefix(), mode],
        cwd=repository,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            lines = [process.stdout.readline().strip() for _ in range(2)]
            exiting = time.monotonic()
            code = process.wait(timeout=60)
            exit_s = time.monotonic() - exiting
        finally:
            process.kill()
        errors = process.stderr.read()
    assert code == 0, errors
    assert lines == ["quick refreshed 2", "exiting"]  # the short refresh landed first
    assert exit_s < 10  # 30 s before; well under a second on an idle machine
