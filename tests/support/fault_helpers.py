"""Stampedes of real processes for the fault tests, and the clients and records they share.

A stampede is ``processes`` spawned interpreters, each with its own
:class:`~memofill.Memofill` and ``threads`` callers of one cached function,
released together by a barrier. The fetch counts itself with ``INCR`` on a
separate counter server, so the count survives whatever happens to the cache
server, and a killed process cannot take its count with it. Each process sends
back what its callers saw (outcome, value check, exception, time) and the miss
records it logged.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import redis
import redis.asyncio
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from memofill import CacheFill, Dataset, Memofill

#: The socket time-outs of every fault-test client: a dead or paused Redis costs at most this.
SOCKET_TIMEOUT_S = 0.3
#: The socket time-outs of clients in tests that do not stall Redis: there, on a busy machine,
#: a slow reply must not pass for a fault.
PATIENT_SOCKET_TIMEOUT_S = 10.0
#: Slack on every time bound: the test machine has two busy cores.
MARGIN_S = 2.0

#: A policy short enough for tests: followers give up after 1 s, a dead leader's lock lives 2 s.
FAULT_FILL = CacheFill(lease_ms=2_000, wait_ms=1_000, poll_min_ms=10, poll_max_ms=100)


def dataset(fill: CacheFill = FAULT_FILL, key: str = "fault:{name}") -> Dataset:
    """A dataset under ``key`` with ``fill`` (60 s values, 5 s negative entries)."""
    return Dataset(key, ttl_s=60, negative_ttl_s=5, cache_fill=fill)


@attrs.frozen
class Target:
    """Where a client connects: one server or a cluster (through any of its nodes)."""

    port: int
    cluster: bool = False
    socket_timeout: float = SOCKET_TIMEOUT_S
    username: str | None = None
    password: str | None = None


def client_kwargs(target: Target) -> dict[str, Any]:
    """Short time-outs and no retries: a fault costs one time-out, not redis-py's ten retries."""
    return {
        "host": "127.0.0.1",
        "port": target.port,
        "socket_timeout": target.socket_timeout,
        "socket_connect_timeout": target.socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "username": target.username,
        "password": target.password,
    }


def make_client(target: Target) -> Any:
    """A blocking client (``redis.Redis`` or ``redis.cluster.RedisCluster``) for ``target``."""
    if target.cluster:
        return redis.cluster.RedisCluster(**client_kwargs(target))
    return redis.Redis(**client_kwargs(target))


def make_async_client(target: Target) -> Any:
    """An asyncio client for one server, with the same time-outs."""
    kwargs = client_kwargs(target) | {"retry": AsyncRetry(NoBackoff(), 0)}
    return redis.asyncio.Redis(**kwargs)


@attrs.frozen
class Stampede:
    """What every process of a stampede does: call ``name`` from ``threads`` threads at once."""

    target: Target
    counter_port: int
    prefix: str
    dataset: Dataset
    names: tuple[str, ...] = ("x",)
    fetch_s: float = 0.3
    threads: int = 3

    @property
    def origin_key(self) -> str:
        return f"{self.prefix}origin"


@attrs.frozen
class Call:
    """What one caller saw."""

    name: str
    outcome: str | None
    raised: str | None
    elapsed_s: float
    value_ok: bool


@attrs.frozen
class Report:
    """What one process saw: its callers, and the miss records it logged."""

    pid: int
    calls: tuple[Call, ...]
    records: tuple[dict[str, Any], ...]


class RecordList(logging.Handler):
    """Keeps the miss records of the ``memofill`` logger as plain dicts.

    A fill's record stands for the callers in its process that shared it
    (``joined``): each is kept as a ``local_join`` of its own, with the fill's
    error, as the counters count them.
    """

    FIELDS = (
        "outcome",
        "dataset",
        "redis_key",
        "elapsed_ms",
        "waited_ms",
        "polls",
        "payload_bytes",
        "error",
    )

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "outcome"):
            fields = {name: getattr(record, name) for name in self.FIELDS}
            self.records.append(fields)
            joined = {**fields, "outcome": "local_join", "polls": 0, "waited_ms": 0.0}
            self.records.extend(dict(joined) for _ in range(getattr(record, "joined", 0)))


@contextlib.contextmanager
def recorded() -> Iterator[list[dict[str, Any]]]:
    """The miss records logged while the block runs."""
    handler = RecordList()
    logger = logging.getLogger("memofill")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def cached_fetch(mf: Memofill, spec: Stampede) -> Any:
    """The stampede's fetch, decorated: counts itself on the counter server, sleeps, returns."""
    counter = redis.Redis(host="127.0.0.1", port=spec.counter_port)

    @mf.cached_dataset(spec.dataset.key)
    def fetch(name: str) -> dict[str, Any]:
        counter.incr(spec.origin_key)
        time.sleep(spec.fetch_s)
        return {"name": name, "pid": os.getpid()}

    return fetch


