"""Scenario 5: expiry under load: a hot key's freshness runs out three times while callers call.

A cold miss happens once per key; an expiry happens once per freshness period
for every hot key, for as long as the service runs. What a cache does then
decides whether every caller waits for the origin at each expiry, or none.

Each row gets a ``redis-server`` of its own, started here. P worker processes
× C callers (threads, or asyncio tasks for asyncio rows) call one key in a
loop, pausing 10–20 ms between calls. The origin takes 200 ms and stamps each
value with the wall-clock time its call started, so every caller knows the age
of what it was served; each worker notes when every origin call it ran started
and ended (in a caller, a refresh thread or a refresh task alike).

One run: worker 0 fills the key (the warm fill), then every worker releases its
callers at one barrier. They call until 300 ms after any caller first saw the
third value newer than the warm fill's (or a time limit), then the workers
wait for background refreshes to end and report. The harness groups
origin calls into refresh cycles (a call starting within
:data:`CYCLE_GAP_S` of the previous one belongs to its cycle): the first cycle
is the warm fill, each later one an expiry. Per run:

* origin calls per expiry;
* calls slower than :data:`SLOW_MS` (every call after the warm fill);
* *at expiry*: the calls that started between 20 ms before a cycle's first
  origin call and the end of its last one; their p50 and p99 against the p99 of
  every other call of the same run (the hits);
* the oldest value served: the largest age (end of the call minus the start of
  the origin call that made its value) minus the freshness;
* round trips: requests written to Redis during the run beyond each call's
  own read (the first request of every call that sent any; a call that joined
  another in its process sent none), per expiry; lock attempts: ``SET ... NX``
  requests per expiry;
* early refresh: the share of cycles whose first origin call started before the
  previous value's freshness ran out (counted from its origin call's start).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, cast

from bench.common import MP, RequestCounter, median, percentile, server_commands, small_value
from bench.libraries import BY_SLUG, EXPIRY_LIBRARIES, Cached, Library
from bench.stampede import Fleet
from tests.support.redis_servers import RedisServer  # the project's private-server helper

#: How long the origin takes.
ORIGIN_S = 0.2
#: Each caller pauses between this many seconds (uniformly drawn) between calls.
PAUSE_S = (0.010, 0.020)
#: Expiries per run, after the warm fill.
EXPIRIES = 3
#: A call slower than this waited for something: the origin, a lock, a pool.
SLOW_MS = 100.0
#: Origin calls that start closer together than this belong to one refresh cycle.
CYCLE_GAP_S = 0.5
#: Callers go on this long after the last expiry's value was first seen.
STOP_AFTER_S = 0.3
#: After the callers stop, refreshes still running in the background get this long to end.
SETTLE_S = ORIGIN_S + 0.3
#: Calls that started this long before a cycle's first origin call count as at expiry.
LEAD_IN_S = 0.020
START_TIMEOUT_S = 120.0


def _limit_s(fresh_s: float) -> float:
    """The longest a run may take: twice what the expiries need at the slowest cycle."""
    return (EXPIRIES + 1) * (fresh_s + ORIGIN_S) * 2


class _Origin:
    """The slow upstream: waits :data:`ORIGIN_S`, stamps the value, notes the call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []  # (start, end), wall clock
        self._lock = threading.Lock()

    def _answer(self, name: str, started: float) -> dict[str, Any]:
        with self._lock:
            self.calls.append((started, time.time()))
        return {**small_value(name), "fetched_at": started}

    def sync(self, name: str) -> dict[str, Any]:
        started = time.time()
        time.sleep(ORIGIN_S)
        return self._answer(name, started)

    async def asynchronous(self, name: str) -> dict[str, Any]:
        started = time.time()
        await asyncio.sleep(ORIGIN_S)
        return self._answer(name, started)

    def take(self) -> list[tuple[float, float]]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


def _first_args(command: Any, limit: int = 512) -> list[bytes]:
    """The arguments of the first command in a packed request (as far as ``limit`` bytes)."""
    if isinstance(command, str):
        data = command.encode()[:limit]
    elif isinstance(command, (bytes, bytearray, memoryview)):
        data = bytes(command[:limit])
    else:
        chunks, size = [], 0
        for chunk in command:
            piece = chunk.encode() if isinstance(chunk, str) else bytes(chunk[:limit])
            chunks.append(piece)
            size += len(piece)
            if size >= limit:
                break
        data = b"".join(chunks)[:limit]
    lines = data.split(b"\r\n")
    if not lines[0].startswith(b"*"):
        return []
    count = int(lines[0][1:])
    return [lines[2 + 2 * i] for i in range(count) if 2 + 2 * i < len(lines)]


