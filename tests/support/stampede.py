"""A stampede of real processes on one cold key, for the real-Redis tests and their numbers.

Each of ``processes`` spawned interpreters builds its own
:class:`~memofill.Memofill` and opens its connections, says it is ready, then
releases ``threads`` callers of one cached function on a barrier the test
process holds the last place in, so the test can read ``INFO commandstats``
after every process has set up and before any caller runs. The fetch counts
itself with ``INCR`` in Redis, so the count covers every process.

This module imports only memofill and redis-py: a spawned process starts fast.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import Counter
from typing import Any

import attrs
import redis

from memofill import CacheFill, Dataset, Memofill

#: The dataset every stampede fills.
DATASET = Dataset(
    "stampede:{name}",
    ttl_s=60,
    negative_ttl_s=10,
    cache_fill=CacheFill(lease_ms=10_000, wait_ms=8_000, poll_min_ms=10, poll_max_ms=200),
)
#: How long a process may take to start, and the whole stampede to finish, before the test fails.
PATIENCE_S = 60.0


def origin_key(prefix: str) -> str:
    return prefix + "origin-calls"


@attrs.frozen
class Spec:
    """One stampede: the server, the key prefix, callers per process, how long the fetch takes."""

    port: int
    prefix: str
    threads: int
    fetch_s: float


def caller_process(spec: Spec, ready: Any, barrier: Any, results: Any) -> None:
    """One process of the stampede: ``threads`` callers of one cached function, on the barrier."""
    port, prefix, threads, fetch_s = spec.port, spec.prefix, spec.threads, spec.fetch_s
    client = redis.Redis(host="127.0.0.1", port=port)
    mf = Memofill(client, prefix=prefix, policies={DATASET.key: DATASET})

    @mf.cached_dataset(DATASET.key)
    def fetch(name: str) -> dict[str, Any]:
        client.incr(origin_key(prefix))
        time.sleep(fetch_s)
        return {"name": name, "filled_by": os.getpid()}

    # Open every connection now, so the stampede's command count is memofill's alone.
    pool = client.connection_pool
    connections = [pool.get_connection() for _ in range(threads + 1)]
    for connection in connections:
        pool.release(connection)

    seen: list[tuple[str, Any]] = []

    def call() -> None:
        barrier.wait(PATIENCE_S)
        try:
            result = fetch.call_with_outcome("hot")
            seen.append((result.outcome, result.value))
        except Exception as exc:  # reported to the test, which fails on it
            seen.append(("raised", repr(exc)))

    callers = [threading.Thread(target=call) for _ in range(threads)]
    for caller in callers:
        caller.start()
    ready.put(os.getpid())
    for caller in callers:
        caller.join()
    results.put(seen)
    client.close()


@attrs.frozen
class StampedeResult:
    """What every caller saw, how often the origin ran, and the commands Redis executed."""

    seen: list[tuple[str, Any]]
    origin_calls: int
    commands: Counter[str]

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(outcome for outcome, _ in self.seen)


def command_counts(client: redis.Redis) -> Counter[str]:
    """``INFO commandstats`` as a counter of command name -> calls."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()})


def run_stampede(
    port: int, prefix: str, processes: int, threads: int, fetch_s: float = 0.3
) -> StampedeResult:
    """Run one stampede against the server on ``port``; every process is gone when it returns."""
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    barrier = context.Barrier(processes * threads + 1)
    workers = [
        context.Process(
            target=caller_process,
            args=(Spec(port, prefix, threads, fetch_s), ready, barrier, results),
            daemon=True,
        )
        for _ in range(processes)
    ]
    observer = redis.Redis(host="127.0.0.1", port=port)
    try:
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=PATIENCE_S)  # a process that fails to start fails the test here
        before = command_counts(observer)
        barrier.wait(PATIENCE_S)
        seen = [item for _ in workers for item in results.get(timeout=PATIENCE_S)]
        after = command_counts(observer)
        for worker in workers:
            worker.join(PATIENCE_S)
        after.subtract(before)
        after["info"] -= 1  # the second INFO itself
        commands = Counter({name: calls for name, calls in after.items() if calls > 0})
        origin_calls = int(observer.get(origin_key(prefix)) or 0)
        return StampedeResult(seen, origin_calls, commands)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
        ready.close()
        results.close()
        observer.close()