def stampede_worker(spec: Stampede, barrier: Any, reports: Any) -> None:
    """One process of a stampede (runs in a spawned interpreter)."""
    with recorded() as records:
        mf = Memofill(
            make_client(spec.target), prefix=spec.prefix, policies={spec.dataset.key: spec.dataset}
        )
        fetch = cached_fetch(mf, spec)
        calls: list[Call] = []

        def caller() -> None:
            for name in spec.names:
                started = time.monotonic()
                try:
                    result = fetch.call_with_outcome(name)
                except Exception as exc:
                    raised = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
                    calls.append(Call(name, None, raised, time.monotonic() - started, False))
                else:
                    ok = isinstance(result.value, dict) and result.value.get("name") == name
                    calls.append(Call(name, result.outcome, None, time.monotonic() - started, ok))

        threads = [threading.Thread(target=caller) for _ in range(spec.threads)]
        barrier.wait(timeout=60)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    reports.put(Report(os.getpid(), tuple(calls), tuple(records)))


@attrs.define
class Result:
    """Everything a stampede's processes reported."""

    reports: list[Report]

    @property
    def calls(self) -> list[Call]:
        return [call for report in self.reports for call in report.calls]

    @property
    def records(self) -> list[dict[str, Any]]:
        return [record for report in self.reports for record in report.records]

    @property
    def outcomes(self) -> Counter[str | None]:
        return Counter(call.outcome for call in self.calls)

    @property
    def errors(self) -> Counter[tuple[str, str | None]]:
        return Counter((r["outcome"], r["error"]) for r in self.records)

    @property
    def longest_wait_s(self) -> float:
        return max(call.elapsed_s for call in self.calls)

    def assert_every_caller_got_its_value(self) -> None:
        raised = [call.raised for call in self.calls if call.raised]
        assert not raised, raised
        assert all(call.value_ok for call in self.calls), self.calls

    def per_process(self) -> list[Counter[str | None]]:
        """Each process's outcomes, sorted so that the result does not depend on pids."""
        counts = [Counter(call.outcome for call in report.calls) for report in self.reports]
        return sorted(counts, key=lambda c: sorted((str(k), v) for k, v in c.items()))


class Workers:
    """``processes`` spawned stampede processes; :meth:`release` lets their callers go."""

    def __init__(self, spec: Stampede, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self.barrier = ctx.Barrier(processes + 1)
        self.reports: Any = ctx.Queue()
        self.processes = [
            ctx.Process(
                target=stampede_worker, args=(spec, self.barrier, self.reports), daemon=True
            )
            for _ in range(processes)
        ]
        for process in self.processes:
            process.start()

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Wait until every process has started and waits at the barrier (spawning is slow)."""
        wait_until(lambda: self.barrier.n_waiting == len(self.processes), timeout_s=timeout_s)

    def release(self) -> float:
        """Wait until every process is ready, release all callers at once; return that time."""
        self.barrier.wait(timeout=60)
        return time.monotonic()

    def kill(self) -> None:
        """SIGKILL every process (a leader dying in the middle of its fetch)."""
        for process in self.processes:
            process.kill()
            process.join(timeout=10)

    def collect(self, timeout_s: float = 60) -> Result:
        """The reports of the processes that are still alive, then wait for them to exit."""
        deadline = time.monotonic() + timeout_s
        reports: list[Report] = []
        alive = [p for p in self.processes if p.exitcode is None or p.exitcode == 0]
        try:
            while len(reports) < len(alive):
                reports.append(self.reports.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            missing = f"only {len(reports)} of {len(alive)} processes reported"
            raise AssertionError(missing) from None
        finally:
            self.close()
        return Result(reports)

    def close(self) -> None:
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        self.reports.close()
        self.reports.join_thread()


def run_stampede(
    spec: Stampede, processes: int, during: Callable[[float], None] | None = None
) -> Result:
    """Run a stampede; ``during(released_at)`` runs in the test process while the callers go."""
    workers = Workers(spec, processes)
    try:
        released = workers.release()
        if during is not None:
            during(released)
    except BaseException:
        workers.kill()
        workers.close()
        raise
    return workers.collect()


def origin_calls(counter: redis.Redis, spec: Stampede) -> int:
    """How many times the stampede's fetch has started so far."""
    return int(counter.get(spec.origin_key) or 0)


def wait_until(
    condition: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.005
) -> float:
    """Poll ``condition`` until it is truthy; return how long that took (or fail)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - started


def note(request: Any, name: str, value: object) -> None:
    """Keep one measurement on the test's report (``user_properties``: junit-xml shows them).

    Appended directly rather than through ``record_property``, which warns (an
    error here) whenever junit-xml is written in its default ``xunit2`` family.
    """
    request.node.user_properties.append((name, value))


def measure(
    request: Any,
    origin_calls: int,
    longest_wait_s: float | None,
    outcomes: Counter[tuple[str, str | None]],
) -> None:
    """Keep what a fault test measured: the fault table's numbers."""
    note(request, "origin_calls", origin_calls)
    if longest_wait_s is not None:
        note(request, "longest_wait_s", round(longest_wait_s, 3))
    logged = sorted(outcomes.items(), key=lambda item: (item[0][0], str(item[0][1])))
    note(request, "outcomes", ", ".join(f"{o} ({e}) x{n}" for (o, e), n in logged))
