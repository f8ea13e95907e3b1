"""Scenario 1: latency of one call on a hit, per row, against the raw floor measured alongside.

A hit is what a cache does almost all the time, so its overhead over a bare
``GET`` + decode is the price every caller pays. The rows are measured in one
process, interleaved in rounds (floor, A, B, ..., floor, A, B, ... in a new
shuffled order each round) so that drift in machine load falls on every row
alike, and each row's median is divided by the floor's median from the same
rounds (sync rows by the sync floor, asyncio rows by the asyncio floor).
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from bench import typed
from bench.common import in_child, median, percentile, small_value, sync_client
from bench.libraries import BY_SLUG, Cached, Library

NAME = "hit"


def _origin_sync(name: str) -> Any:
    return small_value(name)


async def _origin_async(name: str) -> Any:
    return small_value(name)


def _time_sync(call: Callable[[str], Any], count: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(count):
        started = clock()
        call(NAME)
        out.append(clock() - started)


async def _time_async(call: Callable[[str], Awaitable[Any]], count: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(count):
        started = clock()
        await call(NAME)
        out.append(clock() - started)


def _measure(
    *, port: int, slugs: list[str], rounds: int, per_round: int, warmup: int, seed: int
) -> dict[str, list[int]]:
    """In a fresh process: fill each row's key, warm up, then time rounds of hits."""
    loop = asyncio.new_event_loop()
    libraries = [BY_SLUG[slug] for slug in slugs]
    built: dict[str, Cached] = {}
    expected = small_value(NAME)
    raw = sync_client(port)
    for library in libraries:
        namespace = f"bench:hit:{library.slug}:"
        origin = _origin_async if library.is_async else _origin_sync
        built[library.slug] = library.make(port, namespace, origin)
        if not library.fills:
            raw.set(namespace + NAME, orjson.dumps(expected))
    raw.close()
    for cached in built.values():  # e.g. a near row's listener, live before any warm-up
        waiting = cached.ready() if cached.ready is not None else None
        if asyncio.iscoroutine(waiting):
            loop.run_until_complete(waiting)

    def run(library: Library, count: int, out: list[int]) -> None:
        call = built[library.slug].call
        if library.is_async:
            loop.run_until_complete(_time_async(call, count, out))
        else:
            _time_sync(call, count, out)

    for library in libraries:  # the first call fills; the rest warm connections and caches
        run(library, warmup, [])
        value = built[library.slug].call(NAME)
        if library.is_async:
            value = loop.run_until_complete(value)
        if value != expected:
            raise AssertionError(f"{library.slug} returned {value!r} on a hit")
    samples: dict[str, list[int]] = {library.slug: [] for library in libraries}
    order = list(libraries)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        gc.collect()
        for library in order:
            run(library, per_round, samples[library.slug])
    for cached in built.values():
        closing = cached.close()
        if asyncio.iscoroutine(closing):
            loop.run_until_complete(closing)
    loop.close()
    return samples


