"""Scenario 2: a stampede on a cold key: P processes x T callers released together.

What a cache promises under load is decided here: how many times the origin
runs, how long callers wait, and how much traffic the waiting costs Redis.

A :class:`Fleet` keeps P worker processes for one row across runs, so every
run starts with warm connections and loaded scripts (set-up is not what is
measured). For each run every worker starts its callers (threads, or asyncio
tasks for asyncio rows), blocked on an event; all workers and the harness then
meet at one multiprocessing barrier, and each worker releases its callers. The
origin takes 200 ms and counts its calls with ``INCR`` on a key of its own.

Redis traffic is counted twice: on the server (INFO commandstats before and
after, which includes the commands Lua scripts run inside Redis) and in each
worker (every request written to a socket, so a script or a pipeline counts as
one round trip). Both leave out connection set-up and the origin's ``INCR``
(see :data:`bench.common.EXCLUDED_COMMANDS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from bench.common import (
    MP,
    RequestCounter,
    async_client,
    median,
    percentile,
    server_commands,
    small_value,
    sync_client,
)
from bench.libraries import BY_SLUG, Cached, Library

#: How long the origin takes: a slow upstream, long enough that every caller arrives during it.
ORIGIN_S = 0.2
#: A caller that has not returned by then is reported as hung, and counted at this latency.
RUN_TIMEOUT_S = 60.0
#: Workers need this long at most to start and import every library.
START_TIMEOUT_S = 120.0
ORIGIN_COUNTER = "bench:origin:"


def _make_origin(port: int, is_async: bool) -> Callable[[str], Any]:
    """The slow upstream: count the call with ``INCR``, wait :data:`ORIGIN_S`, answer."""
    # INCR by name: redis-py's incr() sends INCRBY, and the counts leave out exactly INCR.
    if is_async:
        counter_async: Any = async_client(port)

        async def origin_async(name: str) -> Any:
            await counter_async.execute_command("INCR", ORIGIN_COUNTER + name)
            await asyncio.sleep(ORIGIN_S)
            return small_value(name)

        return origin_async
    counter: Any = sync_client(port)

    def origin(name: str) -> Any:
        counter.execute_command("INCR", ORIGIN_COUNTER + name)
        time.sleep(ORIGIN_S)
        return small_value(name)

    return origin


class _Callers:
    """The callers of one worker process for one run, and what each of them saw."""

    def __init__(self, count: int) -> None:
        self.latencies_ns: list[int | None] = [None] * count
        self.errors: list[str] = []
        self.wrong = 0

    def record(
        self, index: int, started: int, name: str, value: Any, error: Exception | None
    ) -> None:
        self.latencies_ns[index] = time.perf_counter_ns() - started
        if error is not None:
            self.errors.append(f"{type(error).__name__}: {error}"[:200])
        elif value != small_value(name):
            self.wrong += 1


def _run_threads(cached: Cached, name: str, count: int, release: Callable[[], None]) -> _Callers:
    callers = _Callers(count)
    go = threading.Event()

    def caller(index: int) -> None:
        go.wait()
        started = time.perf_counter_ns()
        value: Any = None
        error: Exception | None = None
        try:
            value = cached.call(name)
        except Exception as exc:
            error = exc
        callers.record(index, started, name, value, error)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    release()
    go.set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return callers


async def _run_tasks(
    cached: Cached, name: str, count: int, release: Callable[[], None]
) -> _Callers:
    callers = _Callers(count)
    go = asyncio.Event()

    async def caller(index: int) -> None:
        await go.wait()
        started = time.perf_counter_ns()
        value: Any = None
        error: Exception | None = None
        try:
            value = await cached.call(name)
        except Exception as exc:
            error = exc
        callers.record(index, started, name, value, error)

    tasks = [asyncio.ensure_future(caller(i)) for i in range(count)]
    await asyncio.sleep(0)  # every task now waits on the event
    await asyncio.get_running_loop().run_in_executor(None, release)
    go.set()
    await asyncio.wait(tasks, timeout=RUN_TIMEOUT_S)
    return callers


def _worker(slug: str, port: int, namespace: str, conn: Connection, barrier: Any) -> None:
    """One worker process: build the row's cached function, then serve commands from the harness."""
    requests = RequestCounter.install()
    library = BY_SLUG[slug]
    cached = library.make(port, namespace, _make_origin(port, library.is_async))
    loop = asyncio.new_event_loop() if library.is_async else None

    def callers(name: str, count: int, release: Callable[[], None]) -> _Callers:
        if loop is not None:
            return loop.run_until_complete(_run_tasks(cached, name, count, release))
        return _run_threads(cached, name, count, release)

    warm_name = f"warm-{uuid.uuid4().hex[:12]}"
    callers(warm_name, 1, lambda: None)  # one fill: connects, loads scripts, imports lazily
    conn.send(("ready", None))
    while True:
        command, *args = conn.recv()
        if command == "stop":
            break
        if command == "warm":  # concurrent hits: the pool grows to about as many connections
            for _ in range(2):
                callers(warm_name, args[0], lambda: None)
            cached.outcomes()
            conn.send(("warmed", None))
        elif command == "run":
            name, count = args
            before = requests.snapshot()
            seen = callers(name, count, lambda: barrier.wait(RUN_TIMEOUT_S))
            sent = requests.snapshot() - before
            conn.send(
                (
                    "result",
                    {
                        "latencies_ns": seen.latencies_ns,
                        "errors": seen.errors,
                        "wrong": seen.wrong,
                        "requests": dict(sent),
                        "outcomes": cached.outcomes(),
                    },
                )
            )
    closing = cached.close()
    if loop is not None:
        if asyncio.iscoroutine(closing):
            loop.run_until_complete(closing)
        loop.close()


