"""One small adapter per row: each turns an origin into a cached ``fetch(name)``.

Scenarios are written once against :class:`Library`; what differs between rows
is only how each library is configured, which is spelled out here and repeated
in the table notes (:attr:`Library.setup`). Every row talks to the same server
with the same client options (:data:`bench.common.CLIENT_OPTIONS`), stores JSON
(orjson wherever the library lets the caller choose the codec) and keeps values
for :data:`bench.common.TTL_S`. Each library's documented decorator is used, so
its key building is part of what is measured, as it is for its users.

The peers are imported inside their adapters: a worker process loads only the
library of its own row, and a run restricted to some rows needs only those.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.common import CLIENT_OPTIONS, HOST, TTL_S, async_client, sync_client

#: What an adapter caches: ``origin(name)`` returns the value, or an awaitable of it.
Origin = Callable[[str], Any]

#: memofill's dataset for every benchmark: the policy the issue prescribes.
DATASET = "item:{name}"


def _no_outcomes() -> dict[str, int]:
    return {}


@dataclass
class Cached:
    """A cached ``fetch(name)`` built by one library.

    ``call`` returns the value (or, for asyncio rows, an awaitable of it);
    ``close`` releases the connections (possibly awaitable); ``outcomes`` returns
    and resets the library's own per-call outcome counts, where it keeps any.
    """

    call: Callable[[str], Any]
    close: Callable[[], Any]
    outcomes: Callable[[], dict[str, int]] = field(default=_no_outcomes)


@dataclass(frozen=True)
class Library:
    """One row of the tables."""

    #: Stable identifier, also used in Redis key prefixes and the JSON dump.
    slug: str
    #: The row label (the library, without the mode).
    family: str
    is_async: bool
    #: ``False`` for the raw floor: it only reads, so it has no stampede or fill rows.
    fills: bool
    #: ``make(port, namespace, origin)``: every key the result touches starts with ``namespace``.
    make: Callable[[int, str, Origin], Cached]
    #: How the row is configured, for the table notes.
    setup: str
    #: Measured in the hit scenario only (a variant of another row's configuration).
    hit_only: bool = False

    @property
    def mode(self) -> str:
        return "asyncio" if self.is_async else "sync"

    @property
    def label(self) -> str:
        return f"{self.family} ({self.mode})"


# -- the raw floor: what any Redis cache must do on a hit, with no library around it ------------


def _floor_sync(port: int, namespace: str, origin: Origin) -> Cached:
    client = sync_client(port)
    get, loads = client.get, orjson.loads

    def call(name: str) -> Any:
        raw = get(namespace + name)
        return None if raw is None else loads(raw)

    return Cached(call, client.close)


def _floor_async(port: int, namespace: str, origin: Origin) -> Cached:
    client = async_client(port)
    get, loads = client.get, orjson.loads

    async def call(name: str) -> Any:
        raw = await get(namespace + name)
        return None if raw is None else loads(raw)

    return Cached(call, client.aclose)


# -- plain cache-aside: GET, and on a miss fetch and SET; no coordination at all ----------------


def _cache_aside_sync(port: int, namespace: str, origin: Origin) -> Cached:
    client = sync_client(port)

    def cached(function: Callable[[str], Any]) -> Callable[[str], Any]:
        @functools.wraps(function)
        def wrapper(name: str) -> Any:
            key = namespace + name
            raw = client.get(key)
            if raw is not None:
                return orjson.loads(raw)
            value = function(name)
            client.set(key, orjson.dumps(value), ex=TTL_S)
            return value

        return wrapper

    @cached
    def fetch(name: str) -> Any:
        return origin(name)

    return Cached(fetch, client.close)


def _cache_aside_async(port: int, namespace: str, origin: Origin) -> Cached:
    client = async_client(port)

    def cached(function: Callable[[str], Awaitable[Any]]) -> Callable[[str], Awaitable[Any]]:
        @functools.wraps(function)
        async def wrapper(name: str) -> Any:
            key = namespace + name
            raw = await client.get(key)
            if raw is not None:
                return orjson.loads(raw)
            value = await function(name)
            await client.set(key, orjson.dumps(value), ex=TTL_S)
            return value

        return wrapper

    @cached
    async def fetch(name: str) -> Any:
        return await origin(name)

    return Cached(fetch, client.aclose)


# -- dogpile.cache: Redis backend with its distributed lock (sync only) --------------------------


def _dogpile(port: int, namespace: str, origin: Origin) -> Cached:
    from dogpile.cache import make_region  # noqa: PLC0415 (see the module docstring)

    region = make_region(serializer=orjson.dumps, deserializer=orjson.loads).configure(
        "dogpile.cache.redis",
        expiration_time=TTL_S,
        arguments={
            "host": HOST,
            "port": port,
            "db": 0,
            "redis_expiration_time": TTL_S,
            "distributed_lock": True,
            "thread_local_lock": False,  # required with distributed_lock
            "connection_kwargs": dict(CLIENT_OPTIONS),
        },
    )

    @region.cache_on_arguments(namespace=namespace)
    def fetch(name: str) -> Any:
        return origin(name)

    return Cached(fetch, region.backend.writer_client.close)


# -- cashews: @cache(..., lock=True) (asyncio only) ----------------------------------------------


def _cashews(port: int, namespace: str, origin: Origin) -> Cached:
    from cashews import Cache  # noqa: PLC0415

    cache = Cache(name=namespace)
    cache.setup(f"redis://{HOST}:{port}/0", pickle_type="json", **CLIENT_OPTIONS)

    @cache(ttl=TTL_S, key=namespace + "{name}", lock=True)
    async def fetch(name: str) -> Any:
        return await origin(name)

    return Cached(fetch, cache.close)


# -- aiocache: @cached_stampede with a Redis cache (asyncio only) --------------------------------


def _aiocache(port: int, namespace: str, origin: Origin) -> Cached:
    from aiocache import Cache, cached_stampede  # type: ignore[import-untyped]  # noqa: PLC0415
    from aiocache.serializers import (  # type: ignore[import-untyped]  # noqa: PLC0415
        BaseSerializer,
    )

    class OrjsonSerializer(BaseSerializer):  # type: ignore[misc]
        """aiocache's documented extension point for codecs; bytes in and out."""

        DEFAULT_ENCODING = None

        def dumps(self, value: Any) -> bytes:
            return orjson.dumps(value)

        def loads(self, value: bytes | None) -> Any:
            return None if value is None else orjson.loads(value)

    @cached_stampede(  # type: ignore[untyped-decorator]
        lease=2,  # the documented default, well above the 200 ms origin
        ttl=TTL_S,
        cache=Cache.REDIS,
        serializer=OrjsonSerializer(),
        namespace=namespace,
        key_builder=lambda function, name: name,
        endpoint=HOST,
        port=port,
        pool_max_size=CLIENT_OPTIONS["max_connections"],  # aiocache sets this one itself
        connection_pool_kwargs={k: v for k, v in CLIENT_OPTIONS.items() if k != "max_connections"},
    )
    async def fetch(name: str) -> Any:
        return await origin(name)

    return Cached(fetch, fetch.cache.close)


