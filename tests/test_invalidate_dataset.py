"""Whole-dataset invalidation on a real redis-server: one command, and no old value served after.

Values are written by fills in three processes, the dataset is invalidated, and
then every process asks for every key again: each key's origin is called once
in all, and no value fetched before the invalidation comes back.
"""

from __future__ import annotations

from pathlib import Path

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
