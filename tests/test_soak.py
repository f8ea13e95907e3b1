"""A soak: many processes read short-lived keys for half a minute while Redis pauses and restarts.

Six spawned processes, twenty threads each, read four keys whose values live one
second, for thirty seconds. Meanwhile the test pauses the cache server (SIGSTOP)
at random moments and restarts it once, losing every key. The contract under
test, for the whole run:

* no caller ever sees an exception, and every value belongs to the key asked;
* outside the fault windows, every value read is no older than its TTL allows;
* outside the fault windows, the origin is called at most once per key per
  expiry: two fetches of one key never start within half a TTL of each other;
* after warm-up, no process grows: what memofill keeps is bounded.

Each origin call is recorded (key, wall-clock start) on a separate counter
server that no fault touches.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import redis

from memofill import CacheFill, Dataset, Memofill
from tests.support.fault_helpers import Target, make_client
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]

PROCESSES = 6
THREADS = 20
NAMES = ("a", "b", "c", "d")
DURATION_S = 30.0
WARM_UP_S = 8.0
TTL_S = 1.0
FETCH_S = 0.05
#: Client time-outs: long enough that a busy machine's slow reply is not taken for an outage.
SOCKET_TIMEOUT_S = 1.0
#: After a fault ends, how long the fleet may still be catching up (breaker, leases, waits).
FAULT_GRACE_S = 4.0
#: Slack on freshness: a thread may be descheduled between reading a value and checking it.
FRESHNESS_SLACK_S = 3.0
#: Growth of a process's resident memory from the end of warm-up to the end of the run.
MAX_GROWTH_BYTES = 16 * 1024 * 1024

SOAK_FILL = CacheFill(lease_ms=3_000, wait_ms=2_000, poll_min_ms=10, poll_max_ms=100)


@attrs.frozen
class Spec:
    port: int
    counter_port: int
    prefix: str

    @property
    def calls_key(self) -> str:
        return f"{self.prefix}origin"


@attrs.frozen
class Seen:
    """What one process's callers saw, and how its memory moved."""

    calls: int
    errors: tuple[str, ...]
    wrong: tuple[str, ...]
    #: (wall-clock time of the read, name, age of the value in seconds)
    ages: tuple[tuple[float, str, float], ...]
    rss_after_warm_up: int
    rss_at_end: int


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak_worker(spec: Spec, barrier: Any, results: Any) -> None:
    """One process: ``THREADS`` callers reading random keys until the run ends."""
    target = Target(spec.port, socket_timeout=SOCKET_TIMEOUT_S)
    dataset = Dataset("soak:{name}", ttl_s=TTL_S, negative_ttl_s=0, cache_fill=SOAK_FILL)
    mf = Memofill(make_client(target), prefix=spec.prefix, policies={dataset.key: dataset})
    counter = redis.Redis(host="127.0.0.1", port=spec.counter_port)

    @mf.cached_dataset("soak:{name}")
    def fetch(name: str) -> dict[str, Any]:
        counter.rpush(spec.calls_key, f"{name} {time.time()}")
        time.sleep(FETCH_S)
        return {"name": name, "at": time.time()}

    lock = threading.Lock()
    calls = [0]
    errors: list[str] = []
    wrong: list[str] = []
    ages: list[tuple[float, str, float]] = []
    barrier.wait(timeout=60)
    started = time.monotonic()
    deadline = started + DURATION_S

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            name = rng.choice(NAMES)
            try:
                value = fetch(name)
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
            else:
                now = time.time()
                with lock:
                    calls[0] += 1
                    if not isinstance(value, dict) or value.get("name") != name:
                        wrong.append(f"{name}: {value!r}")
                    else:
                        ages.append((now, name, now - value["at"]))
            time.sleep(rng.uniform(0.005, 0.02))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, started + WARM_UP_S - time.monotonic()))
    rss_after_warm_up = _rss_bytes()
    for thread in threads:
        thread.join()
    results.put(
        Seen(
            calls[0],
            tuple(errors[:20]),
            tuple(wrong[:20]),
            tuple(ages),
            rss_after_warm_up,
            _rss_bytes(),
        )
    )


@pytest.fixture
def cache_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


def _in_windows(at: float, windows: list[tuple[float, float]]) -> bool:
    return any(start <= at <= end + FAULT_GRACE_S for start, end in windows)


def test_soak_with_pauses_and_a_restart(
    cache_server: RedisServer, redis_server: RedisServer
) -> None:
    spec = Spec(cache_server.port, redis_server.port, f"soak{uuid.uuid4().hex[:8]}:")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    results: Any = ctx.Queue()
    workers = [
        ctx.Process(target=soak_worker, args=(spec, barrier, results), daemon=True)
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    windows: list[tuple[float, float]] = []
    rng = random.Random()
    try:
        barrier.wait(timeout=60)
        began = time.monotonic()
        # Faults only after warm-up and not in the last seconds, so the run ends healthy.
        schedule, at = [], WARM_UP_S
        while at < DURATION_S - 6:
            schedule.append(at)
            at += rng.uniform(2.0, 4.0)
        restart = rng.randrange(len(schedule))
        for index, fault_at in enumerate(schedule):
            time.sleep(max(0.0, began + fault_at - time.monotonic()))
            start = time.time()
            if index == restart:
                cache_server.restart()
            else:
                cache_server.pause()
                time.sleep(rng.uniform(0.2, 1.2))
                cache_server.resume()
            windows.append((start, time.time()))
        seen = [results.get(timeout=DURATION_S + 60) for _ in workers]
    finally:
        cache_server.resume()
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()

    assert len(windows) >= 4
    errors = [e for s in seen for e in s.errors]
    wrong = [w for s in seen for w in s.wrong]
    assert not errors, errors
    assert not wrong, wrong
    assert sum(s.calls for s in seen) > PROCESSES * THREADS * 10

    stale = [
        (name, round(age, 3))
        for s in seen
        for at, name, age in s.ages
        if age > TTL_S + FRESHNESS_SLACK_S and not _in_windows(at, windows)
    ]
    assert not stale, stale[:10]

    starts: dict[str, list[float]] = defaultdict(list)
    counter = redis_server.client()
    try:
        entries: list[bytes] = counter.lrange(spec.calls_key, 0, -1)  # type: ignore[assignment]
        for entry in entries:
            name, started = entry.decode().split()
            starts[name].append(float(started))
    finally:
        counter.close()
    doubled = []
    for name, times in starts.items():
        times.sort()
        for earlier, later in itertools.pairwise(times):
            close = later - earlier < TTL_S / 2
            if close and not _in_windows(earlier, windows) and not _in_windows(later, windows):
                doubled.append((name, round(earlier, 3), round(later, 3)))
    assert not doubled, doubled
    # Every key was refilled many times: the expiries really happened.
    assert all(len(starts[name]) >= DURATION_S / (TTL_S + 1) / 2 for name in NAMES), starts

    growth = [s.rss_at_end - s.rss_after_warm_up for s in seen]
    assert max(growth) <= MAX_GROWTH_BYTES, growth
