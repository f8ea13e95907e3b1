"""Whole-dataset invalidation on a real redis-server: one command, and no old value served after.

Values are written by fills in three processes, the dataset is invalidated, and
then every process asks for every key again: each key's origin is called once
in all, and no value fetched before the invalidation comes back.
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from memofill import CacheFill, Dataset, Memofill
from memofill.cli import main
from memofill.codegen import render
from tests.redis_servers import RedisServer

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
    assert mf.invalidate_dataset("q:{n}") == 2
    counts = server_commands(admin)
    counts.pop("config|resetstat", None)
    counts.pop("info", None)
    assert counts == {"evalsha": 1, "hincrby": 1, "hset": 1}  # HINCRBY and HSET run inside it
    assert admin.hgetall("big:#meta") == {b"seq": b"2", b"hard:q:{n}": b"2"}
    # Nothing deleted: old values are ignored, and expire by their own TTL.
    assert admin.exists(*(f"big:q:{n}" for n in range(0, 100_000, 997))) == 101


def test_the_invalidate_command_says_what_it_did_and_refuses_bad_arguments(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = redis_server.client()
    admin.delete("cli:#meta")
    module = tmp_path / "policies.py"
    module.write_text(render(list(POLICIES.values()), "registry.py"))
    common = ["--url", redis_server.url, "--prefix", "cli:", "--policies", str(module)]
    assert main(["invalidate", "q:{n}", *common]) == 0
    assert main(["invalidate", "other:{n}", "--soft", *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("invalidated q:{n} under prefix 'cli:': generation 1 (")
    assert admin.hgetall("cli:#meta") == {
        b"seq": b"2",
        b"hard:q:{n}": b"1",
        b"soft:other:{n}": b"2",
    }
    for bad in (["invalidate", "nope", *common], ["invalidate", "q:{n}", "--hard", *common]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith("memofill: error:")


#: Values are rejected by the generation in their stored header, which fills do not write yet.
UNFINISHED = pytest.mark.xfail(
    strict=True, reason="needs the stored header's generation, written by every fill"
)


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
@UNFINISHED
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


@UNFINISHED
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
