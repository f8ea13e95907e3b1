"""Whole-dataset invalidation on a real redis-server: one command, and no old value served after.

Values are written by fills in three processes, the dataset is invalidated, and
then every process asks for every key again: each key's origin is called once
in all, and no value fetched before the invalidation comes back.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from memofill import CacheFill, Dataset, Memofill
from memofill.cli import main
from memofill.codegen import render
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis_server

FILL = CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200)
POLICIES = {
    "q:{n}": Dataset("q:{n}", ttl_s=600, cache_fill=FILL),
    "other:{n}": Dataset("other:{n}", ttl_s=600, cache_fill=FILL),
}


def server_commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(data["calls"]) for name, data in stats.items()}


def test_invalidating_a_dataset_of_100000_keys_is_one_command(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    admin.delete("big:#meta")
    pipe = admin.pipeline(transaction=False)
    for n in range(100_000):
        pipe.set(f"big:q:{n}", b'{"n": 1}', px=600_000)
    pipe.execute()
    mf = Memofill(redis_server.client(), prefix="big:", policies=POLICIES)
    mf.invalidate_dataset("q:{n}")  # loads the script, so the count below is the steady state
    admin.config_resetstat()
    mark = mf.invalidate_dataset("q:{n}")
    counts = server_commands(admin)
    counts.pop("config|resetstat", None)
    counts.pop("info", None)
    assert counts.pop("evalsha") == 1  # the rest ran inside it, on the meta hash only
    assert set(counts) <= {"time", "hget", "hset", "hincrby"}, counts
    meta = admin.hgetall("big:#meta")
    assert (int(meta[b"hard:q:{n}"]), meta[b"v"]) == (mark, b"2")
    # Nothing deleted: old values are ignored, and expire by their own TTL.
    assert admin.exists(*(f"big:q:{n}" for n in range(0, 100_000, 997))) == 101


def test_the_invalidate_command_says_what_it_did_and_refuses_bad_arguments(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = redis_server.client()
    admin.delete("cli:#meta")
    admin.set("cli:q:1", b"{}")  # a value of each dataset lives under the prefix
    admin.set("cli:other:1", b"{}")
    module = tmp_path / "policies.py"
    module.write_text(render(list(POLICIES.values()), "registry.py"))
    common = ["--url", redis_server.url, "--prefix", "cli:", "--policies", str(module)]
    assert main(["invalidate", "q:{n}", *common]) == 0
    assert main(["invalidate", "other:{n}", "--soft", *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("invalidated q:{n} under prefix 'cli:' at ")
    meta = admin.hgetall("cli:#meta")
    assert meta[b"v"] == b"2"
    assert int(meta[b"born"]) <= int(meta[b"hard:q:{n}"]) < int(meta[b"soft:other:{n}"])
    for bad in (["invalidate", "nope", *common], ["invalidate", "q:{n}", "--hard", *common]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith("memofill: error:")


def test_the_invalidate_command_refuses_a_prefix_where_the_dataset_has_no_value(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --prefix would change nothing the application sees: refused, unless --force."""
    admin = redis_server.client()
    admin.delete("ref:#meta", "reff:#meta")
    admin.set("ref:other:1", b"{}")  # another dataset's value: not one of q:{n}'s
    admin.set("ref:qq:1", b"{}")  # a key that starts alike
    module = tmp_path / "policies.py"
    module.write_text(render(list(POLICIES.values()), "registry.py"))
    where = ["--url", redis_server.url, "--policies", str(module)]

    assert main(["invalidate", "q:{n}", "--prefix", "reff:", *where]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1  # one line, no traceback
    assert captured.err.startswith(
        "memofill: error: no value of dataset 'q:{n}' lives under prefix 'reff:' at "
    )
    assert "--force" in captured.err
    assert main(["invalidate", "q:{n}", "--prefix", "ref:", *where]) == 2  # only others' keys
    assert "prefix 'ref:'" in capsys.readouterr().err
    assert admin.exists("ref:#meta", "reff:#meta") == 0  # nothing was written

    assert main(["invalidate", "q:{n}", "--prefix", "reff:", "--force", *where]) == 0
    assert capsys.readouterr().out.startswith("invalidated q:{n} under prefix 'reff:' at ")
    assert admin.hget("reff:#meta", "v") == b"1"
    assert admin.hexists("reff:#meta", "hard:q:{n}")

    admin.set("ref:q:%2A", b"{}")  # a value of the dataset (an escaped argument): accepted
    assert main(["invalidate", "q:{n}", "--prefix", "ref:", *where]) == 0
    assert capsys.readouterr().out.startswith("invalidated q:{n} under prefix 'ref:' at ")
    assert admin.hget("ref:#meta", "v") == b"1"
    assert admin.hexists("ref:#meta", "hard:q:{n}")


# -- after the invalidation: no old value, one origin call per key ---------------------------

KEYS = 200


def _worker(port: int, prefix: str, barrier: Any, results: Any, generation: str) -> None:
    """One process: call every key once the barrier opens; report what it got."""
    client = redis.Redis(port=port)
    mf = Memofill(client, prefix=prefix, policies=POLICIES, meta_check_ms=100)

    @mf.cached_dataset("q:{n}")
    def fetch(n: str) -> dict[str, Any]:
        client.incr(f"{prefix}origin:{n}")
        return {"n": n, "generation": generation}

    fetch("warm-up")  # reads the marks, opens the connection
    barrier.wait(timeout=60)
    seen = [fetch(str(n))["generation"] for n in range(KEYS)]
    results.put(seen)
    client.close()


def _run_processes(port: int, prefix: str, generation: str, count: int = 3) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(count), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(port, prefix, barrier, results, generation))
        for _ in range(count)
    ]
    for worker in workers:
        worker.start()
    seen = [item for _ in workers for item in results.get(timeout=120)]
    for worker in workers:
        worker.join(timeout=30)
    return seen


