"""What a forked child inherits of memofill's process-local state, without any Redis.

The multi-process proof, a fork while a fill is in flight with real Redis, is in
``tests/test_pools.py``; here each piece is checked alone in a forked child.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import warnings
from typing import Any

import pytest
import redis.asyncio

from memofill import Memofill
from tests.conftest import POLICIES

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")


def state(mf: Memofill) -> dict[str, Any]:
    async_pool = mf._async.client.connection_pool if mf._async else None  # type: ignore[union-attr]
    return {
        "thread_flights": len(mf.thread_flights),
        "task_flights": len(mf.task_flights),
        "breaker_open": mf.breaker.is_open,
        "counts": mf.counters.snapshot(),
        "kept": mf.local_store.get("kept", None),
        "locks_free": all(
            lock.acquire(timeout=5)
            for lock in (mf.thread_flights._lock, mf.local_store._lock, mf.counters._lock)
        ),
        "async_connections": None
        if async_pool is None
        else len(async_pool._available_connections) + len(async_pool._in_use_connections),
    }


def report_state(mf: Memofill, results: Any) -> None:  # pragma: no cover - in the child
    results.put(state(mf))


def test_a_forked_child_starts_with_no_fills_free_locks_a_closed_breaker_and_zero_counts() -> None:
    client = redis.asyncio.Redis(port=1)  # never connected: only its pool is looked at
    mf = Memofill(client, policies=POLICIES)
    mf.local_store.put("kept", b"1", ttl_s=30)
    mf.counters.add("item:{name}", "leader_fill")
    mf.breaker.trip()
    pool = client.connection_pool
    pool._available_connections.append(object())  # as if the parent had connected
    started, release = threading.Event(), threading.Event()

    def fill(flight: object) -> None:
        started.set()
        release.wait(timeout=30)

    holder = threading.Thread(target=lambda: mf.thread_flights.run("key", fill))  # type: ignore[arg-type, return-value]
    holder.start()
    started.wait(timeout=10)
    # Fork while a parent thread holds the locks a child could otherwise never take.
    for lock in (mf.local_store._lock, mf.counters._lock):
        lock.acquire()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=report_state, args=(mf, results))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            child.start()
        got = results.get(timeout=30)
    finally:
        for lock in (mf.local_store._lock, mf.counters._lock):
            lock.release()
        release.set()
        holder.join()
        child.join(timeout=10)
    assert got == {
        "thread_flights": 0,
        "task_flights": 0,
        "breaker_open": False,
        "counts": {},
        "kept": b"1",
        "locks_free": True,
        "async_connections": 0,
    }
    # The parent's own state is untouched.
    assert mf.breaker.is_open
    assert mf.counters.snapshot() == {"item:{name}": {"leader_fill": 1}}
    assert len(pool._available_connections) == 1
    pool._available_connections.clear()
