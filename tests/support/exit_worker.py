"""A process that starts background refreshes and then exits: run as ``python -m``.

``python -m tests.support.exit_worker URL PREFIX sync|async`` fills two keys of a
dataset with a stale window, lets them go stale, and reads each once, so that
each read hands a refresh off: ``quick``'s fetch takes 0.2 s, and the process
waits for its refresh to land; ``slow``'s fetch takes 30 s, and the process
returns from its main code as soon as that fetch has begun. It prints one line
per step (``quick refreshed 2``, ``exiting``), so the test can time the exit
from the moment the slow refresh is in flight. Imports only memofill and
redis-py, so it starts fast.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import redis
import redis.asyncio

from memofill import CacheFill, Dataset, Memofill

KEY = "exit:{name}"
DATASET = Dataset(
    KEY,
    ttl_s=0.2,
    stale_s=60,
    cache_fill=CacheFill(lease_ms=60_000, wait_ms=5_000, poll_min_ms=10, poll_max_ms=200),
)
#: How long each key's refresh fetch takes (its first fetch is immediate).
REFRESH_S = {"quick": 0.2, "slow": 30.0}


def say(line: str) -> None:
    print(line, flush=True)


def main_sync(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    cache = Memofill(client, prefix=prefix, policies={KEY: DATASET})
    calls = {"quick": 0, "slow": 0}
    fetching = threading.Event()

    @cache.cached_dataset(KEY)
    def fetch(name: str) -> dict[str, Any]:
        calls[name] += 1
        if calls[name] > 1:
            fetching.set()
            time.sleep(REFRESH_S[name])
        return {"name": name, "call": calls[name]}

    for name in REFRESH_S:
        assert fetch.call_with_outcome(name).outcome == "leader_fill"
    time.sleep(0.3)  # both values go stale
    assert fetch.call_with_outcome("quick").outcome == "stale_hit"
    deadline = time.monotonic() + 20
    while cache.refreshes.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    say(f"quick refreshed {fetch('quick')['call']}")
    fetching.clear()
    assert fetch.call_with_outcome("slow").outcome == "stale_hit"
    assert fetching.wait(timeout=20)
    say("exiting")


async def main_async(url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    cache = Memofill(async_client=client, prefix=prefix, policies={KEY: DATASET})
    calls = {"quick": 0, "slow": 0}
    fetching = asyncio.Event()

    @cache.cached_dataset(KEY)
    async def fetch(name: str) -> dict[str, Any]:
        calls[name] += 1
        if calls[name] > 1:
            fetching.set()
            await asyncio.sleep(REFRESH_S[name])
        return {"name": name, "call": calls[name]}

    for name in REFRESH_S:
        assert (await fetch.call_with_outcome(name)).outcome == "leader_fill"
    await asyncio.sleep(0.3)  # both values go stale
    assert (await fetch.call_with_outcome("quick")).outcome == "stale_hit"
    await asyncio.wait_for(asyncio.gather(*cache.refreshes.tasks), timeout=20)
    say(f"quick refreshed {(await fetch('quick'))['call']}")
    fetching.clear()
    assert (await fetch.call_with_outcome("slow")).outcome == "stale_hit"
    await asyncio.wait_for(fetching.wait(), timeout=20)
    say("exiting")


if __name__ == "__main__":
    url, prefix, mode = sys.argv[1:4]
    if mode == "async":
        asyncio.run(main_async(url, prefix))
    else:
        main_sync(url, prefix)
