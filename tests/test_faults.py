"""Faults of one Redis server: callers still get values, origin calls stay bounded, nobody hangs.

Every test runs real processes (or real clients) against a private
``redis-server`` that it starts, stops, pauses or kills itself. The fetch
counts itself with ``INCR`` on the session's other server, so the count survives
the faults. docs/failure_modes.rst tabulates what these tests measure.
"""

from __future__ import annotations

import ast
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis

import memofill
from memofill import CacheFill, Memofill, Outcome
from memofill.coordinator import fill
from memofill.fallback import Breaker, LocalStore
from memofill.keys import lock_key
from memofill.steps import FETCH, Plan
from memofill.testing import stored_payload
from tests.support.fault_helpers import (
    FAULT_FILL,
    MARGIN_S,
    PATIENT_SOCKET_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    Stampede,
    Target,
    Workers,
    dataset,
    make_client,
    measure,
    note,
    origin_calls,
    recorded,
    run_stampede,
    wait_until,
)
from tests.support.helpers import failure, failures
from tests.support.redis_servers import RedisServer, free_port, running_server

pytestmark = [pytest.mark.redis_server]


@pytest.fixture
def counter(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The origin counter: the session server, never the one a test breaks."""
    client = redis_server.client()
    yield client
    client.close()


def stampede(
    server_port: int,
    counter: redis.Redis,
    prefix: str,
    socket_timeout: float = SOCKET_TIMEOUT_S,
    **changes: Any,
) -> Stampede:
    port = counter.get_connection_kwargs()["port"]
    return Stampede(
        target=Target(server_port, socket_timeout=socket_timeout),
        counter_port=port,
        prefix=prefix,
        dataset=changes.pop("dataset", dataset()),
        **changes,
    )


def mine(records: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """The records of this test's keys (a thread of another test may still be logging)."""
    return [r for r in records if r["redis_key"].startswith(prefix)]


def by_outcome(records: list[dict[str, Any]]) -> Counter[tuple[str, str | None]]:
    return Counter((r["outcome"], r["error"]) for r in records)


def assert_next_call_is_served(spec: Stampede, prefix: str) -> str:
    """A new process's call after the fault: served from Redis, with one fetch at most."""
    mf = Memofill(
        make_client(spec.target), prefix=prefix, policies={spec.dataset.key: spec.dataset}
    )
    fetch = mf.cached_dataset(spec.dataset.key)(lambda name: {"name": name})
    started = time.monotonic()
    result = fetch.call_with_outcome("x")
    assert result.value["name"] == "x"
    assert result.outcome in {"hit", "leader_fill"}, result
    assert time.monotonic() - started < MARGIN_S
    return result.outcome


# -- 1. Redis unreachable, killed, paused, restarted ------------------------------------------


@pytest.mark.slow
def test_redis_unreachable_from_the_start(
    counter: redis.Redis, prefix: str, request: pytest.FixtureRequest
) -> None:
    spec = stampede(free_port(), counter, prefix, fetch_s=0.5)
    result = run_stampede(spec, processes=3)
    measure(request, origin_calls(counter, spec), result.longest_wait_s, result.errors)

    result.assert_every_caller_got_its_value()
    assert origin_calls(counter, spec) == 3  # one per process: threads still coalesce
    assert result.per_process() == [Counter(lock_error=1, local_join=2)] * 3
    assert {failure(r["error"]) for r in result.records if r["outcome"] == "lock_error"} == {
        "ConnectionError"
    }
    assert result.longest_wait_s < spec.fetch_s + MARGIN_S


@pytest.mark.slow
def test_redis_killed_mid_stampede(
    own_redis_server: RedisServer, counter: redis.Redis, prefix: str, request: pytest.FixtureRequest
) -> None:
    spec = stampede(own_redis_server.port, counter, prefix, fetch_s=0.6, threads=2)

    def kill_during_the_fetch(_: float) -> None:
        wait_until(lambda: origin_calls(counter, spec) >= 1)
        time.sleep(0.1)  # the followers are blocked on the wake stream by now
        own_redis_server.kill()

    result = run_stampede(spec, processes=3, during=kill_during_the_fetch)
    measure(request, origin_calls(counter, spec), result.longest_wait_s, result.errors)

    result.assert_every_caller_got_its_value()
    # The leader's fetch, and one local fetch per follower process.
    assert origin_calls(counter, spec) == 3
    assert sorted(result.per_process(), key=str) == sorted(
        [Counter(leader_fill=1, local_join=1)] + [Counter(lock_error=1, local_join=1)] * 2, key=str
    )
    assert result.longest_wait_s < 2 * spec.fetch_s + MARGIN_S

    # Back up, empty: the next miss fills normally.
    own_redis_server.start()
    with recorded() as records:
        mf = Memofill(
            make_client(spec.target), prefix=prefix, policies={spec.dataset.key: spec.dataset}
        )
        fetch = mf.cached_dataset(spec.dataset.key)(lambda name: {"name": name})
        assert fetch.call_with_outcome("x").outcome == "leader_fill"
        assert fetch.call_with_outcome("x").outcome == "hit"
    assert by_outcome(records) == Counter({("leader_fill", None): 1})


@pytest.mark.slow
def test_redis_paused_longer_than_the_socket_timeout_then_resumed(
    own_redis_server: RedisServer, counter: redis.Redis, prefix: str, request: pytest.FixtureRequest
) -> None:
    spec = stampede(own_redis_server.port, counter, prefix, fetch_s=0.6, threads=2)
    # Far longer than any caller should wait, so "nobody waits for the pause to end" holds
    # with room to spare on a busy machine.
    paused_s = 4.0

    def pause_during_the_fetch(_: float) -> None:
        wait_until(lambda: origin_calls(counter, spec) >= 1)
        time.sleep(0.1)
        own_redis_server.pause()
        time.sleep(paused_s)
        own_redis_server.resume()

    result = run_stampede(spec, processes=3, during=pause_during_the_fetch)
    measure(request, origin_calls(counter, spec), result.longest_wait_s, result.errors)

    result.assert_every_caller_got_its_value()
    assert origin_calls(counter, spec) == 3
    # Nobody waits for the pause to end: one socket time-out, then a local fetch.
    assert result.longest_wait_s < SOCKET_TIMEOUT_S + 2 * spec.fetch_s + MARGIN_S
    assert result.longest_wait_s < paused_s + spec.fetch_s
    assert failures(result.errors) == Counter(
        {
            ("leader_fill", "TimeoutError"): 1,
            ("lock_error", "TimeoutError"): 2,
            ("local_join", "TimeoutError"): 3,
        }
    )
    # Commands that timed out were still in Redis's socket buffers and ran on resume (the
    # first use of each script answers NOSCRIPT there, so the write may not have landed).
    assert_next_call_is_served(spec, prefix)


@pytest.mark.slow
def test_redis_restarted_while_followers_wait(
    own_redis_server: RedisServer, counter: redis.Redis, prefix: str, request: pytest.FixtureRequest
) -> None:
    spec = stampede(own_redis_server.port, counter, prefix, fetch_s=1.0, threads=2)

    def restart_during_the_fetch(_: float) -> None:
        wait_until(lambda: origin_calls(counter, spec) >= 1)
        time.sleep(0.1)
        own_redis_server.restart()

    result = run_stampede(spec, processes=3, during=restart_during_the_fetch)
    measure(request, origin_calls(counter, spec), result.longest_wait_s, result.errors)

    result.assert_every_caller_got_its_value()
    # The restart lost the leader's lock, and perhaps a tomb: its write is refused. The
    # leader's other thread shares its value if it joined before the fetch began; one that
    # joined after may have begun after an invalidation the restart lost: it fills anew.
    seen = failures(result.errors)
    shared = seen.pop(("local_join", "restarted"), 0)
    assert shared in {0, 1}
    assert origin_calls(counter, spec) == 4 - shared
    assert result.longest_wait_s < (3 - shared) * spec.fetch_s + MARGIN_S
    expected = Counter(
        {
            ("fill_refused", "restarted"): 1,
            ("lock_error", "ConnectionError"): 2,
            ("local_join", "ConnectionError"): 2,
        }
    )
    assert +(expected - seen) == Counter()
    assert sum((seen - expected).values()) <= 1 - shared  # the refill's own record, if any
    assert_next_call_is_served(spec, prefix)


# -- 2. The leader dies in the middle of its fetch -------------------------------------------


@pytest.mark.slow
def test_leader_killed_mid_fetch(
    own_redis_server: RedisServer, counter: redis.Redis, prefix: str, request: pytest.FixtureRequest
) -> None:
    fill = CacheFill(lease_ms=4_000, wait_ms=800, poll_min_ms=10, poll_max_ms=100)
    # Redis itself stays up here: a slow reply on a busy machine is no fault to degrade on.
    followers_spec = stampede(
        own_redis_server.port,
        counter,
        prefix,
        PATIENT_SOCKET_TIMEOUT_S,
        threads=2,
        fetch_s=0.2,
        dataset=dataset(fill),
    )
    leader_spec = attrs.evolve(followers_spec, threads=1, fetch_s=60)
    # The followers are spawned first and parked at their barrier, so that the time an
    # interpreter takes to start on a busy machine is not spent out of the leader's lease.
    followers = Workers(followers_spec, processes=3)
    leader = Workers(leader_spec, processes=1)
    cache = own_redis_server.client()
    lock = lock_key(f"{prefix}fault:x")
    try:
        followers.wait_ready()
        leader.release()
        wait_until(lambda: origin_calls(counter, followers_spec) == 1)
        acquired = time.monotonic()  # the lock was taken moments ago: the fetch has begun
        dead_token, lease_left_ms = cache.get(lock), cache.pttl(lock)
        assert dead_token is not None
        assert 0 < lease_left_ms <= fill.lease_ms
        followers.release()
        time.sleep(0.2)  # the followers are waiting on the leader now (or about to)
        leader.kill()
        result = followers.collect()
        # Still the dead leader's lock after every follower returned: each of them found it.
        held_throughout = cache.get(lock) == dead_token
        checked = time.monotonic()
    except BaseException:
        followers.kill()
        followers.close()
        raise
    finally:
        leader.kill()
        leader.close()

    records = result.records
    measure(request, origin_calls(counter, followers_spec), result.longest_wait_s, result.errors)
    result.assert_every_caller_got_its_value()
    # Each follower process makes one coordinated miss; its other thread joins it, or, when
    # another process's value replaced the fill's in Redis by the time it ended, reads that
    # one (a joiner gets what Redis holds then: never a second origin call).
    missed = []
    for process in result.per_process():
        joined = Counter(process) - Counter(local_join=1)
        if sum(joined.values()) == 2 and joined["follower_hit"] + joined["leader_recheck_hit"]:
            joined -= Counter(follower_hit=1) if joined["follower_hit"] else Counter()
            joined -= Counter(leader_recheck_hit=1) if sum(joined.values()) == 2 else Counter()
        missed.append(joined)
    assert all(sum(c.values()) == 1 for c in missed), result.per_process()
    reread = {"follower_hit", "leader_recheck_hit"}
    fills = Counter(r["outcome"] for r in records if r["outcome"] not in {"local_join", *reread})
    assert fills == sum(missed, Counter()) - Counter(dict.fromkeys(reread, 10))
    seen = sum(missed, Counter())
    assert set(seen) <= {"follower_timeout", "leader_fill", "follower_hit"}, seen
    # The dead leader's fetch, then one per process that fetched (a follower_hit did not).
    assert (
        origin_calls(counter, followers_spec) == 1 + seen["follower_timeout"] + seen["leader_fill"]
    )
    # A follower that found the lock waited wait_ms, not the lease nor the dead fetch.
    for record in records:
        if record["outcome"] == "follower_timeout":
            assert fill.wait_ms <= record["waited_ms"] < fill.lease_ms, record
            # Its write is refused when a follower that took the lock over wrote a later value.
            assert record["error"] in {None, "newer"}, record
    assert result.longest_wait_s < fill.wait_ms / 1000 + followers_spec.fetch_s + MARGIN_S
    if held_throughout:
        # Every follower found the dead leader's lock: each one waited and fetched itself.
        assert seen == Counter(follower_timeout=3)
        assert min(call.elapsed_s for call in result.calls) >= fill.wait_ms / 1000
    else:
        # The followers outlasted the lease (a very busy machine). The lock ran out, it was
        # not deleted early; then at most one new leader took it (its fetch is 0.2 s).
        assert checked - acquired >= lease_left_ms / 1000 - 0.005
        assert seen["leader_fill"] <= 1
        assert seen["follower_hit"] == 0 or seen["leader_fill"] == 1

    # Nobody deletes the dead leader's lock: it expires after lease_ms, not before.
    if held_throughout:
        wait_until(lambda: cache.get(lock) != dead_token, timeout_s=fill.lease_ms / 1000 + 10)
        gone_after = time.monotonic() - acquired
        assert lease_left_ms / 1000 - 0.005 <= gone_after <= fill.lease_ms / 1000 + MARGIN_S

    # Then the next miss fills normally.
    cache.delete(f"{prefix}fault:x")
    mf = Memofill(
        make_client(followers_spec.target),
        prefix=prefix,
        policies={followers_spec.dataset.key: followers_spec.dataset},
    )
    fetch = mf.cached_dataset(followers_spec.dataset.key)(lambda name: {"name": name})
    assert fetch.call_with_outcome("x").outcome == "leader_fill"
    assert not cache.exists(lock)
    cache.close()


# -- 3. A fetch that outlives its lease ------------------------------------------------------


def test_fetch_longer_than_the_lease_lets_a_second_leader_in_but_not_delete_its_lock(
    redis_server: RedisServer, prefix: str, request: pytest.FixtureRequest
) -> None:
    """Two instances, as two processes would be: A's lease runs out while it fetches."""
    fill = CacheFill(lease_ms=1_000, wait_ms=800, poll_min_ms=10, poll_max_ms=100)
    policies = {"lease:{name}": dataset(fill, key="lease:{name}")}
    origins: list[str] = []
    finish = {"A": threading.Event(), "B": threading.Event()}

    def instance(label: str) -> Any:
        client = make_client(Target(redis_server.port, socket_timeout=PATIENT_SOCKET_TIMEOUT_S))
        mf = Memofill(client, prefix=prefix, policies=policies)

        @mf.cached_dataset("lease:{name}")
        def fetch(name: str) -> dict[str, str]:
            origins.append(label)
            assert finish[label].wait(timeout=10)
            return {"by": label}

        return fetch

    a, b = instance("A"), instance("B")
    cache = redis_server.client()
    lock = lock_key(f"{prefix}lease:x")
    results: dict[str, Any] = {}

    def call(label: str, fetch: Any) -> None:
        results[label] = fetch.call_with_outcome("x")

    threads = {
        label: threading.Thread(target=call, args=(label, f)) for label, f in (("A", a), ("B", b))
    }
    with recorded() as records:
        started = time.monotonic()
        threads["A"].start()
        wait_until(lambda: origins == ["A"])
        token_a = cache.get(lock)
        wait_until(lambda: not cache.exists(lock), timeout_s=2)  # A's lease ran out
        threads["B"].start()
        wait_until(lambda: origins == ["A", "B"])
        token_b = cache.get(lock)
        assert token_b is not None
        assert token_b != token_a
        finish["A"].set()
        threads["A"].join(timeout=5)
        fetch_a_s = time.monotonic() - started
        # A finished and released while B fetched: B's lock is untouched.
        assert cache.get(lock) == token_b
        assert 0 < cache.pttl(lock) <= fill.lease_ms
        finish["B"].set()
        threads["B"].join(timeout=5)
    assert not cache.exists(lock)  # B released its own lock
    longest_s = max(r["elapsed_ms"] for r in mine(records, prefix)) / 1000
    measure(request, len(origins), longest_s, by_outcome(mine(records, prefix)))

    assert results["A"].value == {"by": "A"}
    assert results["B"].value == {"by": "B"}
    assert len(origins) == 2 <= math.ceil(fetch_a_s / (fill.lease_ms / 1000))
    # A says its lease expired: the second origin call is accounted for.
    assert [(r["outcome"], r["error"]) for r in mine(records, prefix)] == [
        ("leader_fill", "LeaseExpired"),
        ("leader_fill", None),
    ]
    cache.close()


# -- 4. Scripts flushed, EVAL denied, out of memory ------------------------------------------


def two_instances(
    port: int, prefix: str, fetch_s: float, fill: CacheFill = FAULT_FILL, **target: Any
) -> tuple[Any, Any, list[int]]:
    """A leader's and a follower's cached function (two instances: two processes' worth).

    These tests do not stall Redis: the clients wait for slow replies on a busy machine.
    """
    target = {"socket_timeout": PATIENT_SOCKET_TIMEOUT_S} | target
    policies = {"fault:{name}": dataset(fill)}
    origins: list[int] = []

    def make() -> Any:
        mf = Memofill(make_client(Target(port, **target)), prefix=prefix, policies=policies)

        @mf.cached_dataset("fault:{name}")
        def fetch(name: str) -> dict[str, str]:
            origins.append(1)
            time.sleep(fetch_s)
            return {"name": name}

        return fetch

    return make(), make(), origins


@attrs.frozen
class Pair:
    """What a leader and its follower saw, and how long each waited."""

    led: Any
    followed: Any
    leader_s: float
    follower_s: float

    @property
    def longest_s(self) -> float:
        return max(self.leader_s, self.follower_s)


def leader_and_follower(leader: Any, follower: Any, origins: list[int], during: Any = None) -> Pair:
    """Start the leader, then the follower once the leader fetches; return what both saw."""
    results: dict[str, Any] = {}
    waited: dict[str, float] = {}

    def call(label: str, fetch: Any) -> None:
        started = time.monotonic()
        results[label] = fetch.call_with_outcome("x")
        waited[label] = time.monotonic() - started

    first = threading.Thread(target=call, args=("leader", leader))
    first.start()
    wait_until(lambda: origins)
    second = threading.Thread(target=call, args=("follower", follower))
    second.start()
    if during is not None:
        during()
    # Generous: a call that hangs fails here, a slow machine does not.
    first.join(timeout=60)
    second.join(timeout=60)
    assert not first.is_alive(), "the leader's call did not return in 60 s"
    assert not second.is_alive(), "the follower's call did not return in 60 s"
    return Pair(results["leader"], results["follower"], waited["leader"], waited["follower"])


def test_script_flush_mid_fill_is_recovered(
    redis_server: RedisServer, prefix: str, request: pytest.FixtureRequest
) -> None:
    leader, follower, origins = two_instances(redis_server.port, prefix, fetch_s=0.4)
    cache = redis_server.client()
    with recorded() as records:
        pair = leader_and_follower(leader, follower, origins, during=cache.script_flush)
    assert (pair.led.outcome, pair.followed.outcome) == ("leader_fill", "follower_hit")
    assert pair.led.value == pair.followed.value == {"name": "x"}
    assert len(origins) == 1
    # The release ran (reloaded after NOSCRIPT): the lock is gone, the follower was woken.
    assert not cache.exists(lock_key(f"{prefix}fault:x"))
    assert pair.follower_s < 0.4 + MARGIN_S
    assert [r["error"] for r in mine(records, prefix)] == [None, None]
    measure(request, len(origins), pair.longest_s, by_outcome(mine(records, prefix)))
    cache.close()


def test_user_denied_eval_still_gets_values_and_writes_nothing_unguarded(
    own_redis_server: RedisServer, prefix: str, request: pytest.FixtureRequest
) -> None:
    admin = own_redis_server.client()
    admin.acl_setuser(
        "noeval",
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-eval", "-evalsha", "-script"],
    )
    fill = CacheFill(lease_ms=1_000, wait_ms=800, poll_min_ms=10, poll_max_ms=100)
    leader, follower, origins = two_instances(
        own_redis_server.port,
        prefix,
        fetch_s=0.3,
        fill=fill,
        username="noeval",
        password="secret",
    )
    with recorded() as records:
        pair = leader_and_follower(leader, follower, origins)
    # The lock is a script: each caller fetches itself, and writes nothing it cannot guard.
    assert (pair.led.outcome, pair.followed.outcome) == ("lock_error", "lock_error")
    assert pair.led.value == pair.followed.value == {"name": "x"}
    assert len(origins) == 2
    assert failures(by_outcome(mine(records, prefix))) == Counter(
        {("lock_error", "NoPermissionError"): 2}
    )
    assert not admin.exists(f"{prefix}fault:x")
    assert not admin.exists(lock_key(f"{prefix}fault:x"))  # never taken: nothing to expire
    measure(request, len(origins), pair.longest_s, by_outcome(mine(records, prefix)))
    admin.close()


@pytest.mark.slow
def test_out_of_memory_with_noeviction(
    counter: redis.Redis, prefix: str, request: pytest.FixtureRequest
) -> None:
    with running_server("--maxmemory", "1", "--maxmemory-policy", "noeviction") as server:
        spec = stampede(server.port, counter, prefix, fetch_s=0.4)
        result = run_stampede(spec, processes=2)
        assert server.client().dbsize() == 0
    measure(request, origin_calls(counter, spec), result.longest_wait_s, result.errors)

    result.assert_every_caller_got_its_value()
    assert origin_calls(counter, spec) == 2  # one local fetch per process
    assert result.per_process() == [Counter(lock_error=1, local_join=2)] * 2
    assert {failure(r["error"]) for r in result.records} == {"OutOfMemoryError"}
    assert result.longest_wait_s < spec.fetch_s + MARGIN_S


# -- 5. Corrupt, truncated and foreign bytes; huge and unencodable payloads -------------------


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(b"\x00\x01\xfe garbage", id="binary"),
        pytest.param(b'{"name": "x", "items": [1, 2', id="truncated-json"),
        pytest.param(b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94.", id="pickle"),
        pytest.param('{"name": "x"}'.encode("utf-16"), id="utf-16"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00memofill:no", id="truncated-marker"),
    ],
)
def test_corrupt_bytes_are_a_miss_and_are_overwritten(
    redis_server: RedisServer,
    prefix: str,
    stored: bytes,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    leader, _, origins = two_instances(redis_server.port, prefix, fetch_s=0)
    cache = redis_server.client()
    cache.set(f"{prefix}fault:x", stored)
    with recorded() as records:
        first = leader.call_with_outcome("x")
        second = leader.call_with_outcome("x")
    assert (first.outcome, first.value) == ("leader_fill", {"name": "x"})
    assert (second.outcome, second.value) == ("hit", {"name": "x"})
    assert len(origins) == 1
    assert by_outcome(mine(records, prefix)) == Counter({("leader_fill", None): 1})
    measure(request, len(origins), None, by_outcome(mine(records, prefix)))
    assert any("corrupt bytes" in r.getMessage() for r in caplog.records)
    assert stored_payload(cache.get(f"{prefix}fault:x")) == b'{"name":"x"}'
    cache.close()


def test_a_foreign_type_under_the_key_is_replaced(
    redis_server: RedisServer, prefix: str, request: pytest.FixtureRequest
) -> None:
    leader, _, origins = two_instances(redis_server.port, prefix, fetch_s=0)
    cache = redis_server.client()
    cache.rpush(f"{prefix}fault:x", b"not", b"a", b"string")
    with recorded() as records:
        first = leader.call_with_outcome("x")
        second = leader.call_with_outcome("x")
    assert (first.outcome, first.value) == ("leader_fill", {"name": "x"})
    assert (second.outcome, second.value) == ("hit", {"name": "x"})
    assert len(origins) == 1
    # The recheck read no value (WRONGTYPE is a miss); the conditional write replaced the list.
    assert failures(by_outcome(mine(records, prefix))) == Counter({("leader_fill", None): 1})
    measure(request, len(origins), None, by_outcome(mine(records, prefix)))
    cache.close()


@pytest.mark.slow
def test_a_50_mb_payload(
    redis_server: RedisServer, prefix: str, request: pytest.FixtureRequest
) -> None:
    blob = "0123456789abcdef" * (50 * 2**20 // 16)
    # Encoding and writing 50 MB can take seconds on a busy machine: the follower's wait_ms
    # must cover the fill, or it would rightly give up and fetch itself (a second origin call).
    patient = CacheFill(lease_ms=120_000, wait_ms=60_000, poll_min_ms=10, poll_max_ms=100)
    policies = {"big:{name}": dataset(patient, key="big:{name}")}
    origins: list[int] = []

    def instance() -> Any:
        client = make_client(Target(redis_server.port, socket_timeout=PATIENT_SOCKET_TIMEOUT_S))
        mf = Memofill(client, prefix=prefix, policies=policies)

        @mf.cached_dataset("big:{name}")
        def fetch(name: str) -> dict[str, str]:
            origins.append(1)
            time.sleep(0.2)
            return {"name": name, "blob": blob}

        return fetch

    leader, follower = instance(), instance()
    cache = redis_server.client()
    try:
        with recorded() as records:
            started = time.monotonic()
            pair = leader_and_follower(leader, follower, origins)
            both_s = time.monotonic() - started
            hit_started = time.monotonic()
            hit = leader.call_with_outcome("x")
            hit_s = time.monotonic() - hit_started
        assert (pair.led.outcome, pair.followed.outcome, hit.outcome) == (
            "leader_fill",
            "follower_hit",
            "hit",
        )
        assert pair.led.value["blob"] == pair.followed.value["blob"] == hit.value["blob"] == blob
        assert len(origins) == 1
        assert cache.strlen(f"{prefix}big:x") > 50 * 2**20
        sizes = {r["outcome"]: r["payload_bytes"] for r in mine(records, prefix)}
        assert sizes["leader_fill"] == sizes["follower_hit"] > 50 * 2**20
        # How long it took is measured, not asserted (timing claims belong in bench/).
        measure(request, len(origins), pair.longest_s, by_outcome(mine(records, prefix)))
        note(request, "both_s", round(both_s, 3))
        note(request, "hit_s", round(hit_s, 3))
    finally:
        cache.delete(f"{prefix}big:x")
        cache.close()


def test_a_payload_orjson_cannot_encode(
    redis_server: RedisServer, prefix: str, request: pytest.FixtureRequest
) -> None:
    # A wait_ms far beyond the fetch: "at once, not after wait_ms" holds on a busy machine.
    fill = CacheFill(lease_ms=60_000, wait_ms=30_000, poll_min_ms=10, poll_max_ms=100)
    policies = {"odd:{name}": dataset(fill, key="odd:{name}")}
    origins: list[int] = []

    def instance() -> Any:
        client = make_client(Target(redis_server.port, socket_timeout=PATIENT_SOCKET_TIMEOUT_S))
        mf = Memofill(client, prefix=prefix, policies=policies)

        @mf.cached_dataset("odd:{name}")
        def fetch(name: str) -> dict[str, Any]:
            origins.append(1)
            time.sleep(0.2)
            return {"name": name, "tags": {"a", "b"}}  # a set: not JSON

        return fetch

    cache = redis_server.client()
    with recorded() as records:
        pair = leader_and_follower(instance(), instance(), origins)
    assert pair.led.value == pair.followed.value == {"name": "x", "tags": {"a", "b"}}
    # Nothing was stored, and the leader's wake entry says so: the follower fetches itself
    # at once, not after wait_ms. (orjson.JSONEncodeError is TypeError, the name logged.)
    assert (pair.led.outcome, pair.followed.outcome) == ("leader_fill", "follower_timeout")
    assert len(origins) == 2
    assert by_outcome(mine(records, prefix)) == Counter(
        {("leader_fill", "TypeError"): 1, ("follower_timeout", "TypeError"): 1}
    )
    assert pair.follower_s < fill.wait_ms / 1000
    assert not cache.exists(f"{prefix}odd:x")
    assert not cache.exists(lock_key(f"{prefix}odd:x"))
    measure(request, len(origins), pair.longest_s, by_outcome(mine(records, prefix)))
    cache.close()


# -- 7. Clocks: waits and leases are measured on monotonic clocks ------------------------------


class JumpingWallClock:
    """A ``time.time`` that jumps a day forward or back on every call."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = time.time

    def __call__(self) -> float:
        self.calls += 1
        return self.real() + (-86_400 if self.calls % 2 else 86_400)


def test_the_follower_measures_wait_ms_on_the_clock_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fill`` driven by a fake monotonic clock: the wall clock jumping changes nothing."""
    monkeypatch.setattr(time, "time", JumpingWallClock())
    fill_policy = CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200)
    plan = Plan(
        dataset="fault:{name}",
        redis_key="t:fault:x",
        ttl_ms=60_000,
        negative_ttl_ms=0,
        cache_fill=fill_policy,
    )
    now = [100.0]
    steps = fill(plan, lambda: now[0], random.Random(7))
    reply: Any = None
    blocked_ms: list[int] = []
    while True:
        try:
            step = steps.send(reply)
        except StopIteration as finished:
            result = finished.value
            break
        if step is FETCH:
            reply = {"name": "x"}
        elif step.name == "acquire":
            reply = [0, None, [], "1700000000", "0"]  # the lock is held; no value, no signal
        elif step.name == "wait":
            blocked_ms.append(step.args[2])
            now[0] += step.args[2] / 1000  # the XREAD blocks its full time
            reply = None
        else:
            reply = None
    assert result.outcome is Outcome.FOLLOWER_TIMEOUT
    # The follower gave up when *its* clock passed wait_ms: not before, and not a poll later.
    assert result.waited_ms == pytest.approx(sum(blocked_ms))
    assert fill_policy.wait_ms <= result.waited_ms < fill_policy.wait_ms + 1
    assert max(blocked_ms) <= fill_policy.poll_max_ms


def test_a_wall_clock_jump_during_a_wait_changes_nothing(
    redis_server: RedisServer,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    leader, follower, origins = two_instances(redis_server.port, prefix, fetch_s=0.3)
    wall = JumpingWallClock()
    monkeypatch.setattr(time, "time", wall)
    cache = redis_server.client()
    with recorded() as records:
        pair = leader_and_follower(leader, follower, origins)
    assert (pair.led.outcome, pair.followed.outcome) == ("leader_fill", "follower_hit")
    assert len(origins) == 1
    assert pair.follower_s < 0.3 + MARGIN_S
    measure(request, len(origins), pair.longest_s, by_outcome(mine(records, prefix)))
    assert not cache.exists(lock_key(f"{prefix}fault:x"))
    cache.close()


def test_the_runtime_reads_no_wall_clock() -> None:
    """Waits, leases, the breaker and the local store all use monotonic clocks.

    Only the stored header's timestamps are wall-clock ms (compared across
    hosts), and only :mod:`memofill.freshness` reads that clock.
    """
    runtime = ["coordinator", "decorator", "fallback", "singleflight", "commands", "instance"]
    for name in runtime:
        source = (Path(memofill.__file__).parent / f"{name}.py").read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in WALL_CLOCKS:
                owner = node.value
                assert not (isinstance(owner, ast.Name) and owner.id in {"time", "datetime"}), (
                    f"memofill/{name}.py:{node.lineno} reads the wall clock ({node.attr})"
                )
    assert Breaker().__dict__["_clock"] is time.monotonic
    assert LocalStore().__dict__["_clock"] is time.monotonic


WALL_CLOCKS = {"time", "time_ns", "now", "utcnow", "today"}


# -- 8. A full connection pool is this process's limit, not Redis failing ---------------------


def test_a_full_connection_pool_does_not_open_the_breaker(
    redis_server: RedisServer, prefix: str
) -> None:
    client = redis_server.client(max_connections=1)
    held = client.connection_pool.get_connection()
    try:
        mf = Memofill(client, prefix=prefix, policies={"fault:{name}": dataset()})
        fetch = mf.cached_dataset("fault:{name}")(lambda name: {"name": name})
        result = fetch.call_with_outcome("x")
        assert result.value == {"name": "x"}
        assert result.outcome == "lock_error"
        assert not mf.breaker.is_open
    finally:
        client.connection_pool.release(held)
    assert fetch.call_with_outcome("x").outcome == "leader_fill"
    client.close()
