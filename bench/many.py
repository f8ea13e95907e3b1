"""A page of 50 cached values, all hits: ``fn.many()`` against the raw ``MGET`` floor and peers.

A listing page shows many cached items at once; what it costs is one read of
all their keys. In one fresh process every row reads the same 50 values
(about 400 bytes of JSON each), interleaved in rounds in a new random order so
that drift in machine load falls on every row alike:

- ``raw MGET``: one ``MGET`` and 50 ``orjson.loads``, the floor of any bulk read;
- ``memofill many()``: ``quote.many(names)``;
- ``memofill, 50 calls``: the same page as 50 single calls;
- ``dogpile.cache``: ``@region.cache_multi_on_arguments()``, its bulk decorator
  (``get_multi``, then a fill of what it missed);
- ``cashews get_many``: its bulk read of keys (it has no bulk decorator).

Each median is divided by the floor of the same mode (blocking or asyncio).

A second table fills cold pages (new keys every page, an upstream that costs
nothing, so what is timed is the cache's own work): one ``MGET`` and one
pipelined ``SET`` of 50 values with no coordination is the floor; beside it
``many()`` with a batch (locks, one batch call, writes, releases),
``many()`` filling each key with the single function, and dogpile.cache's
bulk decorator, whose creator gets every missing key at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import orjson

from bench.common import (
    CLIENT_OPTIONS,
    HOST,
    TTL_S,
    async_client,
    in_child,
    interleaved,
    median,
    percentile,
    small_value,
    sync_client,
)
from bench.libraries import dogpile_region

#: Keys per page.
PAGE = 50
#: The rows, with their mode: each is divided by its mode's floor.
ROWS = {
    "raw MGET": "sync",
    "memofill many()": "sync",
    "memofill, 50 calls": "sync",
    "dogpile.cache multi": "sync",
    "raw MGET (asyncio)": "asyncio",
    "memofill many() (asyncio)": "asyncio",
    "cashews get_many": "asyncio",
}
FLOORS = {"sync": "raw MGET", "asyncio": "raw MGET (asyncio)"}
#: The page's worst ratio to the floor that memofill's many() aims for.
TARGET_X = 1.3


def _rows(port: int, loop: asyncio.AbstractEventLoop) -> dict[str, Callable[[], Any]]:
    """In the child: each row's read of one page, filled first, ready to call."""
    from memofill import CacheFill, Dataset, Memofill  # noqa: PLC0415

    names = [f"item{n}" for n in range(PAGE)]
    expected = [small_value(name) for name in names]
    rows: dict[str, Callable[[], Any]] = {}

    raw = sync_client(port)
    raw_keys = [f"bench:many:raw:{name}" for name in names]
    raw.mset({key: orjson.dumps(value) for key, value in zip(raw_keys, expected, strict=True)})
    rows["raw MGET"] = lambda: [orjson.loads(b) for b in raw.mget(raw_keys)]

    dataset = Dataset(
        "bench:many:{name}",
        ttl_s=TTL_S,
        cache_fill=CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=250),
    )
    cache = Memofill(sync_client(port), prefix="s:", policies=[dataset], meta_check_ms=60_000)
    quote = cache.cached_dataset(dataset.key)(small_value)
    quote.many(names)
    rows["memofill many()"] = lambda: quote.many(names)
    rows["memofill, 50 calls"] = lambda: [quote(name) for name in names]

    region = dogpile_region(port)

    @region.cache_multi_on_arguments(namespace="bench:many:dogpile")
    def dogpile_page(*page: str) -> list[Any]:
        return [small_value(name) for name in page]

    dogpile_page(*names)
    rows["dogpile.cache multi"] = lambda: dogpile_page(*names)

    araw = async_client(port)

    async def raw_async() -> list[Any]:
        return [orjson.loads(b) for b in await araw.mget(raw_keys)]

    acache = Memofill(async_client(port), prefix="a:", policies=[dataset], meta_check_ms=60_000)

    async def origin(name: str) -> Any:
        return small_value(name)

    aquote = acache.cached_dataset(dataset.key)(origin)
    loop.run_until_complete(aquote.many(names))

    from cashews import Cache  # noqa: PLC0415

    cashews = Cache(name="bench-many")
    cashews.setup(f"redis://{HOST}:{port}/0", pickle_type="json", **CLIENT_OPTIONS)
    cashews_keys = [f"bench:many:cashews:{name}" for name in names]

    async def fill_cashews() -> None:
        for key, value in zip(cashews_keys, expected, strict=True):
            await cashews.set(key, value, expire=TTL_S)

    loop.run_until_complete(fill_cashews())

    async def cashews_page() -> list[Any]:
        return list(await cashews.get_many(*cashews_keys))

    for name, call in (
        ("raw MGET (asyncio)", raw_async),
        ("memofill many() (asyncio)", lambda: aquote.many(names)),
        ("cashews get_many", cashews_page),
    ):
        rows[name] = _blocking(loop, call)
    for name, call in rows.items():
        if call() != expected:
            raise AssertionError(f"{name} did not return the page")
    return rows


#: The cold rows: each fills a page of new keys.
COLD_ROWS = (
    "raw MGET + SET",
    "memofill many() + batch",
    "memofill many(), single fills",
    "dogpile.cache multi",
)