# -- memofill: the dataset policy the issue prescribes -------------------------------------------


def _memofill(
    client: Any,
    namespace: str,
    origin: Origin,
    is_async: bool,
    wire: Callable[[Any], object] | None = None,
) -> Cached:
    """memofill's row; ``wire(instance)``, when given, adds to the instance (exporters)."""
    import memofill  # noqa: PLC0415

    fill = memofill.CacheFill(lease_ms=5000, wait_ms=3000, poll_min_ms=10, poll_max_ms=250)
    instance = memofill.Memofill(
        client,
        prefix=namespace,
        policies={DATASET: memofill.Dataset(DATASET, ttl_s=TTL_S, cache_fill=fill)},
    )
    if wire is not None:
        wire(instance)

    def outcomes() -> dict[str, int]:
        counts = instance.counters.snapshot().get(DATASET, {})
        instance.counters.reset()
        return counts

    if is_async:

        @instance.cached_dataset(DATASET)
        async def fetch_async(name: str) -> Any:
            return await origin(name)

        return Cached(fetch_async, client.aclose, outcomes)

    @instance.cached_dataset(DATASET)
    def fetch(name: str) -> Any:
        return origin(name)

    return Cached(fetch, client.close, outcomes)


def _memofill_sync(port: int, namespace: str, origin: Origin) -> Cached:
    return _memofill(sync_client(port), namespace, origin, is_async=False)


