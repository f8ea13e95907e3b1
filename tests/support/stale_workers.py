"""Worker processes for the serve-stale tests on a real redis-server (started with ``spawn``).

Each worker builds its own :class:`~memofill.Memofill` on the server, calls one key
from several threads (or asyncio tasks) until a deadline, and returns every call:
when it began (wall clock), how long it took, its outcome, and the value's
``at`` (when the origin began fetching it) or the exception's type name. The
origin counts its calls in Redis (``INCR``), fails while ``<prefix>down`` is set,
and sleeps ``fetch_s``. Imports only memofill and redis-py, so a worker starts fast.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio

from memofill import CacheFill, Dataset, Memofill

KEY = "swr:{name}"


def dataset(spec: dict[str, Any]) -> Dataset:
    fill = CacheFill(**spec["fill"])
    return Dataset(
        KEY,
        ttl_s=spec["ttl_s"],
        stale_s=spec.get("stale_s", 0.0),
        stale_if_error_s=spec.get("stale_if_error_s", 0.0),
        cache_fill=fill,
    )


def origin_sync(client: redis.Redis, prefix: str, fetch_s: float) -> Any:
    def fetch(name: str) -> dict[str, Any]:
        at = time.time()
        client.incr(prefix + "origin")
        time.sleep(fetch_s)
        if client.exists(prefix + "down"):
            raise RuntimeError("origin down")
        return {"name": name, "at": at}

    return fetch


def _call(
    fetch: Any, calls: list[tuple[float, float, str, Any]], deadline: float, pause_s: float
) -> None:
    while time.time() < deadline:
        began, started = time.time(), time.perf_counter()
        try:
            result = fetch.call_with_outcome("k")
            calls.append((began, time.perf_counter() - started, result.outcome, result.value["at"]))
        except Exception as exc:  # the test asserts when errors may reach callers
            calls.append((began, time.perf_counter() - started, "raised", type(exc).__name__))
        time.sleep(pause_s)


def run_worker(
    url: str, prefix: str, spec: dict[str, Any], sync_points: tuple[Any, Any, Any]
) -> dict[str, Any]:
    """One process's callers (``spec["mode"]``: sync or async); their calls and counters."""
    mode = spec["mode"]
    ready, go, start = sync_points

    def wait_for_start() -> float:
        ready.wait(timeout=120)
        go.wait(timeout=120)
        time.sleep(max(0.0, start.value - time.time()))
        return float(start.value) + spec["duration_s"]

    deadline = 0.0
    calls: list[tuple[float, float, str, Any]] = []
    policies = {KEY: dataset(spec)}
    if mode == "async":

        async def main() -> dict[str, Any]:
            client = redis.asyncio.Redis.from_url(url)
            counter = redis.Redis.from_url(url)
            cache = Memofill(async_client=client, prefix=prefix, policies=policies)
            down = prefix + "down"

            async def fetch_async(name: str) -> dict[str, Any]:
                at = time.time()
                await client.incr(prefix + "origin")
                await asyncio.sleep(spec["fetch_s"])
                if await client.exists(down):
                    raise RuntimeError("origin down")
                return {"name": name, "at": at}

            fetch = cache.cached_dataset(KEY)(fetch_async)
            nonlocal deadline
            deadline = await asyncio.to_thread(wait_for_start)

            async def caller() -> None:
                while time.time() < deadline:
                    began, started = time.time(), time.perf_counter()
                    try:
                        result = await fetch.call_with_outcome("k")
                        calls.append(
                            (
                                began,
                                time.perf_counter() - started,
                                result.outcome,
                                result.value["at"],
                            )
                        )
                    except Exception as exc:
                        calls.append(
                            (began, time.perf_counter() - started, "raised", type(exc).__name__)
                        )
                    await asyncio.sleep(spec["pause_s"])

            await asyncio.gather(*(caller() for _ in range(spec["callers"])))
            await asyncio.gather(*cache.refreshes.tasks, return_exceptions=True)
            counter.close()
            await client.aclose()
            return cache.counters.snapshot().get(KEY, {})

        counts = asyncio.run(main())
        return {"calls": calls, "counts": counts}
    client = redis.Redis.from_url(url)
    cache = Memofill(client, prefix=prefix, policies=policies)
    fetch = cache.cached_dataset(KEY)(origin_sync(client, prefix, spec["fetch_s"]))
    deadline = wait_for_start()
    threads = [
        threading.Thread(target=_call, args=(fetch, calls, deadline, spec["pause_s"]))
        for _ in range(spec["callers"])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = time.monotonic() + 5
    while cache.refreshes.in_flight() and time.monotonic() < end:
        time.sleep(0.01)
    return {"calls": calls, "counts": cache.counters.snapshot().get(KEY, {})}


def run_fleet(
    url: str, prefix: str, spec: dict[str, Any], processes: int, before: Callable[[], Any]
) -> tuple[Any, list[dict[str, Any]]]:
    """``processes`` spawned workers; ``before()``'s result and the workers' results.

    ``before`` runs (a warm fill, say) once every worker is ready, however long
    spawning took on a busy machine; the workers start calling 0.3 s later.
    """
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        ready, go = manager.Barrier(processes + 1), manager.Event()
        start = manager.Value("d", 0.0)
        with context.Pool(processes) as pool:
            jobs = [
                pool.apply_async(run_worker, (url, prefix, spec, (ready, go, start)))
                for _ in range(processes)
            ]
            ready.wait(timeout=120)
            done_before = before()
            start.value = time.time() + 0.3
            go.set()
            return done_before, [job.get(timeout=120) for job in jobs]


def hold_a_refresh(url: str, prefix: str, spec: dict[str, Any], ready: Any) -> None:
    """Start a refresh whose fetch never ends (the test kills this process mid-fetch)."""
    client = redis.Redis.from_url(url)
    cache = Memofill(client, prefix=prefix, policies={KEY: dataset(spec)})

    def fetch(name: str) -> dict[str, Any]:
        ready.set()
        time.sleep(60)
        return {"name": name, "at": time.time()}

    cached = cache.cached_dataset(KEY)(fetch)
    assert cached.call_with_outcome("k").outcome == "stale_hit"
    time.sleep(60)