def measure(
    port: int,
    libraries: list[Library],
    *,
    iterations: int,
    warmup: int,
    rounds: int = 100,
    seed: int = 1,
) -> dict[str, Any]:
    """Time ``iterations`` hits per row; return per-row median, p99 (µs) and ratio to the floor."""
    slugs = [library.slug for library in libraries]
    per_round = max(1, iterations // rounds)
    samples = in_child(
        _measure,
        port=port,
        slugs=slugs,
        rounds=rounds,
        per_round=per_round,
        warmup=warmup,
        seed=seed,
    )
    rows: dict[str, dict[str, Any]] = {}
    for library in libraries:
        values = sorted(samples[library.slug])
        rows[library.slug] = {
            "calls": len(values),
            "median_us": median(values) / 1000,
            "p99_us": percentile(values, 99) / 1000,
        }
    for library in libraries:
        floor = rows.get("floor-async" if library.is_async else "floor-sync")
        row = rows[library.slug]
        row["ratio"] = row["median_us"] / floor["median_us"] if floor else None
    return {"iterations": per_round * rounds, "rounds": rounds, "warmup": warmup, "rows": rows}


# -- typed values: memofill's hit against the same library's own decode of the same bytes --------

#: Typed rows, each with the reference it is divided by: ``GET`` and the structuring
#: library alone (cattrs for a dataclass, pydantic for a model), and the plain-dict row
#: against ``GET`` + ``orjson.loads``.
TYPED_ROWS = {
    "memofill-dict": "floor-dict",
    "memofill-dataclass": "cattrs-dataclass",
    "memofill-pydantic": "pydantic-model",
}


def _headed(stored: bytes | None, body: bytes) -> bool:
    """Whether ``stored`` is ``body`` with memofill's header in front of it."""
    return stored is not None and len(stored) > len(body) and stored.endswith(body)


def _typed_calls(port: int) -> dict[str, Callable[[str], Any]]:
    """In the child: every typed row and reference, ready to call on a filled key."""
    import cattrs.preconf.orjson  # noqa: PLC0415  # the child's imports are its own
    import pydantic  # noqa: PLC0415

    import memofill  # noqa: PLC0415

    raw = sync_client(port)
    get, loads = raw.get, orjson.loads
    structure = cattrs.preconf.orjson.make_converter().get_structure_hook(typed.Quote)
    validate = pydantic.TypeAdapter(typed.QuoteModel).validate_json
    instance = memofill.Memofill(
        sync_client(port),
        prefix="bench:typed:",
        policies={"dict:{name}": memofill.Dataset("dict:{name}", ttl_s=600)}
        | {
            f"{kind}:{{name}}": memofill.Dataset(f"{kind}:{{name}}", ttl_s=600)
            for kind in ("dc", "pd")
        },
    )

    @instance.cached_dataset("dict:{name}")
    def plain(name: str) -> dict[str, Any]:
        return small_value(name)

    @instance.cached_dataset("dc:{name}")
    def dataclass_row(name: str) -> typed.Quote:
        return typed.quote(name)

    @instance.cached_dataset("pd:{name}")
    def pydantic_row(name: str) -> typed.QuoteModel:
        return typed.QuoteModel.model_validate(small_value(name))

    # The references read the same JSON without memofill's header in front of it: all
    # three rows store the JSON of small_value(), which is checked here.
    body = orjson.dumps(small_value(NAME))
    for function, kind in ((plain, "dict"), (dataclass_row, "dc"), (pydantic_row, "pd")):
        function(NAME)  # fills
        if not _headed(get(f"bench:typed:{kind}:{NAME}"), body):
            raise AssertionError(f"the {kind} row stored other bytes than a header and {body!r}")
        raw.set(f"bench:typed:ref:{kind}:{NAME}", body)
    return {
        "floor-dict": lambda name: loads(get("bench:typed:ref:dict:" + name)),
        "memofill-dict": plain,
        "cattrs-dataclass": lambda name: structure(
            loads(get("bench:typed:ref:dc:" + name)), typed.Quote
        ),
        "memofill-dataclass": dataclass_row,
        "pydantic-model": lambda name: validate(get("bench:typed:ref:pd:" + name)),
        "memofill-pydantic": pydantic_row,
    }


def _measure_typed(
    *, port: int, rounds: int, per_round: int, warmup: int, seed: int
) -> dict[str, list[int]]:
    """In a fresh process: fill, check each row returns its type, then time interleaved rounds."""
    calls = _typed_calls(port)
    for name, call in calls.items():
        for _ in range(warmup):
            call(NAME)
        value = call(NAME)
        if name.endswith("dict") and value != small_value(NAME):
            raise AssertionError(f"{name} returned {value!r}")
    if type(calls["memofill-dataclass"](NAME)) is not type(calls["cattrs-dataclass"](NAME)):
        raise AssertionError("the dataclass row returned another type than cattrs")
    if type(calls["memofill-pydantic"](NAME)) is not type(calls["pydantic-model"](NAME)):
        raise AssertionError("the pydantic row returned another type than pydantic")
    samples: dict[str, list[int]] = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        gc.collect()
        for name in order:
            _time_sync(calls[name], per_round, samples[name])
    return samples


def measure_typed(
    port: int, *, iterations: int, warmup: int, rounds: int = 100, seed: int = 1
) -> dict[str, Any]:
    """Time typed hits; each memofill row's ratio is over its library's own decode + ``GET``."""
    per_round = max(1, iterations // rounds)
    samples = in_child(
        _measure_typed, port=port, rounds=rounds, per_round=per_round, warmup=warmup, seed=seed
    )
    rows: dict[str, dict[str, Any]] = {}
    for name, values in samples.items():
        values.sort()
        rows[name] = {"median_us": median(values) / 1000, "p99_us": percentile(values, 99) / 1000}
    for name, reference in TYPED_ROWS.items():
        rows[name]["reference"] = reference
        rows[name]["ratio"] = rows[name]["median_us"] / rows[reference]["median_us"]
    return {"iterations": per_round * rounds, "rounds": rounds, "warmup": warmup, "rows": rows}


# -- fresh and stale hits: what the stored header and a stale window cost a hit -------------------

#: The rows, each divided by the raw floor measured in the same rounds.
HEADER_ROWS = ("floor", "memofill-fresh", "memofill-stale", "memofill-tagged")
#: Seconds the stale row's value is fresh: the setup then waits for it to be stale.
STALE_ROW_FRESH_S = 1


def _header_calls(port: int) -> dict[str, Callable[[str], Any]]:
    """In the child: the floor, a fresh hit (with its header) and a stale hit, ready to call.

    The stale row's value is fresh for 1 s and servable stale for an hour, and
    its lock is held by another token for an hour: once the value is past its
    freshness, the first stale hit tries the refresh once, finds the lock
    taken, and no later hit tries again (the busy memo), so every timed call is
    a stale hit that hands nothing off, which is what a stale hit costs while
    another process refreshes.
    """
    import memofill  # noqa: PLC0415  # the child's imports are its own

    raw = sync_client(port)
    get, loads = raw.get, orjson.loads
    hour_ms = 3_600_000
    instance = memofill.Memofill(
        sync_client(port),
        prefix="bench:header:",
        policies={
            "fresh:{name}": memofill.Dataset("fresh:{name}", ttl_s=600),
            "tagged:{name}": memofill.Dataset(
                "tagged:{name}", ttl_s=600, tags=("user:{name}", "catalog")
            ),
            "stale:{name}": memofill.Dataset(
                "stale:{name}",
                ttl_s=STALE_ROW_FRESH_S,
                stale_s=3600,
                cache_fill=memofill.CacheFill(
                    lease_ms=hour_ms,
                    wait_ms=3000,
                    poll_min_ms=10,
                    poll_max_ms=250,
                    refresh_retry_ms=hour_ms,
                ),
            ),
        },
    )

    @instance.cached_dataset("fresh:{name}")
    def fresh(name: str) -> dict[str, Any]:
        return small_value(name)

    @instance.cached_dataset("stale:{name}")
    def stale(name: str) -> dict[str, Any]:
        return small_value(name)

    @instance.cached_dataset("tagged:{name}")
    def tagged(name: str) -> dict[str, Any]:
        return small_value(name)

    instance.invalidate_tag("user:" + NAME)  # its mark is read, and passed, on every hit
    fresh(NAME)
    stale(NAME)
    tagged(NAME)
    if tagged.call_with_outcome(NAME).outcome != "hit":
        raise AssertionError("the tagged row's call was no hit")
    raw.set(instance.lock_key("stale:{name}", name=NAME), "another-process", px=hour_ms)
    raw.set("bench:header:floor:" + NAME, orjson.dumps(small_value(NAME)))
    if not _headed(get("bench:header:fresh:" + NAME), orjson.dumps(small_value(NAME))):
        raise AssertionError("the fresh row's value has no header")
    deadline = time.monotonic() + STALE_ROW_FRESH_S + 10
    outcome = "hit"
    while outcome == "hit" and time.monotonic() < deadline:  # until past its freshness
        time.sleep(0.05)
        outcome = stale.call_with_outcome(NAME).outcome
    if outcome != "stale_hit":
        raise AssertionError(f"the stale row's hit was {outcome!r}, not a stale_hit")
    return {
        "floor": lambda name: loads(get("bench:header:floor:" + name)),
        "memofill-fresh": fresh,
        "memofill-stale": stale,
        "memofill-tagged": tagged,
    }


def _measure_header(
    *, port: int, rounds: int, per_round: int, warmup: int, seed: int
) -> dict[str, list[int]]:
    """In a fresh process: set the rows up, check their values, then time interleaved rounds."""
    calls = _header_calls(port)
    for name, call in calls.items():
        for _ in range(warmup):
            call(NAME)
        if call(NAME) != small_value(NAME):
            raise AssertionError(f"{name} returned another value")
    samples: dict[str, list[int]] = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        gc.collect()
        for name in order:
            _time_sync(calls[name], per_round, samples[name])
    return samples


def measure_header(
    port: int, *, iterations: int, warmup: int, rounds: int = 100, seed: int = 1
) -> dict[str, Any]:
    """Time the floor, a fresh hit with its header and a stale hit; ratios over the floor."""
    per_round = max(1, iterations // rounds)
    samples = in_child(
        _measure_header, port=port, rounds=rounds, per_round=per_round, warmup=warmup, seed=seed
    )
    rows: dict[str, dict[str, Any]] = {}
    for name in HEADER_ROWS:
        values = sorted(samples[name])
        rows[name] = {"median_us": median(values) / 1000, "p99_us": percentile(values, 99) / 1000}
    for row in rows.values():
        row["ratio"] = row["median_us"] / rows["floor"]["median_us"]
    return {"iterations": per_round * rounds, "rounds": rounds, "warmup": warmup, "rows": rows}
