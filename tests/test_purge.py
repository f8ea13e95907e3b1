"""``memofill purge``: one dataset's keys under one prefix go, and nothing else does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from memofill import CacheFill, Dataset
from memofill.cli import main
from memofill.codegen import render
from memofill.purge import first_key, purge
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis_server

FILL = CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200)
ITEM = Dataset("a:{x}", ttl_s=60, cache_fill=FILL)
DATASETS = [ITEM, Dataset("a:{x}:b", ttl_s=60), Dataset("b:v1", ttl_s=60)]


def fill(client: redis.Redis) -> None:
    client.flushdb()
    for n in range(2500):
        client.set(f"p:a:{n}", b"{}")
    client.set("p:a:1:b", b"{}")  # another dataset whose keys start alike
    client.set("p:b:v1", b"{}")  # a third, a constant key
    client.set("q:a:1", b"{}")  # another prefix
    client.set("{p:a:1}#lock", b"token")  # a lock a leader holds
    client.set("p:a:%2A", b"{}")  # an escaped argument: still the dataset's


def test_purge_removes_only_the_datasets_keys_under_the_prefix(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    fill(client)
    pauses: list[float] = []
    done = purge(client, "p:", ITEM, batch=1000, pause_s=0.002, sleep=pauses.append)
    assert done.removed == 2501
    assert len(pauses) == 2  # a pause between full batches
    left = sorted(key.decode() for key in client.scan_iter(count=1000))
    assert left == ["p:a:1:b", "p:b:v1", "q:a:1", "{p:a:1}#lock"]


def test_the_purge_command_says_what_it_did_and_refuses_bad_arguments(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_server.client()
    fill(client)
    module = tmp_path / "policies.py"
    module.write_text(render(DATASETS, "registry.py"))
    common = ["--url", redis_server.url, "--prefix", "p:", "--policies", str(module)]
    assert main(["purge", "b:v1", *common]) == 0
    assert capsys.readouterr().out == "purged 1 keys of b:v1 under prefix 'p:' (1 scanned)\n"
    assert client.exists("p:b:v1") == 0
    assert client.exists("p:a:1") == 1
    for bad in (["purge", "nope:{x}", *common], ["purge", "a:{x}", "--batch", "0", *common]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith("memofill: error:")


def test_purge_on_a_cluster_scans_every_primary(redis_cluster: Any) -> None:
    client = redis_cluster.client()
    keys = [f"pc:a:{n}" for n in range(300)]
    for key in keys:
        client.set(key, b"{}")
    client.set("pc:a:1:b", b"{}")
    nodes = {client.get_node_from_key(key).name for key in keys}
    assert len(nodes) > 1  # the keys are spread over several primaries
    done = purge(client, "pc:", ITEM, batch=100, pause_s=0)
    assert done.removed == 300
    assert client.exists(*keys) == 0
    assert client.exists("pc:a:1:b") == 1
    client.close()


def test_first_key_finds_a_value_of_the_dataset_and_nothing_else(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    fill(client)
    assert first_key(client, "p:", ITEM) is not None
    assert first_key(client, "p:", DATASETS[2]) == b"p:b:v1"
    assert first_key(client, "nope:", ITEM) is None
    client.delete(*[f"p:a:{n}" for n in range(2500)], "p:a:%2A")
    assert first_key(client, "p:", ITEM) is None  # "p:a:1:b" is another dataset's


def test_first_key_on_a_cluster_looks_on_every_primary(redis_cluster: Any) -> None:
    client = redis_cluster.client()
    by_node: dict[str, str] = {}
    for n in range(300):
        by_node.setdefault(client.get_node_from_key(f"pf:a:{n}").name, f"pf:a:{n}")
    assert len(by_node) == len(redis_cluster.nodes)  # one key on each primary
    assert first_key(client, "pf:", ITEM) is None
    for key in by_node.values():  # found alone, wherever it lives
        client.set(key, b"{}")
        assert first_key(client, "pf:", ITEM) == key.encode()
        client.delete(key)
    client.close()
