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
import threading
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
    and resets the library's own per-call outcome counts, where it keeps any;
    ``ready``, where given, returns (possibly awaitable) once the row serves as it
    is to be measured: a memofill near row, once its listener vouches for copies.
    """

    call: Callable[[str], Any]
    close: Callable[[], Any]
    outcomes: Callable[[], dict[str, int]] = field(default=_no_outcomes)
    ready: Callable[[], Any] | None = None


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
    #: Expiry rows only: seconds a value is fresh (soft expiry where the library has one).
    fresh_s: float = 0.0
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


def dogpile_region(port: int) -> Any:
    """dogpile.cache's Redis region as every row configures it: its distributed lock, orjson."""
    from dogpile.cache import make_region  # noqa: PLC0415 (see the module docstring)

    return make_region(serializer=orjson.dumps, deserializer=orjson.loads).configure(
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


def _dogpile(port: int, namespace: str, origin: Origin) -> Cached:
    region = dogpile_region(port)

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
    dataset: Any = None,
    *,
    near_ms: int = 0,
    wire: Callable[[Any], object] | None = None,
) -> Cached:
    """memofill's row on one dataset: the bench's policy unless ``dataset`` is given, and
    ``wire(instance)``, when given, adds to the instance (exporters)."""
    import memofill  # noqa: PLC0415

    if dataset is None:
        fill = memofill.CacheFill(lease_ms=5000, wait_ms=3000, poll_min_ms=10, poll_max_ms=250)
        dataset = memofill.Dataset(DATASET, ttl_s=TTL_S, cache_fill=fill, near_ms=near_ms)
    instance = memofill.Memofill(client, prefix=namespace, policies={DATASET: dataset})
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

        async def ready_async() -> None:
            await _near_ready_async(fetch_async)
            outcomes()

        return Cached(fetch_async, client.aclose, outcomes, ready_async if near_ms else None)

    @instance.cached_dataset(DATASET)
    def fetch(name: str) -> Any:
        return origin(name)

    def ready() -> None:
        _near_ready(fetch)
        outcomes()

    return Cached(fetch, client.close, outcomes, ready if near_ms else None)


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


# -- expiry under load: a hot key whose freshness runs out while callers keep calling ----------

#: Seconds an expiry row's value is fresh, and how long past that it may be served stale.
FRESH_S = 1
STALE_S = 1
#: Early refresh needs a freshness well above its lead time, δβ(ln(rδβ) + 0.577) ≈ 1.2 s
#: at β = 1, δ = 0.2 s and ~1,300 reads a second, so its rows keep values fresh 3 s.
EARLY_FRESH_S = 3
EARLY_BETA = 1.0
#: After a failed refresh no process retries for this long; it must fit in the stale window.
REFRESH_RETRY_MS = 1000


def _expiry_dataset(fresh_s: float, stale_s: float = 0, early_beta: float = 0.0) -> Any:
    """The bench's fill policy with freshness ``fresh_s`` and the serve-stale settings given.

    With neither ``stale_s`` nor ``early_beta`` it is today's dataset (the baseline), built
    without naming the serve-stale fields at all.
    """
    import memofill  # noqa: PLC0415

    refresh: dict[str, Any] = {}
    if stale_s or early_beta:
        refresh["refresh_retry_ms"] = REFRESH_RETRY_MS
    if early_beta:
        refresh["early_beta"] = early_beta
    fill = memofill.CacheFill(
        lease_ms=5000, wait_ms=3000, poll_min_ms=10, poll_max_ms=250, **refresh
    )
    stale: dict[str, Any] = {"stale_s": stale_s} if stale_s else {}
    return memofill.Dataset(DATASET, ttl_s=fresh_s, cache_fill=fill, **stale)


def _memofill_ttl(is_async: bool) -> Callable[[int, str, Origin], Cached]:
    def make(port: int, namespace: str, origin: Origin) -> Cached:
        client = async_client(port) if is_async else sync_client(port)
        return _memofill(client, namespace, origin, is_async, _expiry_dataset(FRESH_S))

    return make


