"""Through ``redis.cluster.RedisCluster`` on a real local three-master cluster.

Data key, lock key and wake stream of one entry share a hash slot, so every
command of a fill (including the two-key release script) goes to one node.
The stampede, recheck, token-safety and degrade tests of a single server run
again here; a last test kills a master in the middle of a stampede.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot

from memofill import CacheFill, Memofill
from memofill.codec import encode
from memofill.commands import Commands
from memofill.coordinator import fill
from memofill.drivers import run_sync
from memofill.fallback import Breaker
from memofill.keys import lock_key, meta_key, wake_key
from memofill.outcomes import Outcome
from memofill.steps import Plan
from tests.support.fault_helpers import (
    MARGIN_S,
    SOCKET_TIMEOUT_S,
    Stampede,
    Target,
    dataset,
    make_client,
    measure,
    note,
    origin_calls,
    recorded,
    run_stampede,
    wait_until,
)
from tests.support.helpers import failure
from tests.support.redis_servers import RedisCluster, RedisServer

pytestmark = [pytest.mark.redis_server]

FILL = CacheFill(lease_ms=2_000, wait_ms=1_000, poll_min_ms=10, poll_max_ms=100)
DATASET = dataset(FILL)
#: The key, without its prefix, of the calls with argument "x".
ENTRY = DATASET.key.format(name="x")
POLICIES = {DATASET.key: DATASET}


@pytest.fixture
def cluster_client(redis_cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    client = make_client(Target(redis_cluster.nodes[0].port, cluster=True))
    yield client
    client.close()


@pytest.fixture
def counter(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def cached(mf: Memofill, origins: list[str], fetch_s: float = 0.0) -> Any:
    @mf.cached_dataset(DATASET.key)
    def fetch(name: str) -> dict[str, str]:
        origins.append(name)
        time.sleep(fetch_s)
        return {"name": name}

    return fetch


def node_of(client: redis.cluster.RedisCluster, key: str) -> int:
    """The port of the master that serves ``key``."""
    return int(client.nodes_manager.get_node_from_slot(key_slot(key.encode())).port)


# -- slots -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_", ["", "app:", "{tenant-7}:"])
@pytest.mark.parametrize("name", ["x", "a:b", "{brace}", "new\nline", "é 日本", "~" * 300, 42])
def test_data_lock_and_wake_keys_share_a_slot_on_the_server(
    cluster_client: redis.cluster.RedisCluster, prefix_: str, name: object
) -> None:
    mf = Memofill(cluster_client, prefix=prefix_, policies=POLICIES)
    fetch = cached(mf, [])
    key = fetch.redis_key(name)
    slots = {int(cluster_client.cluster_keyslot(k)) for k in (key, lock_key(key), wake_key(key))}
    assert slots == {key_slot(key.encode())}


# -- the single-server contract, again through a cluster client ------------------------------


@pytest.mark.slow
def test_a_stampede_through_the_cluster_calls_the_origin_once(
    redis_cluster: RedisCluster, counter: redis.Redis, prefix: str, request: pytest.FixtureRequest
) -> None:
    # wait_ms covers the fill however busy the machine: the one origin call is then promised.
    patient = dataset(CacheFill(lease_ms=60_000, wait_ms=30_000, poll_min_ms=10, poll_max_ms=100))
    spec = Stampede(
        target=Target(redis_cluster.nodes[0].port, cluster=True),
        counter_port=counter.get_connection_kwargs()["port"],
        prefix=prefix,
        dataset=patient,
        fetch_s=0.3,
        threads=3,
    )
    result = run_stampede(spec, processes=3)
    measure(request, origin_calls(counter, spec), result.longest_wait_s, result.errors)
    result.assert_every_caller_got_its_value()
    assert origin_calls(counter, spec) == 1
    # One leader; every other caller followed it, joined its process's miss, or (a process
    # that started after the write) hit. How many of each depends on when processes start.
    assert result.outcomes["leader_fill"] == 1
    assert set(result.outcomes) <= {"leader_fill", "follower_hit", "local_join", "hit"}
    assert all(sum(c.values()) == spec.threads for c in result.per_process())
    assert all(c["leader_fill"] + c["follower_hit"] <= 1 for c in result.per_process())
    assert {error for _, error in result.errors} == {None}
    # The followers were woken by the leader's write, not released by wait_ms running out.
    assert result.longest_wait_s < patient.cache_fill.wait_ms / 1000


def test_the_recheck_finds_a_value_written_between_the_miss_and_the_lock(
    cluster_client: redis.cluster.RedisCluster, prefix: str
) -> None:
    key = f"{prefix}fault:x"
    cluster_client.set(key, encode({"name": "from another leader"}), px=60_000)
    plan = Plan(
        dataset=DATASET.key,
        redis_key=key,
        ttl_ms=60_000,
        negative_ttl_ms=5_000,
        cache_fill=FILL,
        block_limit_ms=SOCKET_TIMEOUT_S * 1000,
    )
    fetched: list[int] = []
    result = run_sync(
        fill(plan, time.monotonic, random.Random(1)),
        Commands(cluster_client),
        lambda: fetched.append(1),
        Breaker(),
    )
    assert result.outcome is Outcome.LEADER_RECHECK_HIT
    assert result.value == {"name": "from another leader"}
    assert result.error is None
    assert fetched == []
    assert cluster_client.get(lock_key(key)) is None  # released through the cluster


def test_release_is_token_safe_through_the_cluster(
    cluster_client: redis.cluster.RedisCluster, prefix: str
) -> None:
    key = f"{prefix}fault:x"
    commands = Commands(cluster_client)
    assert commands.acquire(lock_key(key), "theirs", 5_000, key, wake_key(key))[:3] == [1, None, []]
    assert commands.acquire(lock_key(key), "mine", 5_000, key, wake_key(key))[:3] == [0, None, []]
    # Not ours: the lock stays, the wake stream (same slot, no CROSSSLOT) still gets its entry.
    assert commands.release(lock_key(key), wake_key(key), "mine", 1_000) == 0
    assert cluster_client.get(lock_key(key)) == b"theirs"
    assert cluster_client.xlen(wake_key(key)) == 1
    assert commands.release(lock_key(key), wake_key(key), "theirs", 1_000) == 1
    assert cluster_client.get(lock_key(key)) is None


def test_a_second_leader_after_the_lease_keeps_its_lock_through_the_cluster(
    cluster_client: redis.cluster.RedisCluster, prefix: str
) -> None:
    key = f"{prefix}fault:x"
    short = dataset(CacheFill(lease_ms=300, wait_ms=200, poll_min_ms=10, poll_max_ms=50))
    mf = Memofill(cluster_client, prefix=prefix, policies={short.key: short})
    seen: list[bytes | None] = []

    @mf.cached_dataset(short.key)
    def fetch(name: str) -> dict[str, str]:
        wait_until(lambda: not cluster_client.exists(lock_key(key)), timeout_s=30)
        cluster_client.set(lock_key(key), b"second-leader", px=60_000)  # another process got in
        return {"name": name}

    with recorded() as records:
        result = fetch.call_with_outcome("x")
    seen.append(cluster_client.get(lock_key(key)))
    assert result.value == {"name": "x"}
    assert seen == [b"second-leader"]
    assert [(r["outcome"], r["error"]) for r in records] == [("leader_fill", "LeaseExpired")]
    cluster_client.delete(lock_key(key))


@pytest.mark.parametrize("marks_there", [False, True], ids=["marks-elsewhere", "marks-there"])
def test_a_stalled_master_degrades_to_a_local_fetch(
    redis_cluster: RedisCluster,
    cluster_client: redis.cluster.RedisCluster,
    request: pytest.FixtureRequest,
    marks_there: bool,
) -> None:
    """CLIENT PAUSE WRITE on the entry's master: the lock cannot be taken, the caller is served.

    The lock's write times out. Where the prefix's marks live on the paused master
    too, their read (a script, paused as a write) times out first: the value Redis
    answered is then not judged at all, and the call goes on as in an outage.
    """
    prefix = next(
        p
        for p in (f"c{uuid.uuid4().hex[:8]}:" for _ in range(1_000))
        if (node_of(cluster_client, meta_key(p)) == node_of(cluster_client, p + ENTRY))
        == marks_there
    )
    mf = Memofill(cluster_client, prefix=prefix, policies=POLICIES)
    origins: list[str] = []
    fetch = cached(mf, origins)
    key = fetch.redis_key("x")
    port = node_of(cluster_client, key)
    node = next(n for n in redis_cluster.nodes if n.port == port)
    admin = node.client()
    # Long enough that the call surely meets it; the finally block ends it at once.
    admin.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
    try:
        with recorded() as records:
            started = time.monotonic()
            result = fetch.call_with_outcome("x")
            waited = time.monotonic() - started
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    assert (result.outcome, result.value) == ("lock_error", {"name": "x"})
    assert origins == ["x"]
    error = "MarksUnread" if marks_there else "TimeoutError"
    assert [(r["outcome"], failure(r["error"])) for r in records] == [("lock_error", error)]
    measure(request, len(origins), waited, Counter({("lock_error", records[0]["error"]): 1}))
    assert waited < SOCKET_TIMEOUT_S + MARGIN_S
    # The SET NX that timed out ran on UNPAUSE: a lock nobody holds, gone after lease_ms.
    wait_until(lambda: not admin.exists(lock_key(key)), timeout_s=FILL.lease_ms / 1000 + MARGIN_S)
    admin.close()


# -- a master dies in the middle of a stampede -----------------------------------------------


def names_on_every_master(
    client: redis.cluster.RedisCluster, prefix: str, per_node: int
) -> list[str]:
    """Argument values whose entries land ``per_node`` on each master, interleaved."""
    by_node: dict[int, list[str]] = {}
    for index in range(10_000):
        name = f"n{index}"
        names = by_node.setdefault(node_of(client, f"{prefix}fault:{name}"), [])
        if len(names) < per_node:
            names.append(name)
        if len(by_node) == 3 and all(len(v) == per_node for v in by_node.values()):
            break
    return [name for group in zip(*by_node.values(), strict=True) for name in group]


@pytest.mark.slow
def test_a_master_killed_during_a_stampede(
    counter: redis.Redis, prefix: str, request: pytest.FixtureRequest
) -> None:
    cluster = RedisCluster().start()
    try:
        client = make_client(Target(cluster.nodes[0].port, cluster=True))
        names = names_on_every_master(client, prefix, per_node=2)
        victim_port = node_of(client, f"{prefix}fault:{names[0]}")
        victim = next(n for n in cluster.nodes if n.port == victim_port)
        client.close()
        entry = cluster.nodes[1] if victim is cluster.nodes[0] else cluster.nodes[0]
        spec = Stampede(
            target=Target(entry.port, cluster=True),
            counter_port=counter.get_connection_kwargs()["port"],
            prefix=prefix,
            dataset=DATASET,
            names=tuple(names),
            fetch_s=0.2,
            threads=2,
        )

        def kill_the_first_keys_master(_: float) -> None:
            wait_until(lambda: origin_calls(counter, spec) >= 1)
            victim.kill()

        # A client made while the cluster is whole (redis-py cannot make one afterwards).
        survivor = Memofill(make_client(spec.target), prefix=prefix, policies=POLICIES)
        survivor_call = cached(survivor, [])
        result = run_stampede(spec, processes=3, during=kill_the_first_keys_master)
        for node in cluster.nodes:
            node.kill()
        with recorded() as records:
            started = time.monotonic()
            last = survivor_call.call_with_outcome("gone")
            last_s = time.monotonic() - started
    finally:
        cluster.close()
    assert (last.outcome, last.value) == ("lock_error", {"name": "gone"})
    # A cluster error (whatever subclass this redis-py raises), met and classified.
    assert [failure(r["error"]) for r in records] == ["RedisClusterException"]
    note(request, "whole_cluster_down_call_s", round(last_s, 3))
    assert last_s < MARGIN_S
    measure(request, origin_calls(counter, spec), result.longest_wait_s, result.errors)
    result.assert_every_caller_got_its_value()
    per_call_bound = FILL.wait_ms / 1000 + spec.fetch_s + MARGIN_S
    assert max(call.elapsed_s for call in result.calls) < per_call_bound
    # At most one fetch per process and key: its threads coalesce.
    assert origin_calls(counter, spec) <= 3 * len(names)
    degraded = {"ConnectionError", "RedisUnavailable", "TimeoutError", "ClusterDownError"}
    degraded.add("MarksUnread")  # the GET was answered, the read of the marks was not
    # "newer": a write refused because a fill that took over stored a later value.
    assert {failure(error) for _, error in result.errors} <= degraded | {None, "newer"}
    # Every process met the dead master and degraded to local fetches.
    assert all(report.records for report in result.reports)
    # A follower whose reads of the dead master time out takes them for "not yet" (one
    # time-out is no proof), and fetches after wait_ms: follower_timeout.
    assert {r["outcome"] for r in result.records} <= {
        "leader_fill",
        "follower_hit",
        "follower_timeout",
        "lock_error",
        "local_join",
    }
    assert "lock_error" in {r["outcome"] for r in result.records}


def test_a_slot_no_master_serves_degrades_to_a_local_fetch(
    redis_cluster: RedisCluster,
    cluster_client: redis.cluster.RedisCluster,
    prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    """The cluster client raises RedisClusterException, which is no RedisError: still a value."""
    mf = Memofill(cluster_client, prefix=prefix, policies=POLICIES)
    origins: list[str] = []
    fetch = cached(mf, origins)
    key = fetch.redis_key("x")
    slot = key_slot(key.encode())
    owner = next(n for n in redis_cluster.nodes if n.port == node_of(cluster_client, key))
    others = [n for n in redis_cluster.nodes if n is not owner]

    def unserved_everywhere() -> bool:
        """Every node forgets who serves the slot, the owner first (a node that forgot it
        before the owner did may learn it again from the owner's gossip: told again)."""
        for node in [owner, *others]:
            if not slot_unserved(node, slot):
                with node.client() as admin, contextlib.suppress(redis.ResponseError):
                    admin.execute_command("CLUSTER", "DELSLOTS", slot)
        return all(slot_unserved(n, slot) for n in redis_cluster.nodes)

    try:
        wait_until(unserved_everywhere, timeout_s=30, interval_s=0.05)
        with recorded() as records:
            started = time.monotonic()
            result = fetch.call_with_outcome("x")
            waited = time.monotonic() - started
    finally:
        with owner.client() as admin:
            admin.execute_command("CLUSTER", "ADDSLOTS", slot)
        wait_until(lambda: all(cluster_ok(n) for n in redis_cluster.nodes), timeout_s=30)
        cluster_client.nodes_manager.initialize()
    assert (result.outcome, result.value) == ("lock_error", {"name": "x"})
    assert origins == ["x"]
    assert [failure(r["error"]) for r in records] == ["RedisClusterException"]
    logged = Counter({("lock_error", records[0]["error"]): 1})
    measure(request, len(origins), waited, logged)
    assert waited < MARGIN_S


def slot_unserved(node: RedisServer, slot: int) -> bool:
    with node.client() as client:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    return not any(int(r[0]) <= slot <= int(r[1]) for r in ranges)


def cluster_ok(node: RedisServer) -> bool:
    with node.client() as client:
        return str(client.cluster("info").get("cluster_state")) == "ok"


async def test_an_asyncio_cluster_client_coalesces_fills_once_and_then_hits(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    # Learn the slots first: ten first commands at once on a client that has not yet
    # would race its lazy set-up (memofill would still serve them, as lock_error).
    await client.initialize()
    mf = Memofill(client, prefix=prefix, policies=POLICIES)
    fetched: list[str] = []

    @mf.cached_dataset(DATASET.key)
    async def fetch(name: str) -> dict[str, str]:
        fetched.append(name)
        await asyncio.sleep(0.1)
        return {"name": name}

    try:
        results = await asyncio.gather(*(fetch.call_with_outcome("x") for _ in range(10)))
        assert Counter(r.outcome for r in results) == Counter(leader_fill=1, local_join=9)
        assert {r.value["name"] for r in results} == {"x"}
        assert (await fetch.call_with_outcome("x")).outcome == "hit"
        assert fetched == ["x"]
        assert await client.get(lock_key(fetch.redis_key("x"))) is None
    finally:
        await client.aclose()


# -- bulk calls ------------------------------------------------------------------------------


def test_a_batch_fills_keys_on_every_master_with_its_scripts_loaded_as_needed(
    redis_cluster: RedisCluster, cluster_client: redis.cluster.RedisCluster, prefix: str
) -> None:
    cluster_client.script_flush()  # every master meets the scripts for the first time here
    mf = Memofill(cluster_client, prefix=prefix, policies=POLICIES)
    asked: list[list[str]] = []
    fetch = cached(mf, [])

    @fetch.batch
    def fetch_many(names: list[str]) -> list[dict[str, str]]:
        asked.append(names)
        return [{"name": name} for name in names]

    names = [f"n{n}" for n in range(30)]
    assert len({node_of(cluster_client, fetch.redis_key(name)) for name in names}) == 3
    assert fetch.many(names) == [{"name": name} for name in names]
    assert fetch.many(names[::-1]) == [{"name": name} for name in names[::-1]]
    assert asked == [names]
    assert all(cluster_client.get(lock_key(fetch.redis_key(name))) is None for name in names)


async def test_an_asyncio_batch_fills_keys_on_every_master(
    redis_cluster: RedisCluster, prefix: str
) -> None:
    client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    await client.initialize()
    await client.script_flush()
    mf = Memofill(client, prefix=prefix, policies=POLICIES)
    asked: list[list[str]] = []

    @mf.cached_dataset(DATASET.key)
    async def fetch(name: str) -> dict[str, str]:
        raise AssertionError("the batch fetches")

    @fetch.batch
    async def fetch_many(names: list[str]) -> list[dict[str, str]]:
        asked.append(names)
        return [{"name": name} for name in names]

    names = [f"n{n}" for n in range(30)]
    try:
        assert await fetch.many(names) == [{"name": name} for name in names]
        assert await fetch.many(names[::-1]) == [{"name": name} for name in names[::-1]]
        assert asked == [names]
    finally:
        await client.aclose()


# -- tags ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_", ["", "{app}:"])
def test_a_tagged_value_and_its_marks_meet_across_slots(
    redis_cluster: RedisCluster, cluster_client: redis.cluster.RedisCluster, prefix_: str
) -> None:
    """Without a hash-tag prefix the value and the tags hash live apart: read together."""
    from memofill import Dataset  # noqa: PLC0415

    tagged = Dataset("profile:{name}", ttl_s=300, cache_fill=FILL, tags=("user:{name}",))
    where = f"{prefix_}{uuid.uuid4().hex[:6]}:"
    cluster_client.script_flush()
    reader = Memofill(cluster_client, prefix=where, policies=[tagged])
    writer = Memofill(cluster_client, prefix=where, policies=[tagged])
    versions = iter(range(1, 100))
    profile = reader.cached_dataset(tagged.key)(lambda name: {"version": next(versions)})
    names = [f"n{n}" for n in range(12)]
    assert [v["version"] for v in profile.many(names)] == list(range(1, 13))
    assert profile.call_with_outcome("n3").outcome == "hit"
    writer.invalidate_tag("user:n3")
    assert profile.call_with_outcome("n3").value["version"] == 13
    writer.invalidate_tag("user:n4")
    assert [v["version"] for v in profile.many(names[3:6])] == [13, 14, 6]
