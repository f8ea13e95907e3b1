"""What memofill keeps in a process is bounded in bytes, however many large values it reads.

Every hit leaves a copy of its bytes in the outage store, so that a warm process
keeps serving while Redis is down. Reading thousands of distinct 100 KB values
once grew a process by their whole size; now the store stays within its byte
budget and the process with it. Measured in a spawned process of its own, on a
private ``redis-server``, so that no other test's allocations count.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from typing import Any

import orjson
import pytest
import redis

from memofill import ConfigurationError, Dataset, Memofill
from memofill.fallback import MAX_LOCAL_BYTES
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]

VALUES = 3_000
VALUE_BYTES = 100_000
#: What the process may grow by besides the store: the decoder's and allocator's working set.
SLACK_BYTES = 64 * 1024 * 1024


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_every_value(port: int, prefix: str, results: Any) -> None:
    """Read each value once through memofill (all hits); report growth and the store's state."""
    dataset = Dataset("blob:{index}", ttl_s=600)
    mf = Memofill(redis.Redis(port=port), prefix=prefix, policies={dataset.key: dataset})

    @mf.cached_dataset("blob:{index}")
    def blob(index: int) -> dict[str, Any]:
        raise AssertionError("every value is in Redis already")

    blob(0)  # warm: the client, the decoder, the first entry
    before = _rss_bytes()
    for index in range(VALUES):
        assert blob(index)["index"] == index
    store = mf.local_store
    results.put((_rss_bytes() - before, store.bytes, len(store), store.evictions))


def test_reading_many_large_values_keeps_the_process_within_the_store_budget(
    redis_server: RedisServer,
) -> None:
    prefix = f"mem{uuid.uuid4().hex[:8]}:"
    client = redis_server.client()
    try:
        pipe = client.pipeline(transaction=False)
        for index in range(VALUES):
            value = {"index": index, "blob": "x" * VALUE_BYTES}
            pipe.set(f"{prefix}blob:{index}", orjson.dumps(value), ex=600)
            if index % 200 == 199:
                pipe.execute()
        pipe.execute()

        ctx = multiprocessing.get_context("spawn")
        results: Any = ctx.Queue()
        reader = ctx.Process(target=read_every_value, args=(redis_server.port, prefix, results))
        reader.start()
        growth, kept_bytes, kept, evictions = results.get(timeout=120)
        reader.join(timeout=30)
    finally:
        for start in range(0, VALUES, 500):
            client.delete(*(f"{prefix}blob:{i}" for i in range(start, start + 500)))
        client.close()

    assert kept_bytes <= MAX_LOCAL_BYTES
    assert evictions == VALUES - kept  # every value read was kept, then the oldest dropped
    # 300 MB read; the process grew by the store's budget at most, plus its working set.
    assert growth <= MAX_LOCAL_BYTES + SLACK_BYTES, growth


def test_the_store_budget_is_set_per_instance_and_checked() -> None:
    mf = Memofill(policies={}, local_store_bytes=1 << 20)
    assert mf.local_store.max_bytes == 1 << 20
    with mf.override():  # a test's fresh store keeps the instance's budget
        assert mf.local_store.max_bytes == 1 << 20
    assert Memofill(policies={}).local_store.max_bytes == MAX_LOCAL_BYTES
    for bad in (-1, 1.5, "32MB", True):
        with pytest.raises(ConfigurationError, match="local_store_bytes"):
            Memofill(policies={}, local_store_bytes=bad)  # type: ignore[arg-type]
