"""Near cache: how long after a write in one process another process drops its copy.

A reader process keeps a near copy of one key; the harness process, as the
writer, takes the time and sends ``SET``; the reader's listener thread takes
the time when it has dropped the copy. Both read ``CLOCK_MONOTONIC``, which is
one clock for every process of a Linux machine, so the difference is the lag:
the write's trip to Redis, the invalidation's to the listener, and the wait for
the interpreter. Measured twice: with the reader idle (its main thread blocked
on a pipe), and with one CPU-bound thread in it, which the listener thread then
waits behind for up to the switch interval (5 ms by default).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson

from bench.common import MP, median, percentile, sync_client

KEY = "item:{name}"
PREFIX = "bench:near:"
FINAL = PREFIX + "item:k"


def _reader(port: int, pipe: Any, writes: int, busy: bool) -> None:  # pragma: no cover - child
    """In the reader process: keep a copy, tell the writer, time the drop; repeat."""
    import memofill  # noqa: PLC0415

    instance = memofill.Memofill(
        sync_client(port),
        prefix=PREFIX,
        policies={KEY: memofill.Dataset(KEY, ttl_s=600, near_ms=600_000)},
    )
    fetch = instance.cached_dataset(KEY)(lambda name: {"name": name})
    # The moment the listener has dropped the copy has no public hook: the store's own
    # invalidate is wrapped to take the time. Polling calls instead would time the poller,
    # and a busy main thread is what the "busy" case measures, not the "idle" one.
    store = instance.local_store
    dropped = threading.Event()
    drops: list[float] = []
    invalidate = store.invalidate

    def timed(keys: Any) -> None:
        invalidate(list(keys))
        drops.append(time.monotonic())
        dropped.set()

    store.invalidate = timed  # type: ignore[method-assign]
    stop = threading.Event()
    if busy:
        threading.Thread(target=_spin, args=(stop,), daemon=True).start()
    fetch("k")
    lags: list[float] = []
    for _ in range(writes):
        while fetch.call_with_outcome("k").outcome != "near_hit":
            time.sleep(0.001)  # the listener is not live yet, or the copy was just dropped
        dropped.clear()
        pipe.send("ready")
        written_at = pipe.recv()
        if not dropped.wait(timeout=10):
            raise RuntimeError("no invalidation arrived")
        lags.append((drops[-1] - written_at) * 1000)
    stop.set()
    instance.configure(memofill.NO_CLIENT)  # no client: the listener stops
    pipe.send(lags)


def _spin(stop: threading.Event) -> None:  # pragma: no cover - child
    while not stop.is_set():
        sum(range(1000))


def _one(port: int, writes: int, busy: bool) -> list[float]:
    ours, theirs = MP.Pipe()
    reader = MP.Process(target=_reader, args=(port, theirs, writes, busy), daemon=True)
    reader.start()
    writer = sync_client(port)
    try:
        for n in range(writes):
            if not ours.poll(60):
                raise RuntimeError("the reader did not get ready")
            ours.recv()
            written_at = time.monotonic()
            writer.set(FINAL, orjson.dumps({"name": "k", "write": n}), px=600_000)
            ours.send(written_at)
        if not ours.poll(60):
            raise RuntimeError("the reader did not report")
        lags: list[float] = ours.recv()
    finally:
        writer.close()
        reader.join(timeout=10)
    return lags


def measure(port: int, *, writes: int) -> dict[str, Any]:
    """Invalidation lag in ms (median, p99, max) with the reader idle and with a busy thread."""
    results: dict[str, Any] = {"writes": writes}
    for label, busy in (("idle", False), ("busy", True)):
        lags = sorted(_one(port, writes, busy))
        results[label] = {
            "median_ms": median(lags),
            "p99_ms": percentile(lags, 99),
            "max_ms": lags[-1],
        }
    return results


def render(data: dict[str, Any]) -> list[str]:
    """The report section."""
    rows = [
        f"| {label} | {data[key]['median_ms']:.2f} | {data[key]['p99_ms']:.2f} | "
        f"{data[key]['max_ms']:.2f} |"
        for label, key in (
            ("reader idle", "idle"),
            ("one CPU-bound thread in the reader", "busy"),
        )
    ]
    return [
        "",
        "## Near cache: invalidation lag between processes",
        "",
        f"{data['writes']} writes: the time from just before one process sends `SET` to "
        "another process's listener having dropped its copy (both on `CLOCK_MONOTONIC`). "
        "Targets: p99 ≤ 2 ms idle, ≤ 20 ms with a CPU-bound thread.",
        "",
        "| reader | median ms | p99 ms | max ms |",
        "|---|---:|---:|---:|",
        *rows,
    ]
