"""What ``invalidate_tag`` promises to readers, on real redis-server processes.

A call that starts after ``invalidate_tag()`` returned, in any process, never
gets a value bearing that tag whose fetch began before it; other tags, other
values and untagged datasets are untouched. Two :class:`~memofill.Memofill`
instances stand for two processes (each reads the marks itself); races are
driven with events, not sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import multiprocessing
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
import redis.asyncio
import redis.connection
from redis.connection import PythonRespSerializer

from memofill import CacheFill, Dataset, FillError, Memofill
from memofill.cli import main
from memofill.codegen import render
from memofill.commands import _packed_in_python
from memofill.keys import tags_key
from tests.support.helpers import HeldOrigin, closed_at_end
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis_server

PATIENCE_S = 10.0
FILL = CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=5, poll_max_ms=50)
PROFILE = Dataset(
    "profile:{user_id}", ttl_s=300, negative_ttl_s=60, cache_fill=FILL, tags=("user:{user_id}",)
)
ORDERS = Dataset(
    "orders:{user_id}:{page}", ttl_s=300, cache_fill=FILL, tags=("user:{user_id}", "orders")
)
PLAIN = Dataset("plain:{user_id}", ttl_s=300, cache_fill=FILL)
STALE = Dataset("feed:{user_id}", ttl_s=300, stale_s=60, cache_fill=FILL, tags=("user:{user_id}",))
POLICIES = [PROFILE, ORDERS, PLAIN, STALE]


def instance(server: RedisServer, prefix: str, **options: Any) -> Memofill:
    client = options.pop("client", None) or server.client()
    closed_at_end(client)
    policies = options.pop("policies", POLICIES)
    return Memofill(client, prefix=prefix, policies=policies, meta_check_ms=50, **options)


def functions(cache: Memofill, origin: HeldOrigin) -> tuple[Any, Any, Any]:
    def of_user(user_id: int) -> dict[str, Any]:
        return origin(user_id)

    def of_page(user_id: int, page: int) -> dict[str, Any]:
        return origin(user_id, page)

    profile = cache.cached_dataset(PROFILE.key)(of_user)
    orders = cache.cached_dataset(ORDERS.key)(of_page)
    plain = cache.cached_dataset(PLAIN.key)(of_user)
    return profile, orders, plain


def test_a_tag_invalidated_in_one_process_is_refilled_in_every_dataset_of_another(
    redis_server: RedisServer, prefix: str
) -> None:
    origin = HeldOrigin()
    reader, writer = instance(redis_server, prefix), instance(redis_server, prefix)
    profile, orders, plain = functions(reader, origin)
    before = {
        "profile 42": profile(42),
        "orders 42": orders(42, 1),
        "profile 7": profile(7),
        "orders 7": orders(7, 1),
        "plain 42": plain(42),
    }
    assert profile.call_with_outcome(42).outcome == "hit"
    writer.invalidate_tag("user:42")
    assert profile.call_with_outcome(42).outcome == "leader_fill"
    assert orders(42, 1)["version"] > before["orders 42"]["version"]
    assert profile(42)["version"] > before["profile 42"]["version"]
    # Other tags, and a dataset without tags, are untouched.
    assert profile.call_with_outcome(7).outcome == "hit"
    assert orders(7, 1) == before["orders 7"]
    assert plain(42) == before["plain 42"]
    writer.invalidate_tag("orders")  # a fixed tag: every value of the orders dataset
    assert orders.call_with_outcome(7, 1).outcome == "leader_fill"
    assert profile.call_with_outcome(7).outcome == "hit"


def test_a_fill_that_straddles_invalidate_tag_never_becomes_servable(
    redis_server: RedisServer, prefix: str
) -> None:
    origin = HeldOrigin()
    cache, other = instance(redis_server, prefix), instance(redis_server, prefix)
    profile, _, _ = functions(cache, origin)
    origin.hold()
    out: dict[str, Any] = {}
    leader = threading.Thread(target=lambda: out.update(leader=profile(42)))
    leader.start()
    assert origin.entered.wait(PATIENCE_S)
    other.invalidate_tag("user:42")
    # A caller of the leader's own process that starts now fills anew: it knows the mark.
    joiner = threading.Thread(target=lambda: out.update(joiner=profile.call_with_outcome(42)))
    joiner.start()
    origin.go.set()
    leader.join(PATIENCE_S)
    joiner.join(PATIENCE_S)
    assert out["leader"]["version"] == 1  # began before the invalidation: may get it
    assert out["joiner"].value["version"] >= 2
    reader, _, _ = functions(instance(redis_server, prefix), HeldOrigin())
    assert reader(42)["version"] >= 2  # the straddling fill's write is never served


def test_a_soft_tag_invalidation_serves_stale_while_one_refreshes(
    redis_server: RedisServer, prefix: str
) -> None:
    origin = HeldOrigin()
    cache = instance(redis_server, prefix)

    @cache.cached_dataset(STALE.key)
    def feed(user_id: int) -> dict[str, Any]:
        return origin(user_id)

    assert feed(42)["version"] == 1
    instance(redis_server, prefix).invalidate_tag("user:42", soft=True)
    stale = feed.call_with_outcome(42)
    assert (stale.outcome, stale.value["version"]) == ("stale_hit", 1)
    deadline = time.monotonic() + PATIENCE_S
    while cache.refreshes.in_flight():  # the refresh runs on a worker thread
        assert time.monotonic() < deadline
        time.sleep(0.005)
    fresh = feed.call_with_outcome(42)
    assert (fresh.outcome, fresh.value["version"]) == ("hit", 2)


def test_losing_the_tags_hash_never_revives_an_invalidated_value(
    redis_server: RedisServer, prefix: str
) -> None:
    origin = HeldOrigin()
    cache = instance(redis_server, prefix)
    profile, _, _ = functions(cache, origin)
    assert profile(42)["version"] == 1
    writer = instance(redis_server, prefix)
    writer.invalidate_tag("user:42")
    admin = redis_server.client()
    admin.delete(tags_key(prefix))  # an eviction, a DEL, a restart without persistence
    admin.close()
    assert profile(42)["version"] == 2  # born again: what was written before is behind


@pytest.mark.parametrize("near", [False, True])
def test_a_cached_none_or_failure_fetched_before_an_invalidation_is_not_served(
    redis_server: RedisServer, prefix: str, near: bool
) -> None:
    """A marker is stamped as a value is: ``invalidate_tag`` and ``invalidate_dataset``
    reject a cached ``None`` (negative_ttl_s) or failure (error_ttl_s) fetched before."""
    near_ms = {"near_ms": 60_000} if near else {}
    careful = Dataset(
        "careful:{user_id}", ttl_s=300, error_ttl_s=30, cache_fill=FILL, tags=("user:{user_id}",)
    )
    profile_policy = attrs.evolve(PROFILE, **near_ms)
    cache = instance(redis_server, prefix, policies=[profile_policy, careful])
    results: dict[str, list[Any]] = {"profile": [None, {"v": 2}, {"v": 3}], "careful": []}

    @cache.cached_dataset(PROFILE.key)
    def profile(user_id: int) -> Any:
        return results["profile"].pop(0)

    @cache.cached_dataset(careful.key)
    def guarded(user_id: int) -> Any:
        if not results["careful"]:
            raise LookupError("upstream down")
        return results["careful"].pop(0)

    assert profile(42) is None
    assert profile.call_with_outcome(42).outcome == "hit"  # the cached None
    with pytest.raises(LookupError):
        guarded(42)
    with pytest.raises(FillError, match="LookupError"):
        guarded(42)  # the remembered failure
    results["careful"].append({"v": "back"})
    cache.invalidate_tag("user:42")
    assert profile(42) == {"v": 2}
    assert guarded(42) == {"v": "back"}
    results["profile"].insert(0, None)
    cache.invalidate_tag("user:42")
    assert profile.many([42]) == [None]
    cache.invalidate_dataset(PROFILE.key)
    assert profile.many([42]) == [{"v": 3}]


def test_a_tagged_hit_is_one_round_trip_and_a_page_of_them_one_too(
    redis_server: RedisServer, prefix: str
) -> None:
    client = redis_server.client()
    cache = instance(redis_server, prefix, client=client)
    profile, _, _ = functions(cache, HeldOrigin())
    users = list(range(20))
    profile.many(users)
    cache.invalidate_tag("user:3")
    assert profile.many(users)[3]["version"] == 21
    sent = 0
    pool = client.connection_pool
    get = pool.get_connection

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal sent
        sent += 1
        return get(*args, **kwargs)

    pool.get_connection = counted  # type: ignore[method-assign]
    assert profile.call_with_outcome(5).outcome == "hit"
    assert sent == 1
    sent = 0
    page = profile.many(users)
    assert [value["args"] for value in page] == [[user] for user in users]
    assert sent == 1


def test_twenty_thousand_tags_invalidated_change_neither_a_hits_round_trips_nor_memory(
    redis_server: RedisServer, prefix: str
) -> None:
    """A process keeps no tag's mark: every tagged read takes its own tags' from Redis,
    and the hash it reads them from may hold any number of others."""
    client = redis_server.client()
    closed_at_end(client)
    # The dataset marks read once: each round trip counted below is a hit's.
    reader = Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=3_600_000)
    writer = instance(redis_server, prefix)
    profile, _, _ = functions(reader, HeldOrigin())
    users = list(range(50))
    profile.many(users)
    writer.invalidate_tag("user:1")  # the scripts loaded, the hash born

    def hits() -> int:
        sent = 0
        get = client.connection_pool.get_connection

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal sent
            sent += 1
            return get(*args, **kwargs)

        client.connection_pool.get_connection = counted  # type: ignore[method-assign]
        try:
            for user in users[2:]:
                assert profile.call_with_outcome(user).outcome == "hit"
        finally:
            client.connection_pool.get_connection = get  # type: ignore[method-assign]
        return sent

    assert hits() == 48
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for user in range(1_000, 21_000):  # tags no value bears now: any user's
            reader.invalidate_tag(f"user:{user}")
        assert hits() == 48  # one round trip each, as before
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, f"{grown} bytes kept after 20,000 tags were invalidated"
    assert client.hlen(tags_key(prefix)) > 20_000  # Redis keeps them, for their lifetime


async def test_an_asyncio_reader_refills_what_a_tag_invalidated(
    redis_server: RedisServer, prefix: str
) -> None:
    client = redis.asyncio.Redis(port=redis_server.port)
    cache = Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=50)
    versions = itertools.count(1)

    @cache.cached_dataset(PROFILE.key)
    async def profile(user_id: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"version": next(versions)}

    try:
        assert (await profile(42))["version"] == 1
        assert (await profile.call_with_outcome(42)).outcome == "hit"
        instance(redis_server, prefix).invalidate_tag("user:42")
        assert (await profile(42))["version"] == 2
        assert [v["version"] for v in await profile.many([42, 7])] == [2, 3]
        await cache.invalidate_tag("user:7")
        assert [v["version"] for v in await profile.many([42, 7])] == [2, 4]
    finally:
        await client.aclose()


def test_the_invalidate_command_makes_readers_refill(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    module = tmp_path / "policies.py"
    module.write_text(render(POLICIES, "registry.py"))
    origin = HeldOrigin()
    profile, _, _ = functions(instance(redis_server, prefix), origin)
    assert profile(42)["version"] == 1
    common = ["--url", redis_server.url, "--prefix", prefix, "--policies", str(module)]
    assert main(["invalidate", "--tag", "user:42", *common]) == 0
    assert profile.call_with_outcome(42).value["version"] == 2


@pytest.mark.parametrize("single", [False, True])
def test_a_tagged_read_of_a_key_of_another_type_is_refilled_and_leaves_the_pool_sound(
    redis_server: RedisServer, prefix: str, single: bool
) -> None:
    """The value's reply is an error (WRONGTYPE): the marks' reply is still read, so the
    connection stays in step; a single-connection client reads through a pipeline."""
    client = redis.Redis(port=redis_server.port, single_connection_client=single)
    origin = HeldOrigin()
    profile, _, _ = functions(instance(redis_server, prefix, client=client), origin)
    admin = redis_server.client()
    admin.rpush(profile.redis_key(42), b"not a value")
    admin.close()
    assert profile(42)["version"] == 1
    assert profile.call_with_outcome(42).outcome == "hit"
    assert [profile(user)["args"] for user in (7, 8)] == [[7], [8]]


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_tagged_hit_reads_the_key_its_client_wrote_whatever_the_client_encoding(
    redis_server: RedisServer, prefix: str, encoding: str
) -> None:
    """A tagged read packs its own commands, in UTF-8; a client that encodes texts
    otherwise reads as it writes (a prefix of ``é`` is other bytes in Latin-1)."""
    client = redis.Redis(port=redis_server.port, encoding=encoding)
    cache = instance(redis_server, "é" + prefix, client=client)
    profile, _, _ = functions(cache, HeldOrigin())
    assert profile(42)["version"] == 1
    assert profile.call_with_outcome(42).outcome == "hit"
    assert client.exists(profile.redis_key(42).encode(encoding)) == 1
    cache.invalidate_tag("user:42")
    assert profile(42)["version"] == 2


def test_commands_are_packed_in_python_as_redis_py_packs_them() -> None:
    """Where hiredis is not installed, a tagged read packs its commands in Python."""
    commands = [("GET", "k:é"), ("HMGET", "p:#tags", "born", "t:user:é", "")]
    encoder = redis.connection.Encoder("utf-8", "strict", decode_responses=False)
    expected = PythonRespSerializer(65536, encoder.encode)
    assert b"".join(_packed_in_python(commands)) == b"".join(
        b"".join(expected.pack(*command)) for command in commands
    )


def test_a_dataset_filled_without_a_lock_stamps_after_the_marks_it_read(
    redis_server: RedisServer, prefix: str
) -> None:
    """A fill that takes no lock stamps Redis's clock as last read: the tags hash's birth
    and marks count as read, else its values would be behind them and never served."""
    legacy = Dataset("legacy:{user_id}", ttl_s=300, tags=("user:{user_id}",))
    client = redis_server.client()
    closed_at_end(client)
    cache = Memofill(client, prefix=prefix, policies=[legacy], meta_check_ms=60_000)
    versions = itertools.count(1)

    @cache.cached_dataset(legacy.key)
    def value(user_id: int) -> int:
        return next(versions)

    assert value(7) == 1
    assert value.call_with_outcome(7).outcome == "hit"
    instance(redis_server, prefix).invalidate_tag("user:7")
    assert value(7) == 2
    assert value.call_with_outcome(7).outcome == "hit"


NEAR = Dataset(
    "card:{user_id}", ttl_s=600, near_ms=300_000, cache_fill=FILL, tags=("user:{user_id}",)
)


def test_near_copies_bearing_a_tag_go_when_another_process_invalidates_it(
    redis_server: RedisServer, prefix: str
) -> None:
    """The listener tracks the tags hash: a tag invalidated elsewhere drops the copies of
    every dataset that bears tags (a tag names no keys); those of other datasets stay."""
    from memofill import NearCache  # noqa: PLC0415

    untagged = Dataset("badge:{user_id}", ttl_s=300, near_ms=60_000, cache_fill=FILL)
    cache = Memofill(
        redis_server.client(), prefix=prefix, policies=[NEAR, untagged], near=NearCache()
    )
    versions = itertools.count(1)

    @cache.cached_dataset(NEAR.key)
    def card(user_id: int) -> dict[str, Any]:
        return {"version": next(versions)}

    @cache.cached_dataset(untagged.key)
    def badge(user_id: int) -> dict[str, Any]:
        return {"version": next(versions)}

    try:
        deadline = time.monotonic() + PATIENCE_S
        while card.call_with_outcome(42).outcome != "near_hit":  # the listener up, a copy made
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert card(7)["version"] == 2
        assert badge(42)["version"] == 3
        while badge.call_with_outcome(42).outcome != "near_hit":  # a hit makes the copy
            assert time.monotonic() < deadline
            time.sleep(0.01)
        instance(redis_server, prefix, policies=[NEAR]).invalidate_tag("user:42")
        deadline = time.monotonic() + PATIENCE_S  # the listener's lag, not near_ms
        while (value := card(42))["version"] == 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert value["version"] == 4
        assert card.call_with_outcome(7).outcome == "hit"  # its copy went too, read again
        assert badge.call_with_outcome(42).outcome == "near_hit"  # no tags: its copy stays
        cache.invalidate_tag("user:42")  # this process's own: the same
        assert card.call_with_outcome(42).outcome == "leader_fill"
        assert badge.call_with_outcome(42).outcome == "near_hit"
    finally:
        cache.local_store.attach(None)


async def test_an_asyncio_near_copy_bearing_a_tag_goes_when_the_tag_is_invalidated(
    redis_server: RedisServer, prefix: str
) -> None:
    from memofill import NearCache  # noqa: PLC0415

    client = redis.asyncio.Redis(port=redis_server.port)
    cache = Memofill(client, prefix=prefix, policies=[NEAR], near=NearCache())
    versions = itertools.count(1)

    @cache.cached_dataset(NEAR.key)
    async def card(user_id: int) -> dict[str, Any]:
        return {"version": next(versions)}

    try:
        deadline = time.monotonic() + PATIENCE_S
        while (await card.call_with_outcome(42)).outcome != "near_hit":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        instance(redis_server, prefix, policies=[NEAR]).invalidate_tag("user:42")
        deadline = time.monotonic() + PATIENCE_S
        while (await card(42))["version"] == 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        cache.local_store.attach(None)
        await client.aclose()


# --- several processes ------------------------------------------------------------------


def _reader(port: int, prefix: str, commands: Any, out: Any) -> None:
    """One process: its own instance; on each word, reads user 42's profile and orders."""
    client = redis.Redis(host="127.0.0.1", port=port)
    cache = Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=50)

    @cache.cached_dataset(PROFILE.key)
    def profile(user_id: int) -> dict[str, Any]:
        return {"version": client.incr(prefix + "fetches")}

    @cache.cached_dataset(ORDERS.key)
    def orders(user_id: int, page: int) -> dict[str, Any]:
        return {"version": client.incr(prefix + "fetches")}

    while commands.get(timeout=PATIENCE_S) == "read":
        out.put((profile(42)["version"], orders(42, 1)["version"], profile(7)["version"]))