#: The request count of the call in progress in this thread or task (``None`` outside calls).
#: Refresh threads start with an empty context, so what they send is not a caller's.
_CALL: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("_CALL", default=None)


class _Requests(RequestCounter):
    """Counts requests as :class:`RequestCounter` does, lock attempts (``SET ... NX``), and
    the requests of the call in progress (:data:`_CALL`)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock_attempts = 0

    def record(self, command: Any, check_health: bool) -> None:
        super().record(command, check_health)
        box = _CALL.get()
        if box is not None:
            box[0] += 1
        args = _first_args(command)
        if args[:1] == [b"SET"] and any(arg.upper() == b"NX" for arg in args[3:]):
            with self._lock:
                self.lock_attempts += 1


class _Run:
    """What one worker's callers saw in one run, and when they stop."""

    def __init__(self, stop: Any, stop_later: Callable[[], object]) -> None:
        #: (start, latency ns, the value's fetch start, error, requests the call sent, caller)
        self.calls: list[tuple[float, int, float | None, str | None, int, int]] = []
        self.wrong = 0
        self.stop = stop
        self._stop_later = stop_later
        self._cycles: list[float] = []  # when each value generation seen was fetched
        self._lock = threading.Lock()

    def record(  # noqa: PLR0917
        self,
        caller: int,
        name: str,
        started: float,
        latency_ns: int,
        value: Any,
        error: Exception | None,
        requests: int,
    ) -> None:
        fetched = value.get("fetched_at") if isinstance(value, dict) else None
        text = None if error is None else f"{type(error).__name__}: {error}"[:200]
        last = False
        with self._lock:
            self.calls.append((started, latency_ns, fetched, text, requests, caller))
            if error is None and (
                not isinstance(fetched, float)
                or {k: v for k, v in value.items() if k != "fetched_at"} != small_value(name)
            ):
                self.wrong += 1
            if isinstance(fetched, float) and (
                not self._cycles or fetched > self._cycles[-1] + CYCLE_GAP_S
            ):
                self._cycles.append(fetched)
                last = len(self._cycles) == EXPIRIES + 1
        if last:
            self._stop_later()


def _run_threads(
    cached: Cached,
    *,
    name: str,
    count: int,
    run: _Run,
    limit_s: float,
    release: Callable[[], None],
) -> None:
    go = threading.Event()

    def caller(index: int) -> None:
        rng = random.Random(os.getpid() * 100 + index)
        go.wait()
        deadline = time.monotonic() + limit_s
        while not run.stop.is_set() and time.monotonic() < deadline:
            box = [0]
            token = _CALL.set(box)
            started, clock = time.time(), time.perf_counter_ns()
            value: Any = None
            error: Exception | None = None
            try:
                value = cached.call(name)
            except Exception as exc:
                error = exc
            latency_ns = time.perf_counter_ns() - clock
            _CALL.reset(token)
            run.record(index, name, started, latency_ns, value, error, box[0])
            time.sleep(rng.uniform(*PAUSE_S))

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    release()
    go.set()
    for thread in threads:
        thread.join(limit_s + 30)


async def _run_tasks(
    cached: Cached,
    *,
    name: str,
    count: int,
    run: _Run,
    limit_s: float,
    release: Callable[[], None],
) -> None:
    go = asyncio.Event()

    async def caller(index: int) -> None:
        rng = random.Random(os.getpid() * 100 + index)
        await go.wait()
        deadline = time.monotonic() + limit_s
        while not run.stop.is_set() and time.monotonic() < deadline:
            box = [0]
            token = _CALL.set(box)
            started, clock = time.time(), time.perf_counter_ns()
            value: Any = None
            error: Exception | None = None
            try:
                value = await cached.call(name)
            except Exception as exc:
                error = exc
            latency_ns = time.perf_counter_ns() - clock
            _CALL.reset(token)
            run.record(index, name, started, latency_ns, value, error, box[0])
            await asyncio.sleep(rng.uniform(*PAUSE_S))

    tasks = [asyncio.ensure_future(caller(i)) for i in range(count)]
    await asyncio.sleep(0)  # every task now waits on the event
    await asyncio.get_running_loop().run_in_executor(None, release)
    go.set()
    await asyncio.wait(tasks, timeout=limit_s + 30)