class Fleet:
    """P worker processes serving one row, started once and reused for every run."""

    def __init__(
        self,
        library: Library,
        port: int,
        processes: int,
        worker: Callable[..., None] | None = None,
        extra_args: tuple[Any, ...] = (),
    ) -> None:
        """``worker`` (this scenario's by default) is started with ``extra_args`` after its own."""
        self.library = library
        self.port = port
        self.namespace = f"bench:{library.slug}:{uuid.uuid4().hex[:8]}:"
        self.barrier = MP.Barrier(processes + 1)
        self.pipes: list[Connection] = []
        self.processes = []
        for index in range(processes):
            parent, child = MP.Pipe()
            process = MP.Process(
                target=worker or _worker,
                name=f"bench-{library.slug}-{index}",
                daemon=True,
                args=(library.slug, port, self.namespace, child, self.barrier, *extra_args),
            )
            self.pipes.append(parent)
            self.processes.append(process)
        self.admin = sync_client(port)
        self._runs = 0

    def __enter__(self) -> Fleet:
        for process in self.processes:
            process.start()
        self._expect("ready", START_TIMEOUT_S)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            if process.is_alive():
                with contextlib.suppress(OSError):
                    pipe.send(("stop",))
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join()
        self.admin.close()

    def _expect(self, kind: str, timeout_s: float) -> list[Any]:
        replies = []
        deadline = time.monotonic() + timeout_s
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{process.name} sent no {kind!r} within {timeout_s:.0f} s")
            reply_kind, payload = pipe.recv()
            if reply_kind != kind:
                raise RuntimeError(f"{process.name} sent {reply_kind!r}, expected {kind!r}")
            replies.append(payload)
        return replies

    def run(self, callers_per_process: list[int]) -> dict[str, Any]:
        """One stampede on a new cold key; returns what the callers, the origin and Redis saw."""
        self._runs += 1
        for pipe, count in zip(self.pipes, callers_per_process, strict=True):
            pipe.send(("warm", count))
        self._expect("warmed", RUN_TIMEOUT_S)
        name = f"run-{self._runs}-{uuid.uuid4().hex[:8]}"
        for pipe, count in zip(self.pipes, callers_per_process, strict=True):
            pipe.send(("run", name, count))
        before = server_commands(self.admin)
        self.barrier.wait(RUN_TIMEOUT_S)
        replies = self._expect("result", RUN_TIMEOUT_S + 10)
        on_server = server_commands(self.admin) - before
        origin_calls = int(self.admin.get(ORIGIN_COUNTER + name) or 0)
        timeout_ns = int(RUN_TIMEOUT_S * 1e9)
        latencies = [
            timeout_ns if lat is None else lat for reply in replies for lat in reply["latencies_ns"]
        ]
        hung = sum(reply["latencies_ns"].count(None) for reply in replies)
        sent: Counter[str] = Counter()
        outcomes: Counter[str] = Counter()
        for reply in replies:
            sent.update(reply["requests"])
            outcomes.update(reply["outcomes"])
        errors = [error for reply in replies for error in reply["errors"]]
        latencies.sort()
        return {
            "callers": sum(callers_per_process),
            "origin_calls": origin_calls,
            "p50_ms": percentile(latencies, 50) / 1e6,
            "p99_ms": percentile(latencies, 99) / 1e6,
            "max_ms": (latencies[-1] if latencies else float("nan")) / 1e6,
            "round_trips": sum(sent.values()),
            "round_trips_by_command": dict(sorted(sent.items())),
            "server_commands": sum(on_server.values()),
            "server_commands_by_command": dict(sorted(on_server.items())),
            "errors": len(errors),
            "error_samples": sorted(set(errors))[:5],
            "wrong_values": sum(reply["wrong"] for reply in replies),
            "hung": hung,
            "outcomes": dict(sorted(outcomes.items())),
        }


def split(callers: int, processes: int) -> list[int]:
    """``callers`` spread over ``processes`` as evenly as possible (10 over 4: 3, 3, 2, 2)."""
    share, extra = divmod(callers, processes)
    return [share + (1 if index < extra else 0) for index in range(processes)]


SUMMARISED = (
    "origin_calls",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "round_trips",
    "server_commands",
    "errors",
    "wrong_values",
    "hung",
)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst (largest) of each metric over the runs."""
    summary: dict[str, Any] = {
        metric: {
            "median": median([run[metric] for run in runs]),
            "worst": max(run[metric] for run in runs),
        }
        for metric in SUMMARISED
    }
    summary["origin_once_every_run"] = all(run["origin_calls"] == 1 for run in runs)
    summary["origin_calls_per_run"] = [run["origin_calls"] for run in runs]
    return summary


def repeat(
    library: Library, port: int, callers_per_process: list[int], repeats: int
) -> list[dict[str, Any]]:
    """Up to ``repeats`` stampedes, each on a new cold key, from one fresh fleet.

    Stops early after a run in which some callers never returned: they would
    still be talking to Redis during the next run and skew it, and every such
    run costs the full time-out.
    """
    runs: list[dict[str, Any]] = []
    with Fleet(library, port, len(callers_per_process)) as fleet:
        while len(runs) < repeats and not (runs and runs[-1]["hung"]):
            runs.append(fleet.run(callers_per_process))
    return runs


def measure(
    library: Library, port: int, processes: int, threads: int, repeats: int
) -> dict[str, Any]:
    """``repeats`` stampedes of ``processes`` x ``threads`` callers, each on a new cold key."""
    runs = repeat(library, port, [threads] * processes, repeats)
    return {
        "processes": processes,
        "threads": threads,
        "origin_ms": ORIGIN_S * 1000,
        "runs": runs,
        "summary": summarise(runs),
    }