@pytest.mark.slow
def test_after_an_invalidation_no_old_value_is_served_and_each_key_is_fetched_once(
    redis_server: RedisServer,
) -> None:
    admin = redis_server.client()
    prefix = "gen3:"
    assert set(_run_processes(redis_server.port, prefix, "old", count=1)) == {"old"}
    for n in range(KEYS):
        admin.delete(f"{prefix}origin:{n}")
    Memofill(admin, prefix=prefix, policies=POLICIES).invalidate_dataset("q:{n}")
    seen = _run_processes(redis_server.port, prefix, "new")
    assert len(seen) == 3 * KEYS
    assert set(seen) == {"new"}
    calls = [int(admin.get(f"{prefix}origin:{n}") or 0) for n in range(KEYS)]
    assert calls == [1] * KEYS


def test_a_fill_that_began_before_the_invalidation_is_not_served_after_it(
    redis_server: RedisServer,
) -> None:
    prefix = "straddle:"
    started, release = threading.Event(), threading.Event()
    writer = Memofill(redis_server.client(), prefix=prefix, policies=POLICIES)

    @writer.cached_dataset("q:{n}")
    def slow(n: str) -> dict[str, Any]:
        started.set()
        release.wait(timeout=30)
        return {"generation": "before"}

    filling = threading.Thread(target=slow, args=("k",))
    filling.start()
    started.wait(timeout=30)
    reader = Memofill(redis_server.client(), prefix=prefix, policies=POLICIES)
    reader.invalidate_dataset("q:{n}")  # while the fetch runs
    release.set()
    filling.join(timeout=30)
    assert redis_server.client().exists(f"{prefix}q:k") == 1  # its write landed after

    @reader.cached_dataset("q:{n}")
    def fresh(n: str) -> dict[str, Any]:
        return {"generation": "after"}

    assert fresh("k") == {"generation": "after"}
    assert fresh.call_with_outcome("k").value == {"generation": "after"}