#: How often the exported row's exporters are read: far more often than a real scrape
#: (15 s) or OpenTelemetry collection (60 s), so that reads overlap the timed hits.
SCRAPE_INTERVAL_S = 0.2


def _memofill_exported(port: int, namespace: str, origin: Origin) -> Cached:
    """The sync row with both exporters on its instance, read by a thread all along."""
    import threading  # noqa: PLC0415

    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    from memofill.contrib.otel import instrument  # noqa: PLC0415
    from memofill.contrib.prometheus import MemofillCollector  # noqa: PLC0415

    registry, reader = CollectorRegistry(), InMemoryMetricReader()
    stop = threading.Event()

    def wire(instance: Any) -> None:
        registry.register(MemofillCollector(instance))
        instrument(
            instance,
            meter_provider=MeterProvider(metric_readers=[reader]),
            tracer_provider=TracerProvider(),
        )

    def scrape() -> None:
        while not stop.wait(SCRAPE_INTERVAL_S):
            generate_latest(registry)
            reader.get_metrics_data()

    cached = _memofill(sync_client(port), namespace, origin, is_async=False, wire=wire)
    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()

    def close() -> None:
        stop.set()
        scraper.join()
        cached.close()

    return Cached(cached.call, close, cached.outcomes)


def _memofill_async(port: int, namespace: str, origin: Origin) -> Cached:
    return _memofill(async_client(port), namespace, origin, is_async=True)


_MEMOFILL_SETUP = (
    f"`Memofill(client, prefix=..., policies={{'{DATASET}': Dataset(ttl_s={TTL_S}, "
    "cache_fill=CacheFill(lease_ms=5000, wait_ms=3000, poll_min_ms=10, "
    "poll_max_ms=250))})` and `@cached_dataset`"
)

#: Every row, in table order.
LIBRARIES: tuple[Library, ...] = (
    Library(
        "floor-sync",
        "raw floor",
        False,
        False,
        _floor_sync,
        "`GET` + `orjson.loads`, no wrapper, no miss handling",
    ),
    Library(
        "floor-async",
        "raw floor",
        True,
        False,
        _floor_async,
        "`await GET` + `orjson.loads`, no wrapper, no miss handling",
    ),
    Library(
        "cache-aside-sync",
        "cache-aside",
        False,
        True,
        _cache_aside_sync,
        "a 10-line decorator: `GET`; on a miss call the origin and `SET ... EX`; no lock",
    ),
    Library(
        "cache-aside-async",
        "cache-aside",
        True,
        True,
        _cache_aside_async,
        "the same decorator for coroutine functions",
    ),
    Library(
        "dogpile",
        "dogpile.cache",
        False,
        True,
        _dogpile,
        "`dogpile.cache.redis`, `distributed_lock=True`, `thread_local_lock=False`, other lock "
        "settings default (`lock_sleep=0.1`, no `lock_timeout`); `serializer=orjson.dumps`; "
        "`@region.cache_on_arguments()`",
    ),
    Library(
        "cashews",
        "cashews",
        True,
        True,
        _cashews,
        "`cache.setup('redis://...', pickle_type='json')` (its JSON codec, stdlib `json`; it "
        "offers no way to plug orjson), other settings default (its pool blocks rather than "
        "fails when full; the shared options raise its size from 10); "
        "`@cache(ttl=60, key=..., lock=True)`",
    ),
    Library(
        "aiocache",
        "aiocache",
        True,
        True,
        _aiocache,
        "`@cached_stampede(lease=2, ttl=60, cache=Cache.REDIS, serializer=<orjson "
        "BaseSerializer>)`",
    ),
    Library("memofill-sync", "memofill", False, True, _memofill_sync, _MEMOFILL_SETUP),
    Library("memofill-async", "memofill", True, True, _memofill_async, _MEMOFILL_SETUP),
    Library(
        "memofill-exported",
        "memofill, both exporters scraped",
        False,
        True,
        _memofill_exported,
        "the memofill row with `MemofillCollector` on a `CollectorRegistry` and "
        "`memofill.contrib.otel.instrument()` on an SDK `MeterProvider` and `TracerProvider`, "
        f"both read every {SCRAPE_INTERVAL_S} s by a thread while the hits are timed",
        hit_only=True,
    ),
)

BY_SLUG: dict[str, Library] = {library.slug: library for library in LIBRARIES}