def test_processes_never_serve_a_value_of_a_tag_invalidated_in_another(
    redis_server: RedisServer, prefix: str
) -> None:
    context = multiprocessing.get_context("spawn")
    readers = [(context.Queue(), context.Queue()) for _ in range(3)]
    processes = [
        context.Process(target=_reader, args=(redis_server.port, prefix, commands, out))
        for commands, out in readers
    ]
    for process in processes:
        process.start()

    def read() -> list[tuple[int, int, int]]:
        for commands, _ in readers:
            commands.put("read")
        return [out.get(timeout=PATIENCE_S) for _, out in readers]

    try:
        before = read()
        assert len(set(before)) == 1  # one fill of each key across the three processes
        instance(redis_server, prefix).invalidate_tag("user:42")  # returned: from now on
        after = read()
        assert len(set(after)) == 1
        ((profile, orders, other),) = set(after)
        ((old_profile, old_orders, old_other),) = set(before)
        assert profile > old_profile  # refilled, once for all three
        assert orders > old_orders
        assert other == old_other  # user 7's value untouched
    finally:
        for commands, _ in readers:
            commands.put("stop")
        for process in processes:
            process.join(PATIENCE_S)


def test_a_value_behind_marks_is_told_apart_in_records_and_metrics(
    redis_server: RedisServer, prefix: str
) -> None:
    """Which marks made a value unservable: its dataset's, or its tags'."""
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    from memofill.contrib.prometheus import MemofillCollector  # noqa: PLC0415

    cache = instance(redis_server, prefix)
    profile, _, _ = functions(cache, HeldOrigin())
    seen: list[Any] = []
    cache.events.subscribe(seen.append)
    profile(42)
    cache.invalidate_tag("user:42")
    profile(42)
    cache.invalidate_dataset(PROFILE.key)
    profile(42)
    profile(7)  # nothing there: behind nothing
    fills = [(r.outcome.value, r.behind) for r in seen if hasattr(r, "behind")]
    assert fills == [
        ("leader_fill", None),
        ("leader_fill", "tags"),
        ("leader_fill", "dataset"),
        ("leader_fill", None),
    ]
    registry = CollectorRegistry()
    registry.register(MemofillCollector(cache))
    text = generate_latest(registry).decode()
    assert 'memofill_behind_marks_total{dataset="profile:{user_id}",marks="tags"} 1.0' in text
    assert 'memofill_behind_marks_total{dataset="profile:{user_id}",marks="dataset"} 1.0' in text