def _memofill_stale(is_async: bool) -> Callable[[int, str, Origin], Cached]:
    def make(port: int, namespace: str, origin: Origin) -> Cached:
        client = async_client(port) if is_async else sync_client(port)
        dataset = _expiry_dataset(FRESH_S, stale_s=STALE_S)
        return _memofill(client, namespace, origin, is_async, dataset)

    return make


def _memofill_early(is_async: bool) -> Callable[[int, str, Origin], Cached]:
    def make(port: int, namespace: str, origin: Origin) -> Cached:
        client = async_client(port) if is_async else sync_client(port)
        dataset = _expiry_dataset(EARLY_FRESH_S, stale_s=EARLY_FRESH_S, early_beta=EARLY_BETA)
        return _memofill(client, namespace, origin, is_async, dataset)

    return make


def _dogpile_stale(port: int, namespace: str, origin: Origin) -> Cached:
    """dogpile.cache's serve-stale mode: soft expiry, a hard Redis TTL, refresh in a thread.

    The caller that wins the (non-blocking) mutex hands it to the runner and returns
    the stale value; the runner calls the origin in a new thread, writes the value and
    releases the mutex, as dogpile's documentation shows.
    """
    from dogpile.cache import make_region  # noqa: PLC0415

    def runner(region: Any, key: Any, creator: Callable[[], Any], mutex: Any) -> None:
        def refresh() -> None:
            try:
                region.set(key, creator())
            finally:
                mutex.release()

        threading.Thread(target=refresh, daemon=True).start()

    region = make_region(
        serializer=orjson.dumps, deserializer=orjson.loads, async_creation_runner=runner
    ).configure(
        "dogpile.cache.redis",
        expiration_time=FRESH_S,
        arguments={
            "host": HOST,
            "port": port,
            "db": 0,
            "redis_expiration_time": FRESH_S + STALE_S,
            "distributed_lock": True,
            "thread_local_lock": False,  # the runner's thread releases the lock
            "lock_timeout": 5,  # as memofill's lease: a lost runner frees the lock
            "connection_kwargs": dict(CLIENT_OPTIONS),
        },
    )

    @region.cache_on_arguments(namespace=namespace)
    def fetch(name: str) -> Any:
        return origin(name)

    return Cached(fetch, region.backend.writer_client.close)


def _cashews_early(port: int, namespace: str, origin: Origin) -> Cached:
    """cashews' early refresh: after ``early_ttl`` one caller refreshes in a task."""
    from cashews import Cache  # noqa: PLC0415

    cache = Cache(name=namespace)
    # Not its JSON codec: @cache.early stores [datetime, value], which that codec cannot encode.
    cache.setup(f"redis://{HOST}:{port}/0", **CLIENT_OPTIONS)

    @cache.early(ttl=FRESH_S + STALE_S, early_ttl=FRESH_S, key=namespace + "{name}")
    async def fetch(name: str) -> Any:
        return await origin(name)

    return Cached(fetch, cache.close)


#: The near rows' ``near_ms``: long enough that the hit rounds read Redis a handful of times.
NEAR_MS = 5_000


def _memofill_near_sync(port: int, namespace: str, origin: Origin) -> Cached:
    return _memofill(sync_client(port), namespace, origin, is_async=False, near_ms=NEAR_MS)


def _memofill_near_async(port: int, namespace: str, origin: Origin) -> Cached:
    return _memofill(async_client(port), namespace, origin, is_async=True, near_ms=NEAR_MS)


#: The key the near rows wait on for their listener (not the key timed).
WARM_UP = "warm-up"
#: How long a near row may take to be served from its copy: the listener's first ping.
NEAR_READY_S = 10


def _near_ready(fetch: Any) -> None:
    """Call until a call is served near: the listener is live (the first read starts it)."""
    import time  # noqa: PLC0415

    deadline = time.monotonic() + NEAR_READY_S
    while fetch.call_with_outcome(WARM_UP).outcome != "near_hit":
        if time.monotonic() > deadline:
            raise RuntimeError("the near-cache listener did not start")
        time.sleep(0.005)