def _cold_rows(port: int) -> dict[str, Callable[[], Any]]:
    """In the child: each cold row's fill of one page of new keys, ready to call."""
    from memofill import CacheFill, Dataset, Memofill  # noqa: PLC0415

    pages = itertools.count()

    def fresh(row: str) -> list[str]:
        page = next(pages)
        return [f"{row}{page}-{n}" for n in range(PAGE)]

    raw = sync_client(port)

    def raw_page() -> list[Any]:
        keys = [f"bench:cold:raw:{name}" for name in fresh("r")]
        assert raw.mget(keys) == [None] * PAGE
        values = [small_value(key) for key in keys]
        pipe = raw.pipeline(transaction=False)
        for key, value in zip(keys, values, strict=True):
            pipe.set(key, orjson.dumps(value), px=TTL_S * 1000)
        pipe.execute()
        return values

    dataset = Dataset(
        "bench:cold:{name}",
        ttl_s=TTL_S,
        cache_fill=CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=250),
    )
    batched = Memofill(sync_client(port), prefix="b:", policies=[dataset], meta_check_ms=60_000)
    quote = batched.cached_dataset(dataset.key)(small_value)
    quote.batch(lambda names: [small_value(name) for name in names])
    single = Memofill(sync_client(port), prefix="c:", policies=[dataset], meta_check_ms=60_000)
    one_by_one = single.cached_dataset(dataset.key)(small_value)
    region = dogpile_region(port)

    @region.cache_multi_on_arguments(namespace="bench:cold:dogpile")
    def dogpile_page(*page: str) -> list[Any]:
        return [small_value(name) for name in page]

    return {
        "raw MGET + SET": raw_page,
        "memofill many() + batch": lambda: quote.many(fresh("b")),
        "memofill many(), single fills": lambda: one_by_one.many(fresh("s")),
        "dogpile.cache multi": lambda: dogpile_page(*fresh("d")),
    }


def _measure_cold(*, port: int, rounds: int, per_round: int, seed: int) -> dict[str, list[int]]:
    rows = _cold_rows(port)
    for call in rows.values():
        if len(call()) != PAGE:
            raise AssertionError("a cold row did not return its page")
    return interleaved(rows, rounds=rounds, per_round=per_round, seed=seed)


def _blocking(loop: asyncio.AbstractEventLoop, call: Callable[[], Any]) -> Callable[[], Any]:
    return lambda: loop.run_until_complete(call())


def _measure(*, port: int, rounds: int, per_round: int, seed: int) -> dict[str, list[int]]:
    loop = asyncio.new_event_loop()
    rows = _rows(port, loop)
    return interleaved(rows, rounds=rounds, per_round=per_round, seed=seed)


def measure(port: int, *, iterations: int, rounds: int = 40, seed: int = 1) -> dict[str, Any]:
    """Median and p99 µs per page of each row, and its ratio to its mode's floor."""
    per_round = max(1, iterations // rounds)
    samples = in_child(_measure, port=port, rounds=rounds, per_round=per_round, seed=seed)
    medians = {name: median(values) / 1000 for name, values in samples.items()}
    cold_per_round = max(1, per_round // 10)
    cold = in_child(_measure_cold, port=port, rounds=rounds, per_round=cold_per_round, seed=seed)
    cold_medians = {name: median(values) / 1000 for name, values in cold.items()}
    return {
        "cold_pages": cold_per_round * rounds,
        "cold": {
            name: {
                "median_us": cold_medians[name],
                "p99_us": percentile(sorted(cold[name]), 99) / 1000,
                "x_floor": cold_medians[name] / cold_medians[COLD_ROWS[0]],
            }
            for name in COLD_ROWS
        },
        "pages": per_round * rounds,
        "rows": {
            name: {
                "mode": ROWS[name],
                "median_us": medians[name],
                "p99_us": percentile(sorted(samples[name]), 99) / 1000,
                "x_floor": medians[name] / medians[FLOORS[ROWS[name]]],
            }
            for name in ROWS
        },
    }


def render(data: dict[str, Any]) -> list[str]:
    """The report's section."""
    lines = [
        "",
        f"## A page of {PAGE} hits: many() against MGET",
        "",
        f"{data['pages']:,} pages per row, interleaved, each reading the same {PAGE} values "
        "(about 400 bytes of JSON each). *× floor*: the median over the median of one raw "
        f"`MGET` + {PAGE} `orjson.loads` of the same mode. memofill's target: many() ≤ "
        f"{TARGET_X}× the floor.",
        "",
        "| row | mode | median µs | p99 µs | × floor |",
        "|---|---|---:|---:|---:|",
    ]
    for name, row in data["rows"].items():
        lines.append(
            f"| {name} | {row['mode']} | {row['median_us']:.0f} | {row['p99_us']:.0f} | "
            f"{row['x_floor']:.2f} |"
        )
    if "cold" in data:
        lines += [
            "",
            f"## A cold page of {PAGE}: the fills",
            "",
            f"{data['cold_pages']:,} pages per row, interleaved, each of {PAGE} new keys; the "
            "upstream costs nothing, so each row's time is the cache's own work. *× floor*: "
            f"over one `MGET` and one pipelined `SET` of the {PAGE} values, uncoordinated.",
            "",
            "| row | median µs | p99 µs | × floor |",
            "|---|---:|---:|---:|",
        ]
        for name, row in data["cold"].items():
            lines.append(
                f"| {name} | {row['median_us']:.0f} | {row['p99_us']:.0f} | {row['x_floor']:.2f} |"
            )
    return [*lines, ""]
