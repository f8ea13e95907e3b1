"""One contract, four back ends: fakeredis and a private redis-server, each sync and asyncio.

Every test here runs against each :class:`Backend`, so the blocking and the
asyncio paths, and fakeredis and real Redis, are held to the same behaviour.
A backend hides only how a call is made (directly, or awaited); every test is
a coroutine so that it can await either.

Two :class:`~memofill.Memofill` instances on one Redis stand for two processes:
they share nothing but Redis.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio

from memofill import CachedDataset, CallResult, FillError, Memofill
from memofill.codec import NEGATIVE_MARKER, decode, encode
from memofill.keys import lock_key, wake_key
from memofill.testing import stored_payload
from tests.conftest import POLICIES
from tests.support.helpers import notify_after_acquire, stored_marker
from tests.support.redis_servers import RedisServer

#: Long enough for any step on a busy machine; the tests never wait for it unless they fail.
PATIENCE_S = 10.0


class Boom(Exception):
    """The upstream failed."""


class Origin:
    """The upstream: counts calls, can be held at a gate, can fail or return ``None``."""

    def __init__(self, result: Callable[[str], Any] | None = None) -> None:
        self.calls: list[str] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self._result = result or (lambda name: {"name": name, "n": len(self.calls)})

    def hold(self) -> Origin:
        """Make the next calls wait until :meth:`release`."""
        self.gate.clear()
        return self

    def release(self) -> None:
        self.gate.set()

    def __call__(self, name: str) -> Any:
        self.calls.append(name)
        self.entered.set()
        assert self.gate.wait(PATIENCE_S), "the test never released the origin"
        return self._result(name)


class Backend:
    """How a contract test reaches memofill: sync or asyncio, on fakeredis or a real server."""

    def __init__(self, name: str, is_async: bool, raw: redis.Redis, client: Any) -> None:
        self.name = name
        self.is_async = is_async
        #: A blocking client on the same Redis, for looking at what memofill wrote.
        self.raw = raw
        self.client = client
        self.prefix = f"c{uuid.uuid4().hex[:10]}:"

    def memofill(self, prefix: str | None = None) -> Memofill:
        """A new instance (a "process") on this backend's Redis."""
        prefix = self.prefix if prefix is None else prefix
        return Memofill(self.client, prefix=prefix, policies=POLICIES)

    def define(self, mf: Memofill, key: str, origin: Callable[[str], Any]) -> CachedDataset:
        """``origin`` decorated as a function (sync) or a coroutine function (async)."""
        if self.is_async:

            async def fetch_async(name: str) -> Any:
                return await asyncio.to_thread(origin, name)

            return mf.cached_dataset(key)(fetch_async)  # type: ignore[return-value]

        def fetch(name: str) -> Any:
            return origin(name)

        return mf.cached_dataset(key)(fetch)  # type: ignore[return-value]

    async def call(self, method: Callable[..., Any], *args: Any) -> Any:
        """Call a cached function or one of its helpers, awaiting it when async."""
        result = method(*args)
        return await result if self.is_async else result

    async def outcome(self, fn: CachedDataset, *args: Any) -> CallResult:
        result: CallResult = await self.call(fn.call_with_outcome, *args)
        return result

    def start(self, fn: CachedDataset, *args: Any) -> asyncio.Future[CallResult]:
        """Begin a call in the background: a thread (sync) or a task (async)."""
        if self.is_async:
            return asyncio.ensure_future(fn.call_with_outcome(*args))
        return asyncio.ensure_future(asyncio.to_thread(fn.call_with_outcome, *args))


