"""The hit path's shortcuts behave exactly as the plain code they replace.

A hit skips work the miss path does: keys come from a memo of escaped
arguments, hits are counted without a lock, and the locally kept copy of a
value is refreshed at most once a second. Each shortcut is checked here against
the slow, obvious answer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memofill import CachedDataset, KeyArgumentError, Memofill
from memofill.fallback import REFRESH_S, LocalStore
from memofill.keys import FieldText, format_argument
from memofill.outcomes import Counters, Tally
from tests.conftest import POLICIES
from tests.support.helpers import FakeClock


@pytest.fixture
def raw() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture
def mf(raw: fakeredis.FakeRedis) -> Memofill:
    return Memofill(raw, prefix="t:", policies=POLICIES)


# --- keys --------------------------------------------------------------------------------


@given(
    st.one_of(
        st.text(max_size=300),
        st.integers(),
        st.integers(min_value=10**198),
        st.integers(max_value=-(10**198)),
    )
)
def test_field_text_is_format_argument(value: object) -> None:
    text = FieldText("name")
    assert text(value) == format_argument("name", value)
    assert text(value) == format_argument("name", value)  # the second time from the memo


@pytest.mark.parametrize("bad", [1.0, float("nan"), [1], {"a": 1}, b"x", b"1"])
def test_field_text_refuses_what_format_argument_refuses(bad: object) -> None:
    text = FieldText("name")
    text("1")  # a memo entry that an equal-hashing value must not reach
    with pytest.raises(KeyArgumentError):
        text(bad)


def test_field_text_memo_stays_bounded() -> None:
    text = FieldText("name")
    for n in range(FieldText.MAX_ENTRIES * 2 + 10):
        assert text(f"v{n}") == f"v{n}"
    assert len(text.known) <= FieldText.MAX_ENTRIES
    text("x" * (FieldText.MAX_MEMO_CHARS + 1))
    assert "x" * (FieldText.MAX_MEMO_CHARS + 1) not in text.known


@pytest.mark.parametrize("bad", [[1], {"a": 1}, 1.0, 2.5])
def test_an_unhashable_or_refused_argument_is_a_key_error_on_the_fast_path(
    mf: Memofill, bad: Any
) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: {"name": name})
    fetch("warm")
    with pytest.raises(KeyArgumentError):
        fetch(bad)


def test_a_new_prefix_moves_decorated_functions_to_new_keys(
    mf: Memofill, raw: fakeredis.FakeRedis
) -> None:
    calls: list[str] = []

    @mf.cached_dataset("item:{name}")
    def fetch(name: str) -> dict[str, str]:
        calls.append(name)
        return {"name": name}

    fetch("a")
    mf.configure(raw, prefix="u:")
    assert fetch.redis_key("a") == "u:item:a"
    fetch("a")
    assert calls == ["a", "a"]
    assert raw.exists("t:item:a", "u:item:a") == 2


# --- hit counting --------------------------------------------------------------------------


def test_a_tally_loses_no_add_under_threads_and_reads_do_not_count() -> None:
    tally = Tally()
    add = tally.add

    def adds() -> None:
        for _ in range(20_000):
            add()

    threads = [threading.Thread(target=adds) for _ in range(8)]
    for thread in threads:
        thread.start()
    seen = [tally.value for _ in range(50)]
    for thread in threads:
        thread.join()
    assert seen == sorted(seen)
    assert tally.value == tally.value == 160_000
    tally.reset()
    add()
    assert tally.value == 1


def test_counters_reset_keeps_counting_the_hits_of_decorated_functions(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: {"name": name})
    fetch("a")
    fetch("a")
    assert mf.counters.snapshot()["item:{name}"]["hit"] == 1
    mf.counters.reset()
    assert mf.counters.snapshot() == {}
    fetch("a")
    assert mf.counters.snapshot() == {"item:{name}": {"hit": 1}}


def test_counters_merge_tallied_hits_with_locked_outcomes() -> None:
    counters = Counters()
    counters.hit_tally("a").add()
    counters.add("a", "hit")
    counters.add("a", "leader_fill")
    assert counters.snapshot() == {"a": {"hit": 2, "leader_fill": 1}}


def test_override_gives_decorated_functions_fresh_counters(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: {"name": name})
    fetch("a")
    fetch("a")
    with mf.override(fakeredis.FakeRedis(), prefix="o:") as inner:
        fetch("a")
        fetch("a")
        assert inner.counters.snapshot() == {"item:{name}": {"hit": 1, "leader_fill": 1}}
    fetch("a")
    assert mf.counters.snapshot() == {"item:{name}": {"hit": 2, "leader_fill": 1}}


# --- the locally kept copy -----------------------------------------------------------------


def test_remember_refreshes_the_kept_copy_at_most_once_per_refresh_interval() -> None:
    clock = FakeClock()
    store = LocalStore(clock=clock)
    store.remember("k", "v1", ttl_s=60)
    clock.now += REFRESH_S / 2
    store.remember("k", "v2", ttl_s=60)
    assert store.get("k") == "v1"
    clock.now += REFRESH_S
    store.remember("k", "v3", ttl_s=60)
    assert store.get("k") == "v3"
    clock.now += 30 - REFRESH_S / 2  # kept 30 s from the refresh above, not from the first put
    assert store.get("k") == "v3"
    clock.now += REFRESH_S
    assert store.get("k", None) is None


def test_hits_keep_a_copy_for_when_redis_is_unreachable(
    mf: Memofill, raw: fakeredis.FakeRedis
) -> None:
    raw.set("t:item:warm", b'{"name":"warm"}', px=60_000)
    fetch = mf.cached_dataset("item:{name}")(lambda name: {"name": "origin"})
    assert fetch("warm") == {"name": "warm"}
    assert mf.local_store.get("t:item:warm") == b'{"name":"warm"}'  # bytes: no caller holds them


# --- the direct call -----------------------------------------------------------------------


def test_each_decorated_function_has_its_own_call(mf: Memofill) -> None:
    first = mf.cached_dataset("item:{name}")(lambda name: {"first": name})
    second = mf.cached_dataset("plain:{name}")(lambda name: {"second": name})
    assert isinstance(first, CachedDataset)
    assert isinstance(second, CachedDataset)
    assert type(first).__name__ == "CachedDataset"
    assert type(first) is not type(second)
    assert first("a") == {"first": "a"}
    assert second("a") == {"second": "a"}


def test_a_function_replaced_after_decoration_is_the_one_a_miss_calls(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: {"old": name})
    fetch.__wrapped__ = lambda name: {"new": name}
    assert fetch("a") == {"new": "a"}
    assert fetch("a") == {"new": "a"}  # and a hit returns what it stored


async def test_a_coroutine_function_refuses_a_bad_argument_when_awaited(
    raw: fakeredis.FakeRedis,
) -> None:
    client = fakeredis.FakeAsyncRedis(server=raw.connection_pool.connection_kwargs["server"])
    amf = Memofill(client, prefix="t:", policies=POLICIES)

    @amf.cached_dataset("item:{name}")
    async def fetch(name: str) -> dict[str, str]:
        return {"name": name}

    pending = fetch(1.5)  # type: ignore[arg-type]
    with pytest.raises(KeyArgumentError):
        await pending
    assert await fetch("a") == {"name": "a"}
    await client.aclose()


# --- a client that fails inside itself ------------------------------------------------------


class BrokenClient(fakeredis.FakeRedis):
    """A client whose commands fail with an error that is no RedisError (a client bug)."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    def evalsha(self, *args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")


class BrokenAsyncClient(fakeredis.FakeAsyncRedis):
    async def get(self, *args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    async def evalsha(self, *args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")


def test_a_client_that_fails_inside_itself_still_serves_the_fetch() -> None:
    client = BrokenClient()
    broken = Memofill(client, prefix="t:", policies=POLICIES)
    fetch = broken.cached_dataset("item:{name}")(lambda name: {"name": name})
    result = fetch.call_with_outcome("a")
    assert (result.value, result.outcome) == ({"name": "a"}, "lock_error")
    assert not broken.breaker.is_open  # it answered nothing about Redis being down
    client.close()


async def test_an_asyncio_client_that_fails_inside_itself_still_serves_the_fetch() -> None:
    client = BrokenAsyncClient()
    broken = Memofill(client, prefix="t:", policies=POLICIES)

    @broken.cached_dataset("item:{name}")
    async def fetch(name: str) -> dict[str, str]:
        return {"name": name}

    results = await asyncio.gather(*(fetch.call_with_outcome("a") for _ in range(3)))
    assert [r.value for r in results] == [{"name": "a"}] * 3
    assert sorted(r.outcome for r in results) == ["local_join", "local_join", "lock_error"]
    await client.aclose()
