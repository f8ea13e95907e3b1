"""Several spawned processes paging over overlapping windows of one cold set of keys at once.

Each process runs :func:`page_once`: it makes its own instance (with a batch,
or without), waits on the barrier so that all call together, and puts whether
its page came back right on ``out``. The caller asserts what Redis recorded:
how often each key was fetched (:func:`fetched`) and how many batch calls ran.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import redis

from memofill import CacheFill, Dataset, Memofill

#: Seconds a process may take to start, page and answer.
PATIENCE_S = 60.0

#: The windows of the 40-key cold set the bulk tests page over: each key in one to four.
SYMBOLS = [f"K{n}" for n in range(40)]
WINDOWS = [SYMBOLS[0:20], SYMBOLS[10:30], SYMBOLS[20:40], SYMBOLS[5:35]]


#: The dataset the processes page over.
QUOTE = Dataset(
    "quote:{symbol}",
    ttl_s=300,
    cache_fill=CacheFill(lease_ms=10_000, wait_ms=8_000, poll_min_ms=5, poll_max_ms=100),
)


def page_together(port: int, prefix: str, *, batched: bool) -> list[bool]:
    """Run :func:`page_once` in one spawned process per window of :data:`WINDOWS`; their
    answers."""
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(len(WINDOWS)), context.Queue()
    processes = [
        context.Process(target=page_once, args=(port, prefix, window, barrier, out, batched))
        for window in WINDOWS
    ]
    for process in processes:
        process.start()
    try:
        return [out.get(timeout=PATIENCE_S) for _ in processes]
    finally:
        for process in processes:
            process.join(PATIENCE_S)


def fetched(client: Any, prefix: str) -> dict[str, int]:
    """How often each key was fetched, as the processes counted in ``<prefix>fetched``."""
    return {k.decode(): int(v) for k, v in client.hgetall(prefix + "fetched").items()}


def page_once(  # noqa: PLR0917  # a spawned process's arguments
    port: int, prefix: str, window: list[str], barrier: Any, out: Any, batched: bool
) -> None:
    """One process: its own instance (and batch); on the barrier, one many() over its window.

    Every fetch counts itself in Redis and takes long enough for the others to
    find the locks held.
    """
    client = redis.Redis(host="127.0.0.1", port=port)
    cache = Memofill(client, prefix=prefix, policies=[QUOTE])

    @cache.cached_dataset(QUOTE.key)
    def quote(symbol: str) -> dict[str, Any]:
        client.hincrby(prefix + "fetched", symbol, 1)
        time.sleep(0.05)
        return {"symbol": symbol}

    if batched:

        @quote.batch
        def quotes(symbols: list[str]) -> list[dict[str, Any]]:
            client.incr(prefix + "batches")
            for symbol in symbols:
                client.hincrby(prefix + "fetched", symbol, 1)
            time.sleep(0.05)
            return [{"symbol": s} for s in symbols]

    barrier.wait(PATIENCE_S)
    out.put(quote.many(window) == [{"symbol": s} for s in window])
