"""The near hit beside in-process caches: one process, the same rounds, the same value.

A near hit never leaves the process, so its peers are not Redis caches but the
memoizers an application would otherwise put in front of one: the standard
library's ``functools.lru_cache``, cachetools' ``TTLCache`` through its
``cached`` decorator (as documented, and with a lock, as threads need), and
theine's ``Memoize``. Each wraps the same origin and returns the same value
(:func:`bench.common.small_value`) for one warm key; memofill's row is the hit
scenario's ``memofill near (sync)`` row, a copy a tracking listener vouches for.
A function that only returns the value shows what the timing itself costs.

Measured as the hit scenario measures: in a fresh process, every call timed on
its own, the rows interleaved in rounds (a new random order each round), each
row's median divided by the cachetools decorator's median from the same rounds.
"""

from __future__ import annotations

import functools
import gc
import random
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bench.common import TTL_S, in_child, median, percentile, small_value
from bench.hit import NAME, _time_sync
from bench.libraries import BY_SLUG, NEAR_MS

#: Every in-process cache's bound; one key is ever used.
MAXSIZE = 10_000
#: The row every ratio is over.
REFERENCE = "cachetools"

#: Rows in table order, with how each is configured.
ROWS: dict[str, tuple[str, str]] = {
    "memofill-near": (
        "memofill near hit",
        f"`Memofill(client, ...)` with `Dataset('item:{{name}}', ttl_s={TTL_S}, "
        f"near_ms={NEAR_MS}, ...)`, default `NearCache()` (tracking listener, shared decoded "
        "objects); the copy is re-read from Redis once per `near_ms`",
    ),
    "lru_cache": ("`functools.lru_cache`", f"`@functools.lru_cache(maxsize={MAXSIZE:_})`"),
    "cachetools": (
        "cachetools `TTLCache`",
        f"`@cachetools.cached(cachetools.TTLCache(maxsize={MAXSIZE:_}, ttl={TTL_S}))`, "
        "no lock (its documented form; not safe across threads)",
    ),
    "cachetools-lock": (
        "cachetools `TTLCache`, locked",
        "the same with `lock=threading.Lock()`, as threads need",
    ),
    "theine": (
        "theine `Memoize`",
        f"`@theine.Memoize({MAXSIZE:_}, timedelta(seconds={TTL_S}))` with a key function "
        "(`@fetch.key`: `f'item:{name}'`, its recommended mode); thread-safe by default",
    ),
    "no-cache": (
        "no cache: a function returning the value",
        "`lambda name: value`: what the timing loop itself costs per call",
    ),
}


def _origin(name: str) -> Any:
    return small_value(name)


def _calls(port: int) -> tuple[dict[str, Callable[[str], Any]], Any]:
    """In the child: every row ready to call on its warm key, and memofill's ``Cached``."""
    import cachetools  # noqa: PLC0415  # the child's imports are its own
    import theine  # noqa: PLC0415

    near = BY_SLUG["memofill-near-sync"].make(port, "bench:near-peers:", _origin)
    assert near.ready is not None
    near.ready()

    theine_row = theine.Memoize(MAXSIZE, timedelta(seconds=TTL_S))(_origin)

    @theine_row.key
    def _theine_key(name: str) -> str:
        return f"item:{name}"

    value = small_value(NAME)
    calls: dict[str, Callable[[str], Any]] = {
        "memofill-near": near.call,
        "lru_cache": functools.lru_cache(maxsize=MAXSIZE)(_origin),
        "cachetools": cachetools.cached(cachetools.TTLCache(maxsize=MAXSIZE, ttl=TTL_S))(_origin),
        "cachetools-lock": cachetools.cached(
            cachetools.TTLCache(maxsize=MAXSIZE, ttl=TTL_S), lock=threading.Lock()
        )(_origin),
        "theine": theine_row,
        "no-cache": lambda name: value,
    }
    return calls, near


def _measure(*, port: int, rounds: int, per_round: int, warmup: int, seed: int) -> dict[str, Any]:
    """In a fresh process: fill and warm every row, then time interleaved rounds of hits."""
    calls, near = _calls(port)
    expected = small_value(NAME)
    for name, call in calls.items():
        for _ in range(warmup):  # the first call fills
            call(NAME)
        if call(NAME) != expected:
            raise AssertionError(f"{name} returned another value")
    near.outcomes()  # count the timed calls only
    samples: dict[str, list[int]] = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        gc.collect()
        for name in order:
            _time_sync(calls[name], per_round, samples[name])
    outcomes = near.outcomes()
    near.close()
    return {"samples": samples, "memofill_outcomes": outcomes}


def measure(
    port: int, *, iterations: int, warmup: int, rounds: int = 100, seed: int = 1
) -> dict[str, Any]:
    """Time ``iterations`` hits per row; per-row median, p99 (µs) and ratio to cachetools."""
    per_round = max(1, iterations // rounds)
    measured = in_child(
        _measure, port=port, rounds=rounds, per_round=per_round, warmup=warmup, seed=seed
    )
    rows: dict[str, dict[str, Any]] = {}
    for name, values in measured["samples"].items():
        values.sort()
        rows[name] = {"median_us": median(values) / 1000, "p99_us": percentile(values, 99) / 1000}
    for row in rows.values():
        row["ratio"] = row["median_us"] / rows[REFERENCE]["median_us"]
    return {
        "iterations": per_round * rounds,
        "rounds": rounds,
        "warmup": warmup,
        "rows": rows,
        "memofill_outcomes": measured["memofill_outcomes"],
    }


def render(data: dict[str, Any]) -> list[str]:
    """The report section."""
    counted = ", ".join(f"{name} {count:,}" for name, count in data["memofill_outcomes"].items())
    lines = [
        "",
        "### The near hit beside in-process caches (sync)",
        "",
        f"{data['iterations']:,} timed calls per row after {data['warmup']:,} warm-up calls, "
        f"interleaved in {data['rounds']} rounds (new random row order each round), one "
        "process, one warm key, the hit scenario's value. × cachetools: the row's median over "
        "the median of cachetools' `cached(TTLCache)` decorator in the same rounds. memofill's "
        f"timed calls by outcome: {counted}.",
        "",
        "| row | median µs | p99 µs | × cachetools |",
        "|---|---:|---:|---:|",
    ]
    for name, (label, _) in ROWS.items():
        row = data["rows"][name]
        lines.append(
            f"| {label} | {row['median_us']:.2f} | {row['p99_us']:.2f} | {row['ratio']:.2f} |"
        )
    lines += ["", "How each row is configured:", ""]
    lines += [f"- **{label}**: {setup}" for label, setup in ROWS.values()]
    return [*lines, ""]