async def _near_ready_async(fetch: Any) -> None:
    """:func:`_near_ready` for a coroutine function, in the loop that will time it."""
    import asyncio  # noqa: PLC0415
    import time  # noqa: PLC0415

    deadline = time.monotonic() + NEAR_READY_S
    while (await fetch.call_with_outcome(WARM_UP)).outcome != "near_hit":
        if time.monotonic() > deadline:
            raise RuntimeError("the near-cache listener did not start")
        await asyncio.sleep(0.005)


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
        "memofill-near-sync",
        "memofill near",
        False,
        True,
        _memofill_near_sync,
        f"memofill as above with `near_ms={NEAR_MS}` (default `NearCache()`: tracking "
        "listener, shared decoded objects); a hit is served from the process's copy",
        hit_only=True,
    ),
    Library(
        "memofill-near-async",
        "memofill near",
        True,
        True,
        _memofill_near_async,
        f"the same for coroutine functions (`near_ms={NEAR_MS}`)",
        hit_only=True,
    ),
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

_EXPIRY_FILL = "CacheFill(lease_ms=5000, wait_ms=3000, poll_min_ms=10, poll_max_ms=250"
_STALE_SETUP = (
    f"`Dataset(ttl_s={FRESH_S}, stale_s={STALE_S}, cache_fill={_EXPIRY_FILL}, "
    f"refresh_retry_ms={REFRESH_RETRY_MS}))`"
)
_EARLY_SETUP = (
    f"`Dataset(ttl_s={EARLY_FRESH_S}, stale_s={EARLY_FRESH_S}, cache_fill={_EXPIRY_FILL}, "
    f"early_beta={EARLY_BETA:g}, refresh_retry_ms={REFRESH_RETRY_MS}))`"
)

#: The rows of the expiry scenario, in table order: each keeps values fresh ``fresh_s``.
EXPIRY_LIBRARIES: tuple[Library, ...] = (
    Library(
        "memofill-ttl-sync",
        "memofill, no stale_s",
        False,
        True,
        _memofill_ttl(is_async=False),
        f"today's behaviour: `Dataset(ttl_s={FRESH_S}, cache_fill={_EXPIRY_FILL}))`",
        FRESH_S,
    ),
    Library(
        "memofill-ttl-async",
        "memofill, no stale_s",
        True,
        True,
        _memofill_ttl(is_async=True),
        f"today's behaviour: `Dataset(ttl_s={FRESH_S}, cache_fill={_EXPIRY_FILL}))`",
        FRESH_S,
    ),
    Library(
        "memofill-stale-sync",
        "memofill, stale_s",
        False,
        True,
        _memofill_stale(is_async=False),
        _STALE_SETUP + ", `refresh='background'` (the default: a pool of 4 threads)",
        FRESH_S,
    ),
    Library(
        "memofill-stale-async",
        "memofill, stale_s",
        True,
        True,
        _memofill_stale(is_async=True),
        _STALE_SETUP + ", `refresh='background'` (the default: a task)",
        FRESH_S,
    ),
    Library(
        "dogpile-stale",
        "dogpile.cache, serve stale",
        False,
        True,
        _dogpile_stale,
        f"`expiration_time={FRESH_S}` (soft), `redis_expiration_time={FRESH_S + STALE_S}`, "
        "`distributed_lock=True`, `thread_local_lock=False`, `lock_timeout=5`, and an "
        "`async_creation_runner` that refreshes in a new thread and then releases the lock",
        FRESH_S,
    ),
    Library(
        "cashews-early",
        "cashews, early",
        True,
        True,
        _cashews_early,
        f"`@cache.early(ttl={FRESH_S + STALE_S}, early_ttl={FRESH_S}, key=...)`, "
        "its default codec (pickle: `@cache.early` stores `[datetime, value]`, which its JSON "
        "codec cannot encode); the refresh runs in a background task",
        FRESH_S,
    ),
    Library(
        "memofill-early-sync",
        "memofill, early β = 1",
        False,
        True,
        _memofill_early(is_async=False),
        _EARLY_SETUP,
        EARLY_FRESH_S,
    ),
    Library(
        "memofill-early-async",
        "memofill, early β = 1",
        True,
        True,
        _memofill_early(is_async=True),
        _EARLY_SETUP,
        EARLY_FRESH_S,
    ),
)

BY_SLUG: dict[str, Library] = {library.slug: library for library in (*LIBRARIES, *EXPIRY_LIBRARIES)}