class _Records(logging.Handler):
    """memofill's log records (one per coordinated miss or refresh): when, and the outcome."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.created, str(getattr(record, "outcome", record.msg))))

    def take(self) -> list[tuple[float, str]]:
        records, self.records = self.records, []
        return records


def _worker(  # noqa: PLR0917  # a Process target takes its arguments by position
    slug: str, port: int, namespace: str, conn: Connection, barrier: Any, stop: Any
) -> None:
    """One worker process: build the row's cached function, then serve the harness's commands."""
    requests = cast(_Requests, _Requests.install())
    records = _Records()
    logging.getLogger("memofill").addHandler(records)
    logging.getLogger("memofill").setLevel(logging.INFO)
    library = BY_SLUG[slug]
    origin = _Origin()
    cached = library.make(port, namespace, origin.asynchronous if library.is_async else origin.sync)
    loop = asyncio.new_event_loop() if library.is_async else None

    def call_once(name: str) -> None:
        value = cached.call(name)
        if loop is not None:
            loop.run_until_complete(value)

    def callers(name: str, count: int, run: _Run, release: Callable[[], None]) -> None:
        limit = _limit_s(library.fresh_s)
        if loop is not None:
            loop.run_until_complete(
                _run_tasks(cached, name=name, count=count, run=run, limit_s=limit, release=release)
            )
        else:
            _run_threads(cached, name=name, count=count, run=run, limit_s=limit, release=release)

    def settle() -> None:
        if loop is not None:  # background refresh tasks need the loop running
            loop.run_until_complete(asyncio.sleep(SETTLE_S))
        else:
            time.sleep(SETTLE_S)

    # Warm up on a key of its own: connections, scripts, lazy imports.
    call_once(f"warm-{uuid.uuid4().hex[:12]}")
    origin.take()
    records.take()
    cached.outcomes()
    conn.send(("ready", None))
    while True:
        command, *args = conn.recv()
        if command == "stop":
            break
        if command == "fill":
            records.take()
            call_once(args[0])
            cached.outcomes()
            conn.send(("filled", None))
        elif command == "run":
            name, count = args
            if loop is not None:  # the caller that sees the last value runs on the loop
                run = _Run(stop, functools.partial(loop.call_later, STOP_AFTER_S, stop.set))
            else:
                run = _Run(stop, lambda: threading.Timer(STOP_AFTER_S, stop.set).start())
            before, locks_before = requests.snapshot(), requests.lock_attempts
            callers(name, count, run, lambda: barrier.wait(START_TIMEOUT_S))
            settle()
            sent = requests.snapshot() - before
            conn.send(
                (
                    "result",
                    {
                        "calls": run.calls,
                        "wrong": run.wrong,
                        "origin_calls": origin.take(),
                        "records": records.take(),
                        "requests": dict(sent),
                        "lock_attempts": requests.lock_attempts - locks_before,
                        "outcomes": cached.outcomes(),
                    },
                )
            )
    closing = cached.close()
    if loop is not None:
        if asyncio.iscoroutine(closing):
            loop.run_until_complete(closing)
        loop.close()


def cycles(origin_calls: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Origin calls grouped into refresh cycles: a new cycle after a gap of :data:`CYCLE_GAP_S`."""
    groups: list[list[tuple[float, float]]] = []
    for call in sorted(origin_calls):
        if groups and call[0] - groups[-1][-1][0] < CYCLE_GAP_S:
            groups[-1].append(call)
        else:
            groups.append([call])
    return groups


