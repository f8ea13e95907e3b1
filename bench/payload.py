"""Scenario 4: large payloads (2 MB and 20 MB): fill and hit time, and peak memory.

Values of many megabytes are normal for the datasets memofill serves. What a
library adds on top of the unavoidable work shows here: extra copies of the
bytes, string re-encoding, metadata wrapped around the payload.

*Time*: in one fresh process per size, rounds interleave every row with the
raw reference, each on a new key: a cold call (the fill; the origin returns a
prebuilt value, so the time is the library's own) then hits on that key. Raw
fill is ``orjson.dumps`` + ``SET``; raw hit is ``GET`` + ``orjson.loads``: the
work any JSON cache must do.

*Memory*: each measurement runs in its own fresh process, so one row's garbage
cannot hide another's peak. The process builds what it needs, makes one small
call first (connections, scripts and lazy imports are not what is measured),
then reads its resident set, makes the one large call, and reads its peak
(``ru_maxrss``). The difference is reported as a multiple of the payload's size.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import random
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.common import (
    TTL_S,
    async_client,
    current_rss_kb,
    in_child,
    large_value,
    median,
    peak_rss_kb,
    small_value,
    sync_client,
)
from bench.libraries import BY_SLUG, Cached, Library

#: The raw references, by whether they use the asyncio client.
RAW = {"raw-sync": False, "raw-async": True}
#: A small value fetched first in each memory measurement, so set-up is already paid.
TINY = "tiny"


def _namespace(entry: str) -> str:
    return f"bench:payload:{entry}:"


def _is_async(entry: str) -> bool:
    return RAW[entry] if entry in RAW else BY_SLUG[entry].is_async


def _reference(entry: str) -> str:
    """The raw reference a row is compared with: the one of its own mode."""
    return "raw-async" if _is_async(entry) else "raw-sync"


def _origin_for(value: Any, is_async: bool) -> Callable[[str], Any]:
    """The origin returns the prebuilt large value for every name but :data:`TINY`."""

    def answer(name: str) -> Any:
        if name == TINY:
            return small_value(name)
        if value is None:
            raise AssertionError(f"the origin was called for {name!r}, where a hit was expected")
        return value

    if not is_async:
        return answer

    async def answer_async(name: str) -> Any:
        return answer(name)

    return answer_async


class _Entry:
    """A row, or a raw reference, as two operations: fill a cold key, read a warm one.

    The raw references do only what any JSON cache must: ``orjson.dumps`` +
    ``SET`` to fill, ``GET`` + ``orjson.loads`` on a hit.
    """

    def __init__(self, entry: str, port: int, value: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.value = value
        self.key = _namespace(entry)
        self.cached: Cached | None = None
        self.client: Any = None
        if entry in RAW:
            self.client = async_client(port) if RAW[entry] else sync_client(port)
        else:
            library = BY_SLUG[entry]
            origin = _origin_for(value, library.is_async)
            self.cached = library.make(port, self.key, origin)

    def _wait(self, result: Any) -> Any:
        return self.loop.run_until_complete(result) if inspect.isawaitable(result) else result

    def fill(self, name: str) -> Any:
        if self.cached is None:
            return self._wait(self.client.set(self.key + name, orjson.dumps(self.value), ex=TTL_S))
        return self._wait(self.cached.call(name))

    def hit(self, name: str) -> Any:
        if self.cached is None:
            raw = self._wait(self.client.get(self.key + name))
            return None if raw is None else orjson.loads(raw)
        return self._wait(self.cached.call(name))

    def warm(self) -> None:
        """One small call first: connections, scripts and lazy imports are not what is measured."""
        if self.cached is None:
            self._wait(self.client.set(self.key + TINY, b"{}", ex=TTL_S))
        else:
            self.hit(TINY)  # a small fill

    def close(self) -> None:
        closing = self.client.close() if self.cached is None else self.cached.close()
        self._wait(closing)


def _time(
    *, port: int, entries: list[str], size: int, rounds: int, hits: int, seed: int
) -> dict[str, Any]:
    """In a fresh process: interleaved rounds of fill + hits per entry; median times in ms."""
    value = large_value(size)
    payload_bytes = len(orjson.dumps(value))
    loop = asyncio.new_event_loop()
    built = {entry: _Entry(entry, port, value, loop) for entry in entries}
    for prepared in built.values():
        prepared.warm()
    fills: dict[str, list[float]] = {entry: [] for entry in entries}
    reads: dict[str, list[float]] = {entry: [] for entry in entries}
    admin = sync_client(port)
    order = list(entries)
    rng = random.Random(seed)
    for round_index in range(rounds):
        rng.shuffle(order)
        for entry in order:
            name = f"round-{round_index}"
            gc.collect()
            started = time.perf_counter()
            built[entry].fill(name)
            fills[entry].append((time.perf_counter() - started) * 1000)
            for _ in range(hits):
                gc.collect()
                started = time.perf_counter()
                got = built[entry].hit(name)
                reads[entry].append((time.perf_counter() - started) * 1000)
            if round_index == 0 and got != value:
                raise AssertionError(f"{entry} returned a different value on a hit")
            del got
        admin.flushdb()
    for prepared in built.values():
        prepared.close()
    admin.close()
    loop.close()
    return {
        "payload_bytes": payload_bytes,
        "fill_ms": {entry: median(fills[entry]) for entry in entries},
        "hit_ms": {entry: median(reads[entry]) for entry in entries},
    }


def _peak(*, port: int, entry: str, size: int, phase: str) -> dict[str, int]:
    """In a fresh process: how far one large fill (or hit) raises the peak over the resident set.

    Also returns what stays resident while the result is still held (for a hit:
    the decoded value, which any JSON cache must build).
    """
    loop = asyncio.new_event_loop()
    value = large_value(size) if phase == "fill" else None
    prepared = _Entry(entry, port, value, loop)
    prepared.warm()
    gc.collect()
    before = current_rss_kb()
    result = prepared.fill("large") if phase == "fill" else prepared.hit("large")
    peak = peak_rss_kb()
    held = current_rss_kb()
    if phase == "hit" and not result:
        raise AssertionError(f"{entry}: no value under the large key")
    del result
    prepared.close()
    loop.close()
    return {
        "before_kb": before,
        "peak_kb": peak,
        "growth_kb": max(0, peak - before),
        "held_kb": max(0, held - before),
    }


def measure(
    port: int, libraries: list[Library], *, sizes: list[int], rounds: int, hits: int, seed: int = 1
) -> dict[str, Any]:
    """Time and memory per size for the raw reference and each row that fills."""
    entries = [*RAW, *(lib.slug for lib in libraries if lib.fills and not lib.hit_only)]
    admin = sync_client(port)
    results: dict[str, Any] = {}
    for size in sizes:
        admin.flushdb()
        timing = in_child(
            _time, port=port, entries=entries, size=size, rounds=rounds, hits=hits, seed=seed
        )
        payload_bytes = timing["payload_bytes"]
        memory: dict[str, dict[str, Any]] = {}
        for entry in entries:
            fill = in_child(_peak, port=port, entry=entry, size=size, phase="fill")
            hit = in_child(_peak, port=port, entry=entry, size=size, phase="hit")
            memory[entry] = {"fill": fill, "hit": hit}
        admin.flushdb()
        rows = {}
        for entry in entries:
            reference = _reference(entry)
            rows[entry] = {
                "fill_ms": timing["fill_ms"][entry],
                "hit_ms": timing["hit_ms"][entry],
                "fill_ratio": timing["fill_ms"][entry] / timing["fill_ms"][reference],
                "hit_ratio": timing["hit_ms"][entry] / timing["hit_ms"][reference],
                "fill_peak_x": memory[entry]["fill"]["growth_kb"] * 1024 / payload_bytes,
                "hit_peak_x": memory[entry]["hit"]["growth_kb"] * 1024 / payload_bytes,
                "memory": memory[entry],
            }
        results[str(size)] = {"payload_bytes": payload_bytes, "rows": rows}
    admin.close()
    return {"rounds": rounds, "hits_per_round": hits, "sizes": results}
