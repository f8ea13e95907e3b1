"""``@fn.batch``: a ``many()``'s misses filled by one upstream call, on real redis-server processes.

Round trips are counted at the client (each pipeline or command takes one
connection from the pool once); the claim about processes runs four of them.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import redis
import redis.asyncio

from memofill import BatchError, CacheFill, ConfigurationError, Dataset, Memofill
from memofill.keys import lock_key
from tests.support.helpers import closed_at_end
from tests.support.pages import SYMBOLS, WINDOWS, fetched, page_together
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis_server

PATIENCE_S = 60.0
FILL = CacheFill(lease_ms=10_000, wait_ms=8_000, poll_min_ms=5, poll_max_ms=100)
QUOTE = Dataset("quote:{symbol}", ttl_s=300, negative_ttl_s=60, cache_fill=FILL)
RATE = Dataset("rate:{base}:{quote}", ttl_s=300, cache_fill=FILL)
POLICIES = [QUOTE, RATE]


class Counted(redis.Redis):
    """A client that counts round trips: every command or pipeline takes one connection."""

    round_trips = 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        pool = self.connection_pool
        get = pool.get_connection

        def counted(*args: Any, **kw: Any) -> Any:
            self.round_trips += 1
            return get(*args, **kw)

        pool.get_connection = counted  # type: ignore[method-assign]


def instance(server: RedisServer, prefix: str) -> tuple[Memofill, Counted]:
    client = Counted(host="127.0.0.1", port=server.port)
    closed_at_end(client)
    return Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=60_000), client


class Upstream:
    """A list endpoint: one call per batch, values in the order asked; it records each call."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.singles: list[Any] = []

    def batch(self, symbols: list[str]) -> list[dict[str, Any]]:
        self.calls.append(list(symbols))
        return [{"symbol": symbol} for symbol in symbols]

    def one(self, symbol: str) -> dict[str, Any]:
        self.singles.append(symbol)
        return {"symbol": symbol}


def test_a_cold_page_is_one_batch_call_and_round_trips_flat_in_its_size(
    redis_server: RedisServer, prefix: str
) -> None:
    cache, client = instance(redis_server, prefix)
    upstream = Upstream()
    quote = cache.cached_dataset("quote:{symbol}")(upstream.one)
    quote.batch(upstream.batch)
    assert quote.many(["W"]) == [{"symbol": "W"}]  # the scripts are loaded, the marks read
    trips = {}
    for size in (10, 60):
        symbols = [f"S{size}-{n}" for n in range(size)]
        page = [*symbols, symbols[3]]  # a duplicate costs nothing more
        client.round_trips = 0
        assert quote.many(page) == [{"symbol": s} for s in page]
        trips[size] = client.round_trips
        assert upstream.calls[-1] == symbols  # once, the items as given, each key once
    assert upstream.singles == []
    # MGET, the locks, the writes, the releases, whatever the number of keys; and the
    # duplicate's GET, a call made after the fill of its key (see the bulk module's rules).
    assert trips == {10: 5, 60: 5}
    client.round_trips = 0
    assert quote.many([f"S60-{n}" for n in range(60)])[59] == {"symbol": "S60-59"}
    assert client.round_trips == 1
    assert len(upstream.calls) == 3


def test_only_the_misses_go_to_the_batch_and_mappings_come_as_given(
    redis_server: RedisServer, prefix: str
) -> None:
    cache, _ = instance(redis_server, prefix)
    asked: list[list[Any]] = []

    @cache.cached_dataset("rate:{base}:{quote}")
    def rate(base: str, quote: str) -> float:
        raise AssertionError("the batch fetches")

    @rate.batch
    def rates(pairs: list[dict[str, str]]) -> list[float]:
        asked.append(pairs)
        return [len(pair["base"]) + len(pair["quote"]) / 10 for pair in pairs]

    first = {"base": "EUR", "quote": "USD"}
    second = {"base": "GB", "quote": "JPYX"}
    assert rate.many([first]) == [3.3]
    assert rate.many([second, first]) == [2.4, 3.3]
    assert asked == [[first], [second]]


def test_a_batch_that_raises_fails_the_call_and_writes_nothing(
    redis_server: RedisServer, prefix: str
) -> None:
    cache, _ = instance(redis_server, prefix)
    calls = 0

    @cache.cached_dataset("quote:{symbol}")
    def quote(symbol: str) -> dict[str, Any]:
        raise AssertionError("the batch fetches")

    @quote.batch
    def quotes(symbols: list[str]) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionRefusedError("upstream down")
        if calls == 2:
            return [{"symbol": s} for s in symbols[1:]]  # one short
        return [None if s == "NONE" else {"symbol": s} for s in symbols]

    with pytest.raises(ConnectionRefusedError, match="upstream down"):
        quote.many(["A", "B"])
    admin = redis_server.client()
    assert admin.get(quote.redis_key("A")) is None
    with pytest.raises(BatchError, match=r"quote's batch .*quotes.* returned 1 values for 2 items"):
        quote.many(["A", "B"])
    assert admin.get(quote.redis_key("B")) is None
    assert quote.many(["A", "NONE", "B"]) == [{"symbol": "A"}, None, {"symbol": "B"}]
    assert quote.many(["NONE"]) == [None]  # a negative marker, as a single call stores it
    assert calls == 3
    admin.close()