def analyse(replies: list[dict[str, Any]], fresh_s: float) -> dict[str, Any]:
    """One run's figures from what every worker reported."""
    calls = sorted(call for reply in replies for call in reply["calls"])
    groups = cycles([call for reply in replies for call in reply["origin_calls"]])
    expiries = groups[1:]
    windows = [(group[0][0] - LEAD_IN_S, max(end for _, end in group)) for group in expiries]
    at_expiry: list[float] = []
    hits: list[float] = []
    for started, latency_ns, *_ in calls:
        inside = any(low <= started <= high for low, high in windows)
        (at_expiry if inside else hits).append(latency_ns / 1e6)
    at_expiry.sort()
    hits.sort()
    ages = [
        started + latency_ns / 1e9 - fetched
        for started, latency_ns, fetched, *_ in calls
        if fetched is not None
    ]
    sent: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for reply in replies:
        sent.update(reply["requests"])
        outcomes.update(reply["outcomes"])
    errors = [call[3] for call in calls if call[3] is not None]
    count = max(1, len(expiries))
    reading = sum(1 for call in calls if call[4])  # a call's first request is its read
    early = [
        group[0][0] < previous[0][0] + fresh_s for previous, group in itertools.pairwise(groups)
    ]
    return {
        "calls": len(calls),
        "expiries": len(expiries),
        "warm_fill_calls": len(groups[0]) if groups else 0,
        "origin_per_expiry": [len(group) for group in expiries],
        "slow_calls": sum(1 for call in calls if call[1] / 1e6 > SLOW_MS),
        "at_expiry_calls": len(at_expiry),
        "at_expiry_p50_ms": percentile(at_expiry, 50),
        "at_expiry_p99_ms": percentile(at_expiry, 99),
        "at_expiry_max_ms": at_expiry[-1] if at_expiry else float("nan"),
        "hit_p50_ms": percentile(hits, 50),
        "hit_p99_ms": percentile(hits, 99),
        "oldest_past_fresh_ms": (max(ages) - fresh_s) * 1000 if ages else float("nan"),
        "round_trips": sum(sent.values()),
        "round_trips_by_command": dict(sorted(sent.items())),
        "calls_without_requests": sum(1 for call in calls if not call[4]),
        "extra_round_trips_per_expiry": (sum(sent.values()) - reading) / count,
        "lock_attempts_per_expiry": sum(reply["lock_attempts"] for reply in replies) / count,
        "early_cycles": sum(early),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "wrong_values": sum(reply["wrong"] for reply in replies),
        "outcomes": dict(sorted(outcomes.items())),
    }


#: How much of the timeline to draw around the first expiry: before it, and after its refresh.
TRACE_MARGIN_S = 0.06


def trace(replies: list[dict[str, Any]], fresh_s: float, callers: int) -> dict[str, Any] | None:
    """A run's first expiry as a :mod:`memofill.timeline` trace: every call, and the refresh.

    Time 0 is the moment the warm value's freshness ran out (the start of its
    origin call plus the freshness). Each worker is a process, each caller a
    row; a call is a ``hit`` or, if the value it got was past its freshness when
    the call began, a ``stale_hit``, or a ``miss`` if its value was fetched
    while it waited. Each origin call of that expiry gets a row of its own after
    the callers', named by the outcome memofill logged for it.
    """
    groups = cycles([call for reply in replies for call in reply["origin_calls"]])
    if len(groups) < 2:
        return None
    zero = groups[0][0][0] + fresh_s
    low = zero - TRACE_MARGIN_S
    first = set(groups[1])
    landed = max(end for _, end in first)
    high = landed + TRACE_MARGIN_S
    entries: list[dict[str, Any]] = []
    for proc, reply in enumerate(replies):
        for started, latency_ns, fetched, error, _, caller in reply["calls"]:
            if not low <= started <= high:
                continue
            if error is not None:
                outcome = "error"
            elif fetched is not None and fetched >= started:
                outcome = "miss"
            elif fetched is not None and started - fetched > fresh_s:
                outcome = "stale_hit"
            else:
                outcome = "hit"
            entries.append(_entry(proc, caller, started, started + latency_ns / 1e9, zero, outcome))
        for start, end in reply["origin_calls"]:
            if (start, end) in first:
                logged = [o for at, o in reply["records"] if end - 0.001 <= at <= end + ORIGIN_S]
                outcome = next((o for o in logged if o.startswith("refresh")), "origin call")
                entries.append(_entry(proc, callers, start, end, zero, outcome) | {"led": True})
    slowest = max((e["end_ms"] - e["start_ms"] for e in entries if not e.get("led")), default=0.0)
    count = len(first)
    return {
        "title": f"{len(replies) * callers} callers in {len(replies)} processes as the value "
        f"goes stale: {count} origin call{'' if count == 1 else 's'}, slowest call "
        f"{slowest:.1f} ms",
        "description": "Timeline of a hot key's expiry",
        "axis_label": "ms after the value's freshness ran out",
        "origin_ms": ORIGIN_S * 1000,
        "origin_calls": count,
        "landed_ms": round((landed - zero) * 1000, 2),
        "callers": sorted(entries, key=lambda e: (e["proc"], e["thread"], e["start_ms"])),
    }


def _entry(  # noqa: PLR0917
    proc: int, thread: int, start: float, end: float, zero: float, outcome: str
) -> dict[str, Any]:
    return {
        "proc": proc,
        "thread": thread,
        "start_ms": round((start - zero) * 1000, 2),
        "end_ms": round((end - zero) * 1000, 2),
        "outcome": outcome,
    }


