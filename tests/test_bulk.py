"""``fn.many(items)`` on real redis-server processes: one round trip for the hits, one fill per key.

Several processes for the claim about processes (every key of a cold set
fetched once in all); Redis's own ``INFO commandstats`` for the claim about
round trips.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import redis
import redis.asyncio

import memofill
from memofill import CacheFill, Dataset, Memofill
from tests.support.helpers import closed_at_end
from tests.support.pages import SYMBOLS, WINDOWS, fetched, page_together
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis_server

PATIENCE_S = 60.0
FILL = CacheFill(lease_ms=10_000, wait_ms=8_000, poll_min_ms=5, poll_max_ms=100)
QUOTE = Dataset("quote:{symbol}", ttl_s=300, negative_ttl_s=60, cache_fill=FILL)
RATE = Dataset("rate:{base}:{quote}", ttl_s=300, cache_fill=FILL)
POLICIES = [QUOTE, RATE]


def instance(server: RedisServer, prefix: str) -> Memofill:
    client = server.client()
    closed_at_end(client)
    return Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=60_000)


def commands_run(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def test_the_hits_of_a_page_are_one_round_trip_and_come_back_in_order(
    redis_server: RedisServer, prefix: str
) -> None:
    cache = instance(redis_server, prefix)
    fetched: list[str] = []

    @cache.cached_dataset("quote:{symbol}")
    def quote(symbol: str) -> dict[str, Any]:
        fetched.append(symbol)
        return {"symbol": symbol}

    symbols = [f"S{n}" for n in range(50)]
    assert quote.many(symbols) == [{"symbol": s} for s in symbols]
    assert sorted(fetched) == sorted(symbols)  # each miss filled once
    admin = redis_server.client()
    before = commands_run(admin)
    page = quote.many([*reversed(symbols), "S7"])
    ran = commands_run(admin) - before
    ran.pop("info", None)
    assert page == [{"symbol": s} for s in [*reversed(symbols), "S7"]]
    assert ran == Counter(mget=1)  # 51 items, 50 keys: one command in all
    assert len(fetched) == 50
    assert cache.counters.snapshot()["quote:{symbol}"]["hit"] == 51
    admin.close()


def test_duplicates_cost_one_fill_and_each_item_gets_its_own_value(
    redis_server: RedisServer, prefix: str
) -> None:
    cache = instance(redis_server, prefix)
    calls: Counter[str] = Counter()

    @cache.cached_dataset("quote:{symbol}")
    def quote(symbol: str) -> dict[str, Any]:
        calls[symbol] += 1
        return {"symbol": symbol, "bids": []}

    first, again, other = quote.many(["A", "A", "B"])
    assert first == again == {"symbol": "A", "bids": []}
    assert first is not again  # no item can change what another holds
    assert other == {"symbol": "B", "bids": []}
    assert calls == Counter(A=1, B=1)
    # The second "A" is a call after the first's fill: a hit on what it stored.
    assert cache.counters.snapshot()["quote:{symbol}"] == {"leader_fill": 2, "hit": 1}
    assert quote.many([]) == []
    cache.counters.reset()
    assert quote.many(["A", "B", "A"]) == [first, other, first]  # a page of hits, one repeated
    assert cache.counters.snapshot()["quote:{symbol}"] == {"hit": 3}


@pytest.mark.parametrize(
    "items",
    [
        ["plain", "", "a b/c:d", "é", "{tag}", "x" * 300],  # escaped, memoised or not
        [0, -7, 2**70, True, None],  # small and huge ints; values that are no str or int
        ["A", 3, {"symbol": "B"}],  # a mapping among values
    ],
)
def test_a_page_is_keyed_as_single_calls_key_each_item(
    redis_server: RedisServer, prefix: str, items: list[Any]
) -> None:
    """Values of the key's one field are keyed in one loop: the texts a single call writes."""
    cache = instance(redis_server, prefix)

    @cache.cached_dataset("quote:{symbol}")
    def quote(symbol: Any) -> str:
        return repr(symbol)

    expected = [repr(item["symbol"] if isinstance(item, dict) else item) for item in items]
    assert quote.many(items) == expected
    for item in items:
        value = item["symbol"] if isinstance(item, dict) else item
        assert quote.call_with_outcome(value).outcome == "hit", value
    assert quote.many(items) == expected


def test_items_of_a_key_with_several_fields_are_mappings(
    redis_server: RedisServer, prefix: str
) -> None:
    cache = instance(redis_server, prefix)

    @cache.cached_dataset("rate:{base}:{quote}")
    def rate(base: str, quote: str) -> float:
        return {"EURUSD": 1.1, "EURGBP": 0.85}[base + quote]

    items = [{"base": "EUR", "quote": "USD"}, {"quote": "GBP", "base": "EUR"}]
    assert rate.many(items) == [1.1, 0.85]
    assert rate.many(items) == [1.1, 0.85]
    with pytest.raises(TypeError, match=r"rate.many\(\): 'EUR' is not a mapping .* 2 fields"):
        rate.many(["EUR"])
    with pytest.raises(TypeError, match="quote"):
        rate.many([{"base": "EUR"}])  # what rate(base="EUR") would raise