@pytest.fixture(
    params=[
        "fake-sync",
        "fake-async",
        pytest.param("real-sync", marks=pytest.mark.redis_server),
        pytest.param("real-async", marks=pytest.mark.redis_server),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    kind, mode = request.param.split("-")
    is_async = mode == "async"
    if kind == "fake":
        server = fakeredis.FakeServer()
        raw: redis.Redis = fakeredis.FakeRedis(server=server)
        client: Any = fakeredis.FakeAsyncRedis(server=server) if is_async else raw
    else:
        real: RedisServer = request.getfixturevalue("redis_server")
        raw = real.client()
        client = redis.asyncio.Redis(port=real.port) if is_async else raw
    yield Backend(request.param, is_async, raw, client)
    if is_async:
        await client.aclose()
    raw.close()


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, PATIENCE_S), "the event never happened"


# --- hit, miss, negative, error --------------------------------------------------------


async def test_a_miss_fills_once_and_later_calls_hit(backend: Backend) -> None:
    mf = backend.memofill()
    origin = Origin()
    fetch = backend.define(mf, "item:{name}", origin)
    assert await backend.outcome(fetch, "a") == CallResult(
        {"name": "a", "n": 1}, "leader_fill", True
    )
    assert await backend.outcome(fetch, "a") == CallResult({"name": "a", "n": 1}, "hit", False)
    assert await backend.call(fetch, "a") == {"name": "a", "n": 1}
    assert origin.calls == ["a"]
    assert mf.counters.snapshot() == {"item:{name}": {"hit": 2, "leader_fill": 1}}


async def test_the_value_is_stored_as_orjson_bytes_with_the_dataset_ttl(backend: Backend) -> None:
    mf = backend.memofill()
    fetch = backend.define(mf, "item:{name}", Origin(lambda name: {"é": [1, 2.5, None]}))
    await backend.call(fetch, "a")
    key = backend.prefix + "item:a"
    assert stored_payload(backend.raw.get(key)) == encode({"é": [1, 2.5, None]})
    assert 55_000 < backend.raw.pttl(key) <= 60_000
    assert backend.raw.exists(lock_key(key)) == 0  # released
    # The wake stream does not linger: it has a TTL, or has already gone (a busy machine).
    wake_ttl = backend.raw.pttl(wake_key(key))
    assert wake_ttl == -2 or 0 < wake_ttl <= 60_000


async def test_values_come_back_from_the_cache_as_plain_json_data(backend: Backend) -> None:
    mf = backend.memofill()
    fetch = backend.define(mf, "item:{name}", Origin(lambda name: {"t": (1, 2)}))
    assert await backend.call(fetch, "a") == {"t": (1, 2)}  # the leader has the origin's own
    assert await backend.call(fetch, "a") == {"t": [1, 2]}


async def test_none_is_cached_as_a_negative_result(backend: Backend) -> None:
    mf = backend.memofill()
    origin = Origin(lambda name: None)
    fetch = backend.define(mf, "item:{name}", origin)
    assert await backend.outcome(fetch, "a") == CallResult(None, "negative", True)
    assert await backend.outcome(fetch, "a") == CallResult(None, "hit", False)
    assert origin.calls == ["a"]
    key = backend.prefix + "item:a"
    assert stored_marker(backend.raw.get(key)) == NEGATIVE_MARKER
    assert 25_000 < backend.raw.pttl(key) <= 30_000  # negative_ttl_s, not ttl_s


async def test_a_failed_fill_raises_and_the_next_call_asks_again(backend: Backend) -> None:
    mf = backend.memofill()
    outcomes = iter([Boom("upstream said no"), {"name": "a"}])

    def flaky(name: str) -> Any:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    origin = Origin(flaky)
    fetch = backend.define(mf, "item:{name}", origin)
    with pytest.raises(Boom):
        await backend.call(fetch, "a")
    key = backend.prefix + "item:a"
    assert backend.raw.exists(key) == 0  # no error is remembered by default
    assert backend.raw.exists(lock_key(key)) == 0
    assert await backend.call(fetch, "a") == {"name": "a"}
    assert origin.calls == ["a", "a"]


async def test_a_failed_fill_is_remembered_for_error_ttl_s(backend: Backend) -> None:
    mf = backend.memofill()

    def fail(name: str) -> Any:
        raise Boom(f"upstream said no about {name}")

    origin = Origin(fail)
    fetch = backend.define(mf, "careful:{name}", origin)
    with pytest.raises(Boom):
        await backend.call(fetch, "a")
    key = backend.prefix + "careful:a"
    assert stored_marker(backend.raw.get(key)) == b"\x00memofill:error:Boom"
    assert 0 < backend.raw.pttl(key) <= 5_000
    assert backend.raw.exists(lock_key(key)) == 0
    with pytest.raises(FillError, match="Boom") as info:
        await backend.call(fetch, "a")
    assert (info.value.dataset, info.value.redis_key, info.value.error) == (
        "careful:{name}",
        key,
        "Boom",
    )
    assert origin.calls == ["a"]  # the remembered failure spared the upstream
    await backend.call(fetch.invalidate, "a")
    with pytest.raises(Boom):
        await backend.call(fetch, "a")
    assert origin.calls == ["a", "a"]


async def test_an_unencodable_value_is_returned_but_not_cached(backend: Backend) -> None:
    mf = backend.memofill()
    marker = object()
    origin = Origin(lambda name: {"obj": marker})
    fetch = backend.define(mf, "item:{name}", origin)
    assert (await backend.call(fetch, "a"))["obj"] is marker
    assert (await backend.call(fetch, "a"))["obj"] is marker
    assert origin.calls == ["a", "a"]
    assert backend.raw.exists(backend.prefix + "item:a") == 0
    assert backend.raw.exists(lock_key(backend.prefix + "item:a")) == 0


async def test_corrupt_bytes_are_a_miss_and_the_fill_replaces_them(backend: Backend) -> None:
    mf = backend.memofill()
    origin = Origin()
    fetch = backend.define(mf, "item:{name}", origin)
    key = backend.prefix + "item:a"
    backend.raw.set(key, b"\xff\x00 not json")
    assert (await backend.outcome(fetch, "a")).outcome == "leader_fill"
    assert decode(stored_payload(backend.raw.get(key))) == {"name": "a", "n": 1}


# --- invalidate, outcome, keys, prefixes -----------------------------------------------


async def test_invalidate_makes_the_next_call_fill_again(backend: Backend) -> None:
    mf = backend.memofill()
    origin = Origin()
    fetch = backend.define(mf, "item:{name}", origin)
    await backend.call(fetch, "a")
    await backend.call(fetch, "b")
    assert await backend.call(fetch.invalidate, "a") == 1
    assert await backend.outcome(fetch, "b") == CallResult({"name": "b", "n": 2}, "hit", False)
    assert await backend.outcome(fetch, "a") == CallResult(
        {"name": "a", "n": 3}, "leader_fill", True
    )


async def test_template_fields_name_separate_entries_escaped(backend: Backend) -> None:
    mf = backend.memofill()
    origin = Origin()
    fetch = backend.define(mf, "item:{name}", origin)
    for name in ["a", "b", "a:b", "a/b c"]:
        assert (await backend.call(fetch, name))["name"] == name
    assert origin.calls == ["a", "b", "a:b", "a/b c"]
    keys = sorted(k.decode() for k in backend.raw.scan_iter(backend.prefix + "item:*"))
    item = backend.prefix + "item:"
    assert keys == [item + "a", item + "a%2Fb%20c", item + "a%3Ab", item + "b"]


async def test_prefixes_isolate_values_and_locks(backend: Backend) -> None:
    blue, green = (
        backend.memofill(backend.prefix + "blue:"),
        backend.memofill(backend.prefix + "green:"),
    )
    blue_origin, green_origin = Origin(lambda n: "blue"), Origin(lambda n: "green")
    blue_fetch = backend.define(blue, "item:{name}", blue_origin)
    green_fetch = backend.define(green, "item:{name}", green_origin)
    assert await backend.call(blue_fetch, "a") == "blue"
    assert await backend.call(green_fetch, "a") == "green"
    assert await backend.call(blue_fetch, "a") == "blue"
    assert (blue_origin.calls, green_origin.calls) == (["a"], ["a"])
    assert blue.lock_key("item:{name}", name="a") != green.lock_key("item:{name}", name="a")
    await backend.call(blue_fetch.invalidate, "a")
    assert (await backend.outcome(green_fetch, "a")).outcome == "hit"


async def test_a_dataset_without_a_fill_policy_takes_the_legacy_path(backend: Backend) -> None:
    mf = backend.memofill()
    origin = Origin()
    fetch = backend.define(mf, "plain:{name}", origin)
    assert await backend.outcome(fetch, "a") == CallResult({"name": "a", "n": 1}, "legacy", True)
    assert await backend.outcome(fetch, "a") == CallResult({"name": "a", "n": 1}, "hit", False)
    assert backend.raw.exists(lock_key(backend.prefix + "plain:a")) == 0


# --- two processes ---------------------------------------------------------------------


async def test_a_second_process_follows_the_leader_and_never_fetches(backend: Backend) -> None:
    leader_mf, follower_mf = backend.memofill(), backend.memofill()
    origin = Origin().hold()
    leader = backend.start(backend.define(leader_mf, "item:{name}", origin), "a")
    await wait_for(origin.entered)
    following = notify_after_acquire(follower_mf)
    follower = backend.start(backend.define(follower_mf, "item:{name}", origin), "a")
    await wait_for(following)
    origin.release()
    led, followed = await leader, await follower
    assert led == CallResult({"name": "a", "n": 1}, "leader_fill", True)
    assert followed == CallResult({"name": "a", "n": 1}, "follower_hit", False)
    assert origin.calls == ["a"]


async def test_a_follower_is_told_when_the_leader_fails(backend: Backend) -> None:
    leader_mf, follower_mf = backend.memofill(), backend.memofill()

    def fail(name: str) -> Any:
        raise Boom

    origin = Origin(fail).hold()
    leader = backend.start(backend.define(leader_mf, "item:{name}", origin), "a")
    await wait_for(origin.entered)
    following = notify_after_acquire(follower_mf)
    follower = backend.start(backend.define(follower_mf, "item:{name}", origin), "a")
    await wait_for(following)
    origin.release()
    with pytest.raises(Boom):
        await leader
    with pytest.raises(FillError, match="Boom"):
        await follower
    assert origin.calls == ["a"]


async def test_a_follower_whose_leader_vanished_fetches_after_wait_ms(backend: Backend) -> None:
    mf = backend.memofill()
    key = backend.prefix + "fast:a"
    backend.raw.set(lock_key(key), "a-leader-that-died", px=5_000)
    origin = Origin()
    fetch = backend.define(mf, "fast:{name}", origin)
    started = asyncio.get_running_loop().time()
    result = await backend.outcome(fetch, "a")
    waited = asyncio.get_running_loop().time() - started
    assert result == CallResult({"name": "a", "n": 1}, "follower_timeout", True)
    assert 0.45 < waited < 5  # wait_ms is 500
    assert decode(stored_payload(backend.raw.get(key))) == {"name": "a", "n": 1}
    assert backend.raw.get(lock_key(key)) == b"a-leader-that-died"  # not its lock to release