def _one_run(fleet: Fleet, stop: Any, callers: int, index: int) -> dict[str, Any]:
    name = f"expiry-{index}-{uuid.uuid4().hex[:8]}"
    first, process = fleet.pipes[0], fleet.processes[0]
    first.send(("fill", name))
    if not first.poll(START_TIMEOUT_S) or first.recv()[0] != "filled":
        raise RuntimeError(f"{process.name} did not make the warm fill")
    for pipe in fleet.pipes:
        pipe.send(("run", name, callers))
    before = server_commands(fleet.admin)
    fleet.barrier.wait(START_TIMEOUT_S)
    replies = fleet._expect("result", _limit_s(fleet.library.fresh_s) + SETTLE_S + 60)
    stop.clear()
    result = analyse(replies, fleet.library.fresh_s)
    result["server_commands"] = sum((server_commands(fleet.admin) - before).values())
    if index == 0 and fleet.library.slug.startswith("memofill-stale"):
        # Only there is freshness counted from the fetch's start, as the trace's labels are.
        result["trace"] = trace(replies, fleet.library.fresh_s, callers)
    return result


def _probe(library: Library, port: int) -> None:
    """Build the row once here: a row this memofill cannot configure fails with its reason."""
    cached = library.make(port, "probe:", _Origin().sync)
    closing = cached.close()
    if asyncio.iscoroutine(closing):
        asyncio.run(closing)


def measure(library: Library, processes: int, callers: int, repeats: int) -> dict[str, Any]:
    """``repeats`` runs of ``processes`` × ``callers`` callers on a server of the row's own."""
    server = RedisServer().start()
    try:
        _probe(library, server.port)
        stop = MP.Event()
        with Fleet(library, server.port, processes, _worker, (stop,)) as fleet:
            runs = [_one_run(fleet, stop, callers, index) for index in range(repeats)]
    except Exception as exc:  # a row that cannot run is reported as such; the others go on
        return {"failed": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        server.close()
    return {
        "processes": processes,
        "callers": callers,
        "origin_ms": ORIGIN_S * 1000,
        "fresh_s": library.fresh_s,
        "trace": runs[0].pop("trace", None) if runs else None,
        "runs": runs,
        "summary": summarise(runs),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Across runs: the worst of what must never happen, the median of the rest."""
    per_expiry = [count for run in runs for count in run["origin_per_expiry"]]
    expiries = sum(run["expiries"] for run in runs)
    return {
        "origin_per_expiry": [run["origin_per_expiry"] for run in runs],
        "origin_once_every_expiry": bool(per_expiry) and all(n == 1 for n in per_expiry),
        "expiries": expiries,
        "slow_calls": max(run["slow_calls"] for run in runs),
        "calls": median([run["calls"] for run in runs]),
        "at_expiry_p50_ms": median([run["at_expiry_p50_ms"] for run in runs]),
        "at_expiry_p99_ms": median([run["at_expiry_p99_ms"] for run in runs]),
        "at_expiry_p99_worst_ms": max(run["at_expiry_p99_ms"] for run in runs),
        "hit_p99_ms": median([run["hit_p99_ms"] for run in runs]),
        "p99_over_hit_ms": max(run["at_expiry_p99_ms"] - run["hit_p99_ms"] for run in runs),
        "oldest_past_fresh_ms": max(run["oldest_past_fresh_ms"] for run in runs),
        "extra_round_trips_per_expiry": median(
            [run["extra_round_trips_per_expiry"] for run in runs]
        ),
        "extra_round_trips_worst": max(run["extra_round_trips_per_expiry"] for run in runs),
        "lock_attempts_per_expiry": median([run["lock_attempts_per_expiry"] for run in runs]),
        "lock_attempts_worst": max(run["lock_attempts_per_expiry"] for run in runs),
        "lock_attempts_mean": sum(run["lock_attempts_per_expiry"] * run["expiries"] for run in runs)
        / max(1, expiries),
        "early_share": sum(run["early_cycles"] for run in runs) / max(1, expiries),
        "errors": sum(run["errors"] + run["wrong_values"] for run in runs),
    }


def rows(selected: list[str]) -> list[Library]:
    """The expiry rows to run: those named in ``selected``, or all when it is empty."""
    return [row for row in EXPIRY_LIBRARIES if not selected or row.slug in selected]