def test_keys_another_caller_leads_are_waited_for_not_fetched(
    redis_server: RedisServer, prefix: str
) -> None:
    cache, _ = instance(redis_server, prefix)
    other, _ = instance(redis_server, prefix)
    upstream = Upstream()
    entered, go = threading.Event(), threading.Event()

    def slow(symbol: str) -> dict[str, Any]:
        entered.set()
        assert go.wait(PATIENCE_S)
        return {"symbol": symbol, "by": "other"}

    leader = other.cached_dataset("quote:{symbol}")(slow)
    thread = threading.Thread(target=leader, args=("LED",))
    thread.start()
    assert entered.wait(PATIENCE_S)
    quote = cache.cached_dataset("quote:{symbol}")(upstream.one)
    quote.batch(upstream.batch)
    threading.Timer(0.2, go.set).start()
    page = quote.many(["X", "LED", "Y"])
    thread.join(PATIENCE_S)
    assert page == [{"symbol": "X"}, {"symbol": "LED", "by": "other"}, {"symbol": "Y"}]
    assert upstream.calls == [["X", "Y"]]
    assert upstream.singles == []


def test_a_second_batch_or_one_that_cannot_take_a_list_is_one_clear_line(
    redis_server: RedisServer, prefix: str
) -> None:
    cache, _ = instance(redis_server, prefix)
    quote = cache.cached_dataset("quote:{symbol}")(Upstream().one)
    with pytest.raises(TypeError, match=r"cannot take the list of items"):
        quote.batch(lambda: [])

    async def coroutine(symbols: list[str]) -> list[Any]:
        return []

    with pytest.raises(TypeError, match=r"must be a plain function"):
        quote.batch(coroutine)
    quote.batch(lambda symbols: [])
    with pytest.raises(ConfigurationError, match=r"already has a batch function"):
        quote.batch(lambda symbols: [])


async def test_an_asyncio_many_calls_its_coroutine_batch_once(
    redis_server: RedisServer, prefix: str
) -> None:
    client = redis.asyncio.Redis(port=redis_server.port)
    cache = Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=60_000)
    asked: list[list[str]] = []

    @cache.cached_dataset("quote:{symbol}")
    async def quote(symbol: str) -> dict[str, Any]:
        raise AssertionError("the batch fetches")

    with pytest.raises(TypeError, match=r"must be a coroutine function"):
        quote.batch(lambda symbols: [])

    @quote.batch
    async def quotes(symbols: list[str]) -> list[dict[str, Any]]:
        asked.append(symbols)
        await asyncio.sleep(0.01)
        return [{"symbol": s} for s in symbols]

    symbols = [f"S{n}" for n in range(30)]
    try:
        assert await quote.many(symbols) == [{"symbol": s} for s in symbols]
        assert await quote.many(symbols[::-1]) == [{"symbol": s} for s in symbols[::-1]]
        assert asked == [symbols]
    finally:
        await client.aclose()


# --- stale values, refreshed by the batch -------------------------------------------------

FEED = Dataset("feed:{symbol}", ttl_s=300, stale_s=600, cache_fill=FILL)