def test_a_caller_after_the_invalidation_does_not_join_a_fill_that_began_before_it(
    redis_server: RedisServer,
) -> None:
    prefix = "join:"
    started, release = threading.Event(), threading.Event()
    phase = ["before"]
    mf = Memofill(redis_server.client(), prefix=prefix, policies=POLICIES)

    @mf.cached_dataset("q:{n}")
    def fetch(n: str) -> dict[str, Any]:
        generation = phase[0]
        if generation == "before":
            started.set()
            release.wait(timeout=30)
        return {"generation": generation}

    first: list[Any] = []
    filling = threading.Thread(target=lambda: first.append(fetch("k")))
    filling.start()
    assert started.wait(timeout=30)
    phase[0] = "after"
    mf.invalidate_dataset("q:{n}")  # this process knows at once
    later: list[Any] = []
    caller = threading.Thread(target=lambda: later.append(fetch.call_with_outcome("k")))
    caller.start()
    time.sleep(0.2)  # let it find the fill in flight (it follows that fill's lock)
    release.set()
    filling.join(timeout=30)
    caller.join(timeout=30)
    assert first == [{"generation": "before"}]  # its call began before the invalidation
    assert later[0].value == {"generation": "after"}
    assert fetch.call_with_outcome("k").value == {"generation": "after"}


# -- soft: served stale while exactly one caller refreshes -----------------------------------

STALE_FILL = CacheFill(
    lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200, refresh_retry_ms=1_000
)
SOFT_POLICIES = {
    "s:{n}": Dataset("s:{n}", ttl_s=600, stale_s=60, cache_fill=STALE_FILL),
    "h:{n}": Dataset("h:{n}", ttl_s=600, cache_fill=FILL),
}


def _versioned(mf: Memofill, key: str, calls: list[str], lock: threading.Lock) -> Any:
    """A function of ``key`` whose origin returns how many times it was called for ``n``."""

    def origin(n: str) -> dict[str, int]:
        with lock:
            calls.append(n)
            return {"version": calls.count(n)}

    return mf.cached_dataset(key)(origin)