def test_bad_input_is_one_clear_line_before_anything_is_fetched(
    redis_server: RedisServer, prefix: str
) -> None:
    cache = instance(redis_server, prefix)
    fetched: list[str] = []

    @cache.cached_dataset("quote:{symbol}")
    def quote(symbol: str) -> str:
        fetched.append(symbol)
        return symbol

    with pytest.raises(TypeError, match=r"many\(\) takes an iterable of items .* not str"):
        quote.many("ACME")
    with pytest.raises(TypeError, match=r"many\(\) takes an iterable of items .* not int"):
        quote.many(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        quote.many(["A", {"symbol": "B", "extra": 1}])  # the second item's call is refused
    assert fetched == []


def test_a_miss_among_hits_is_a_miss_as_a_single_call_has_it(
    redis_server: RedisServer, prefix: str
) -> None:
    """Negative markers, a key invalidated in between: judged per key, each as a call would."""
    cache = instance(redis_server, prefix)
    versions: Counter[str] = Counter()

    @cache.cached_dataset("quote:{symbol}")
    def quote(symbol: str) -> dict[str, Any] | None:
        versions[symbol] += 1
        return None if symbol == "GONE" else {"symbol": symbol, "v": versions[symbol]}

    assert quote.many(["A", "GONE", "B"]) == [
        {"symbol": "A", "v": 1},
        None,
        {"symbol": "B", "v": 1},
    ]
    quote.invalidate("B")
    assert quote.many(["A", "GONE", "B"]) == [
        {"symbol": "A", "v": 1},
        None,
        {"symbol": "B", "v": 2},
    ]
    assert versions == Counter(A=1, GONE=1, B=2)
    counted = cache.counters.snapshot()["quote:{symbol}"]
    assert counted == {"leader_fill": 3, "negative": 1, "hit": 2}  # A, and GONE's marker


def test_no_value_invalidated_for_the_dataset_is_served_by_many(
    redis_server: RedisServer, prefix: str
) -> None:
    cache, other = instance(redis_server, prefix), instance(redis_server, prefix)
    versions: Counter[str] = Counter()

    def fetch(symbol: str) -> int:
        versions[symbol] += 1
        return versions[symbol]

    quote = cache.cached_dataset("quote:{symbol}")(fetch)
    assert quote.many(["A", "B"]) == [1, 1]
    other.invalidate_dataset("quote:{symbol}")
    cache._state.generations.next_check = 0.0  # as after meta_check_ms
    assert quote.many(["A", "B"]) == [2, 2]


def test_a_failed_mget_is_one_failure_for_the_breaker_and_every_item_is_served(
    redis_server: RedisServer, prefix: str
) -> None:
    cache = instance(redis_server, prefix)
    quote = cache.cached_dataset("quote:{symbol}")(lambda symbol: {"symbol": symbol})
    symbols = [f"S{n}" for n in range(20)]
    quote.many(symbols)
    commands = cache._sync
    assert commands is not None
    mget = commands.mget

    def timing_out(keys: list[str]) -> Any:
        commands.mget = mget  # type: ignore[method-assign]
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    commands.mget = timing_out  # type: ignore[method-assign]
    assert quote.many(symbols) == [{"symbol": s} for s in symbols]  # the outage copies
    assert cache.breaker.timeouts == 1
    assert not cache.breaker.is_open
    assert cache.counters.snapshot()["quote:{symbol}"]["fallback_hit"] == 20


def test_caching_off_calls_the_function_for_each_item(
    redis_server: RedisServer, prefix: str
) -> None:
    cache = instance(redis_server, prefix)
    calls: list[str] = []
    quote = cache.cached_dataset("quote:{symbol}")(lambda symbol: calls.append(symbol) or symbol)
    with memofill.disabled():
        assert quote.many(["A", "A"]) == ["A", "A"]
    assert calls == ["A", "A"]
    assert cache.counters.snapshot()["quote:{symbol}"] == {"disabled": 2}


async def test_an_asyncio_many_is_one_round_trip_for_hits_and_fills_misses_concurrently(
    redis_server: RedisServer, prefix: str
) -> None:
    client = redis.asyncio.Redis(port=redis_server.port)
    cache = Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=60_000)
    running, most = 0, 0

    @cache.cached_dataset("quote:{symbol}")
    async def quote(symbol: str) -> dict[str, Any]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            import asyncio  # noqa: PLC0415

            await asyncio.sleep(0.02)
            return {"symbol": symbol}
        finally:
            running -= 1

    symbols = [f"S{n}" for n in range(40)]
    try:
        assert await quote.many(symbols) == [{"symbol": s} for s in symbols]
        assert 1 < most <= 16  # concurrent, and bounded
        admin = redis_server.client()
        before = commands_run(admin)
        assert await quote.many(symbols[::-1]) == [{"symbol": s} for s in symbols[::-1]]
        ran = commands_run(admin) - before
        ran.pop("info", None)
        assert ran == Counter(mget=1)
        admin.close()
    finally:
        await client.aclose()


# --- several processes ------------------------------------------------------------------


def test_four_processes_paging_over_a_cold_set_fetch_every_key_once_in_all(
    redis_server: RedisServer, prefix: str
) -> None:
    assert page_together(redis_server.port, prefix, batched=False) == [True] * len(WINDOWS)
    admin = redis_server.client()
    assert fetched(admin, prefix) == dict.fromkeys(SYMBOLS, 1)
    admin.close()