class Versions:
    """A list endpoint whose values count up per symbol; its calls recorded, one may raise."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.seen: dict[str, int] = {}
        self.fail = False

    def values(self, symbols: list[str]) -> list[dict[str, Any]]:
        self.calls.append(list(symbols))
        if self.fail:
            raise RuntimeError("upstream down")
        for symbol in symbols:
            self.seen[symbol] = self.seen.get(symbol, 0) + 1
        return [{"symbol": s, "version": self.seen[s]} for s in symbols]


def _versions(page: list[Any]) -> list[int]:
    return [value["version"] for value in page]


def _wait_for_refreshes(cache: Memofill) -> None:
    deadline = threading.Event()
    for _ in range(int(PATIENCE_S * 100)):
        if not cache.refreshes.in_flight():
            return
        deadline.wait(0.01)
    raise AssertionError(f"refreshes still in flight after {PATIENCE_S} s")


@pytest.mark.parametrize("refresh", ["inline", "background"])
def test_stale_values_of_a_page_are_served_and_refreshed_by_one_batch_call(
    redis_server: RedisServer, prefix: str, refresh: str
) -> None:
    client = redis.Redis(port=redis_server.port)
    closed_at_end(client)
    cache = Memofill(client, prefix=prefix, policies=[FEED], meta_check_ms=0, refresh=refresh)
    upstream = Versions()

    @cache.cached_dataset("feed:{symbol}")
    def feed(symbol: str) -> dict[str, Any]:
        raise AssertionError("the batch fetches")

    feed.batch(upstream.values)
    symbols = ["A", "B", "C"]
    assert _versions(feed.many(symbols)) == [1, 1, 1]
    assert _versions(feed.many(["D"])) == [1]
    cache.invalidate_dataset("feed:{symbol}", soft=True)  # every value stale, none expired
    page = _versions(feed.many([*symbols, "D", "A"]))
    if refresh == "inline":  # the caller refreshes, and gets the new values; A again is a hit
        assert page == [2, 2, 2, 2, 2]
    else:  # served stale; A again is a call made after: stale still, or refreshed already
        assert page[:4] == [1, 1, 1, 1]
        assert page[4] in {1, 2}
    _wait_for_refreshes(cache)
    assert upstream.calls[2:] == [[*symbols, "D"]]  # one call, each stale key once
    assert _versions(feed.many([*symbols, "D"])) == [2, 2, 2, 2]
    counts = cache.counters.snapshot()["feed:{symbol}"]
    assert counts["refresh_fill"] == 4


def test_a_batch_that_raises_on_a_refresh_leaves_the_stale_values_served(
    redis_server: RedisServer, prefix: str
) -> None:
    client = redis.Redis(port=redis_server.port)
    closed_at_end(client)
    cache = Memofill(client, prefix=prefix, policies=[FEED], meta_check_ms=0, refresh="inline")
    upstream = Versions()

    @cache.cached_dataset("feed:{symbol}")
    def feed(symbol: str) -> dict[str, Any]:
        raise AssertionError("the batch fetches")

    feed.batch(upstream.values)
    assert _versions(feed.many(["A", "B"])) == [1, 1]
    cache.invalidate_dataset("feed:{symbol}", soft=True)
    upstream.fail = True
    assert _versions(feed.many(["A", "B"])) == [1, 1]
    assert cache.counters.snapshot()["feed:{symbol}"]["refresh_error"] == 2
    assert upstream.calls[-1] == ["A", "B"]


async def test_an_asyncio_page_of_stale_values_is_refreshed_by_one_batch_call(
    redis_server: RedisServer, prefix: str
) -> None:
    client = redis.asyncio.Redis(port=redis_server.port)
    cache = Memofill(client, prefix=prefix, policies=[FEED], meta_check_ms=0)
    upstream = Versions()

    @cache.cached_dataset("feed:{symbol}")
    async def feed(symbol: str) -> dict[str, Any]:
        raise AssertionError("the batch fetches")

    @feed.batch
    async def feeds(symbols: list[str]) -> list[dict[str, Any]]:
        await asyncio.sleep(0)
        return upstream.values(symbols)

    try:
        assert _versions(await feed.many(["A", "B"])) == [1, 1]
        await cache.invalidate_dataset("feed:{symbol}", soft=True)
        assert _versions(await feed.many(["A", "B"])) == [1, 1]  # served stale; a task refreshes
        await asyncio.gather(*cache.refreshes.tasks)
        assert upstream.calls == [["A", "B"], ["A", "B"]]
        assert _versions(await feed.many(["A", "B"])) == [2, 2]
    finally:
        await client.aclose()


# --- several processes ------------------------------------------------------------------


def test_four_processes_batching_over_a_cold_set_fetch_every_key_once_in_all(
    redis_server: RedisServer, prefix: str
) -> None:
    assert page_together(redis_server.port, prefix, batched=True) == [True] * len(WINDOWS)
    admin = redis_server.client()
    batches = int(admin.get(prefix + "batches") or 0)
    assert fetched(admin, prefix) == dict.fromkeys(SYMBOLS, 1)
    admin.close()
    assert 1 <= batches <= len(WINDOWS)  # at most one batch call per many()


async def test_a_cancelled_asyncio_many_releases_the_locks_of_its_batch(
    redis_server: RedisServer, prefix: str
) -> None:
    client = redis.asyncio.Redis(port=redis_server.port)
    cache = Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=60_000)
    entered = asyncio.Event()

    @cache.cached_dataset("quote:{symbol}")
    async def quote(symbol: str) -> dict[str, Any]:
        raise AssertionError("the batch fetches")

    @quote.batch
    async def quotes(symbols: list[str]) -> list[dict[str, Any]]:
        entered.set()
        await asyncio.sleep(PATIENCE_S)
        raise AssertionError("cancelled before")

    admin = redis_server.client()
    try:
        page = asyncio.ensure_future(quote.many(["A", "B", "C"]))
        await asyncio.wait_for(entered.wait(), PATIENCE_S)
        locks = [lock_key(quote.redis_key(s)) for s in "ABC"]
        assert admin.exists(*locks) == 3
        page.cancel()
        with pytest.raises(asyncio.CancelledError):
            await page
        assert admin.exists(*locks) == 0  # released at once, not after the lease
        assert admin.exists(*(quote.redis_key(s) for s in "ABC")) == 0
    finally:
        admin.close()
        await client.aclose()