def test_a_soft_invalidation_serves_the_old_value_while_exactly_one_caller_refreshes(
    redis_server: RedisServer,
) -> None:
    prefix = "soft:"
    calls: list[str] = []
    lock = threading.Lock()
    # Two instances stand for two processes: each reads the marks itself.
    fleet = [
        Memofill(redis_server.client(), prefix=prefix, policies=SOFT_POLICIES, meta_check_ms=50)
        for _ in range(2)
    ]
    fetches = [_versioned(mf, "s:{n}", calls, lock) for mf in fleet]
    assert fetches[0]("k") == {"version": 1}
    assert fetches[1].call_with_outcome("k").outcome == "hit"
    admin = Memofill(redis_server.client(), prefix=prefix, policies=SOFT_POLICIES)
    mark = admin.invalidate_dataset("s:{n}", soft=True)
    for mf in fleet:  # each has read the marks again (meta_check_ms), not been told
        generations = mf._state.generations
        deadline = time.monotonic() + 10
        while generations.of("s:{n}").soft != mark:
            assert time.monotonic() < deadline, "the soft mark never reached the instance"
            time.sleep(0.02)
            fetches[fleet.index(mf)]("other")

    before = len(calls)
    seen: list[tuple[str, int]] = []
    start = threading.Barrier(8)

    def caller(fetch: Any) -> None:
        start.wait(timeout=30)
        for _ in range(20):
            result = fetch.call_with_outcome("k")
            with lock:
                seen.append((result.outcome, result.value["version"]))

    threads = [threading.Thread(target=caller, args=(fetches[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Nobody waited on the origin: every call got the old value at once, or the new one.
    assert {outcome for outcome, _ in seen} <= {"stale_hit", "hit"}
    assert ("stale_hit", 1) in seen
    assert all(version == 1 for outcome, version in seen if outcome == "stale_hit")
    deadline = time.monotonic() + 10
    while fetches[0].call_with_outcome("k").value == {"version": 1}:
        assert time.monotonic() < deadline, "the refresh never landed"
        time.sleep(0.02)
    for fetch in fetches:
        result = fetch.call_with_outcome("k")
        assert (result.outcome, result.value) == ("hit", {"version": 2})
    # One refresh of the key, fleet-wide ("other", read while waiting for the mark, is being
    # refreshed too: its own business).
    assert [name for name in calls[before:] if name == "k"] == ["k"]


def test_a_soft_invalidation_of_a_dataset_without_stale_s_acts_as_a_hard_one(
    redis_server: RedisServer,
) -> None:
    prefix = "softhard:"
    calls: list[str] = []
    lock = threading.Lock()
    mf = Memofill(redis_server.client(), prefix=prefix, policies=SOFT_POLICIES)
    fetch = _versioned(mf, "h:{n}", calls, lock)
    assert fetch("k") == {"version": 1}
    mf.invalidate_dataset("h:{n}", soft=True)
    result = fetch.call_with_outcome("k")
    assert (result.outcome, result.value) == ("leader_fill", {"version": 2})
    assert fetch.call_with_outcome("k").outcome == "hit"


def test_near_copies_of_an_invalidated_dataset_go_and_its_old_values_are_not_read_back(
    redis_server: RedisServer,
) -> None:
    prefix = "nearinv:"
    policies = {"q:{n}": Dataset("q:{n}", ttl_s=600, cache_fill=FILL, near_ms=60_000)}
    # meta_check_ms of an hour: only the listener, tracking the meta key, can tell it.
    reader = Memofill(
        redis_server.client(), prefix=prefix, policies=policies, meta_check_ms=3_600_000
    )
    phase = ["old"]

    @reader.cached_dataset("q:{n}")
    def fetch(n: str) -> dict[str, str]:
        return {"generation": phase[0]}

    try:
        assert fetch("k") == {"generation": "old"}
        deadline = time.monotonic() + 20
        while fetch.call_with_outcome("k").outcome != "near_hit":
            assert time.monotonic() < deadline, "no near hit"
            time.sleep(0.01)
        phase[0] = "new"
        Memofill(redis_server.client(), prefix=prefix, policies=policies).invalidate_dataset(
            "q:{n}"
        )
        while fetch("k") == {"generation": "old"}:
            assert time.monotonic() < deadline, "the near copy outlived the invalidation"
            time.sleep(0.001)
        for _ in range(50):  # the old value is still in Redis: never read back
            assert fetch("k") == {"generation": "new"}
    finally:
        reader.local_store.attach(None)


@pytest.mark.parametrize("many", [False, True])
async def test_meta_check_ms_0_reads_the_marks_for_every_call_and_still_serves_hits(
    redis_server: RedisServer, many: bool
) -> None:
    """0 is "no call judged by marks read before it started": each call reads them, and its
    value is a hit (not a call Redis could not vouch for), sync and asyncio alike."""
    prefix = f"check0{int(many)}:"
    clients = [redis_server.client(), redis_server.client()]
    async_client = redis.asyncio.Redis(port=redis_server.port)
    writer = Memofill(clients[0], prefix=prefix, policies=POLICIES)
    versions = iter(range(1, 100))
    caches = [
        Memofill(clients[1], prefix=prefix, policies=POLICIES, meta_check_ms=0),
        Memofill(async_client=async_client, prefix=prefix, policies=POLICIES, meta_check_ms=0),
    ]
    q = caches[0].cached_dataset("q:{n}")(lambda n: next(versions))

    @caches[1].cached_dataset("other:{n}")
    async def other(n: int) -> int:
        return next(versions)

    def read_q() -> int:
        return q.many([1])[0] if many else q(1)  # type: ignore[no-any-return]

    async def read_other() -> int:
        return (await other.many([1]))[0] if many else await other(1)

    try:
        first_q, first_other = read_q(), await read_other()
        assert (read_q(), await read_other()) == (first_q, first_other)
        assert {name: counts.get("hit") for name, counts in _hits(caches).items()} == {
            "q:{n}": 1,
            "other:{n}": 1,
        }
        writer.invalidate_dataset("q:{n}")
        writer.invalidate_dataset("other:{n}")
        assert read_q() > first_q  # the very next call: no wait for a due time
        assert await read_other() > first_other
    finally:
        for client in clients:
            client.close()
        await async_client.aclose()


def _hits(caches: list[Memofill]) -> dict[str, dict[str, int]]:
    return {name: c for cache in caches for name, c in cache.counters.snapshot().items()}
