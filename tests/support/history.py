"""A Jepsen-style history of memofill under faults: the workers, the nemesis and the checker.

A run is ``processes`` spawned interpreters, each with its own
:class:`~memofill.Memofill` (no near cache, a short ``meta_check_ms``) and
``threads`` threads. Released together by a barrier, every thread draws
operations from an RNG seeded with the run's seed, its process and its thread:
call a key, refresh it, invalidate it, or invalidate its whole dataset (through
the function or the instance), on a few keys of three datasets. Meanwhile the
nemesis, a thread of the test process with its own seeded RNG, restarts the
cache server (it keeps nothing on disk), pauses it with SIGSTOP/SIGCONT, kills
it with SIGKILL and starts it again on the same port, or deletes the prefix's
``#meta`` hash.

A history is a list of :class:`Op`: one completed operation each (a call, a
refresh, an invalidation of a key or of a dataset, or a fault of the cache
server), with its process, thread, wall-clock start and end, and what came back
(the value, the outcome from ``call_with_outcome``, the exception, and the miss
or refresh records memofill logged during it). Each process appends its own to
a file, one JSON line each (:class:`Recorder`); :func:`load` merges them.

The origin's values record what they are: ``{"dataset", "key", "fetch_start":
time.time() when the fetch began, "n": a unique number from INCR on a second
redis-server that the nemesis never touches, "pid"}``. It sleeps a time drawn
from the run's seed and ``n``, and fails now and then with :class:`OriginFailure`.

Every process runs on this machine, so their ``time.time()`` readings are
comparable; :func:`check` verifies docs/SPEC.md §6 and docs/failure_modes.rst:

* ``invalidated-value-served``: a call (or refresh) that started after an
  invalidation of its key or dataset returned never gets a value whose fetch
  began before the invalidation started. A dataset invalidation made by another
  process is allowed ``meta_check_ms`` to reach it (docs/invalidation.rst:
  there is no listener without a near cache); a per-key invalidation has no
  propagation delay. ``slack_s`` is allowed on every clock read.
* ``redis-error-reached-caller``: a call or refresh returns a value, the
  origin's own exception, or a :class:`~memofill.errors.FillError` naming it:
  never anything else.
* ``wrong-value``: a value belongs to the dataset and key asked.

What the documents do not promise, or what no process can do, is counted and
printed, not asserted: an outage copy, or a fill coalesced in a process that
could not reach Redis, served after *another* process's invalidation (that
process could not reach Redis to learn of it), a value older
than one an earlier call of the same key already returned (a ``regression``;
``regression-in-redis`` when both were read from Redis with no restart or kill
between, the plainest trace of a stale set), and a value served past its
dataset's window (``ttl_s + max(stale_s, stale_if_error_s)`` from its fetch
start).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import multiprocessing
import os
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import redis

from memofill import CacheFill, Dataset, Memofill
from memofill.errors import FillError
from memofill.keys import meta_key
from tests.support.fault_helpers import PATIENT_SOCKET_TIMEOUT_S, Target, make_client
from tests.support.redis_servers import RedisServer

#: Three datasets: a plain one; one whose lease (120 ms) is shorter than most fetches, so a
#: second leader takes the lock while the first still fetches; and a serve-stale one whose
#: values go stale after 0.5 s and are refreshed in the background.
DATASETS = (
    Dataset(
        "hist:plain:{k}",
        ttl_s=60,
        negative_ttl_s=5,
        cache_fill=CacheFill(lease_ms=2_000, wait_ms=1_000, poll_min_ms=5, poll_max_ms=50),
    ),
    Dataset(
        "hist:short-lease:{k}",
        ttl_s=60,
        negative_ttl_s=5,
        cache_fill=CacheFill(lease_ms=120, wait_ms=100, poll_min_ms=5, poll_max_ms=40),
    ),
    Dataset(
        "hist:stale:{k}",
        ttl_s=0.5,
        stale_s=1.0,
        negative_ttl_s=5,
        cache_fill=CacheFill(
            lease_ms=1_000, wait_ms=500, poll_min_ms=5, poll_max_ms=50, refresh_retry_ms=200
        ),
    ),
)
POLICIES = {dataset.key: dataset for dataset in DATASETS}

#: What a thread does, and how often (weights).
OPERATIONS = {
    "call": 60,
    "refresh": 8,
    "invalidate": 20,
    "invalidate_dataset": 6,  # fn.invalidate_dataset()
    "invalidate_dataset_instance": 6,  # Memofill.invalidate_dataset(name)
}
READS = frozenset({"call", "refresh"})
INVALIDATIONS = frozenset({"invalidate", "invalidate_dataset", "invalidate_dataset_instance"})
#: Outcomes whose value was read from Redis: it was stored there when the read was sent.
REDIS_READS = frozenset({"hit", "stale_hit", "follower_hit", "leader_recheck_hit"})
#: Faults after which Redis holds none of what it held.
DATA_LOSS = frozenset({"restart", "kill"})
#: What the nemesis does to the cache server.
FAULTS = ("restart", "pause", "kill", "del_meta")
#: How long a process may take to start.
PATIENCE_S = 60.0
#: How long after the run's end a process may take to finish its last operation: far more
#: than any call may take (``wait_ms`` + a fetch + socket time-outs), so one that did not
#: finish by then hung.
FINISH_GRACE_S = 20.0


class OriginFailure(Exception):
    """The origin's own failure: the one exception (besides FillError) a caller may see."""


@attrs.frozen
class Plan:
    """One run: its seed, length, servers, and the shape of the workload and the faults."""

    seed: int
    seconds: float
    data_port: int
    counter_port: int
    directory: str
    processes: int = 3
    threads: int = 2
    prefix: str = "hist:"
    keys: tuple[str, ...] = ("k0", "k1")
    #: The origin's latency, drawn per fetch (ms): slow enough that fills straddle invalidations.
    fetch_ms: tuple[float, float] = (50.0, 200.0)
    origin_error_rate: float = 0.03
    meta_check_ms: int = 100
    #: A thread's pause between two operations (ms).
    think_ms: tuple[float, float] = (0.0, 20.0)
    faults: tuple[str, ...] = FAULTS
    #: The nemesis's pause between two faults, and how long a SIGSTOP lasts (ms).
    fault_gap_ms: tuple[float, float] = (300.0, 1_000.0)
    pause_ms: tuple[float, float] = (100.0, 500.0)

    @property
    def origin_key(self) -> str:
        return f"{self.prefix}origin"


# --- the history ---------------------------------------------------------------------------


@attrs.frozen(eq=False)
class Op:
    """One completed operation (or nemesis fault), as a line of a history file.

    ``kind`` is one of :data:`OPERATIONS` or ``"nemesis"`` (then ``fault`` says
    which); ``error`` is ``"module.Type: message"`` of what it raised.
    """

    process: str
    thread: int
    kind: str
    start: float
    end: float
    dataset: str | None = None
    key: str | None = None
    ok: bool = True
    value: Any = None
    outcome: str | None = None
    error: str | None = None
    error_type: str | None = None
    fault: str | None = None
    #: The miss and refresh records memofill logged in this thread during the operation.
    records: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_json(cls, line: bytes) -> Op:
        fields = orjson.loads(line)
        fields["records"] = tuple(fields.get("records") or ())
        return cls(**fields)

    def to_json(self) -> bytes:
        return orjson.dumps(attrs.asdict(self, recurse=False))

    @property
    def name(self) -> str:
        return f"{self.process}/t{self.thread}" if self.thread >= 0 else self.process

    @property
    def fetch_start(self) -> float | None:
        """The fetch start of the value this read returned, if it returned one of the origin's."""
        if isinstance(self.value, dict) and isinstance(self.value.get("fetch_start"), float):
            return float(self.value["fetch_start"])
        return None


def error_type(exc: BaseException) -> str:
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}"


ORIGIN_FAILURE = error_type(OriginFailure(""))
FILL_ERROR = error_type(FillError("", "", ""))


def allowed_error(op: Op) -> bool:
    """Whether a caller may see what ``op`` raised (docs/failure_modes.rst).

    Its origin's own exception, or a FillError that names it (another process's fetch raised it).
    """
    if op.error_type == ORIGIN_FAILURE:
        return True
    return op.error_type == FILL_ERROR and OriginFailure.__name__ in (op.error or "")


class Recorder:
    """Appends operations to one history file, one JSON line each, from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("ab", buffering=0)
        self._lock = threading.Lock()

    def write(self, op: Op) -> None:
        line = op.to_json() + b"\n"
        with self._lock:
            self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def load(directory: Path) -> list[Op]:
    """Every operation of every history file in ``directory``, ordered by start."""
    ops = [
        Op.from_json(line)
        for path in sorted(directory.glob("*.jsonl"))
        for line in path.read_bytes().splitlines()
        if line.strip()
    ]
    ops.sort(key=lambda op: (op.start, op.end))
    return ops


# --- a worker process ----------------------------------------------------------------------


class RecordTap:
    """Hands memofill's miss and refresh records to the operation running in their thread.

    A hook (``events.subscribe``), not a log handler: hooks get every caller's
    record (a joiner's too, and each repeat of a warning the log sums up).
    Records of other threads (background refreshes) become ``log`` lines of
    their own.
    """

    def __init__(self, recorder: Recorder, process: str) -> None:
        self.recorder = recorder
        self.process = process
        self.local = threading.local()

    @contextlib.contextmanager
    def collecting(self) -> Iterator[list[dict[str, Any]]]:
        records: list[dict[str, Any]] = []
        self.local.records = records
        try:
            yield records
        finally:
            self.local.records = None

    def __call__(self, record: Any) -> None:
        outcome = getattr(record, "outcome", None)
        if outcome is None:
            return
        fields = {
            "outcome": str(getattr(outcome, "value", outcome)),
            "redis_key": getattr(record, "redis_key", None),
            "error": getattr(record, "error", None),
        }
        records = getattr(self.local, "records", None)
        if records is not None:
            records.append(fields)
            return
        now = time.time()
        self.recorder.write(
            Op(self.process, -1, "log", now, now, outcome=fields["outcome"], records=(fields,))
        )


def origin(plan: Plan, dataset: str, counter: redis.Redis) -> Callable[[str], dict[str, Any]]:
    """The fetch of ``dataset``: a value that says which fetch made it, and when it began."""

    def fetch(k: str) -> dict[str, Any]:
        fetch_start = time.time()
        n = int(counter.incr(plan.origin_key))
        rng = random.Random(f"{plan.seed}/origin/{n}")
        time.sleep(rng.uniform(*plan.fetch_ms) / 1000)
        if rng.random() < plan.origin_error_rate:
            raise OriginFailure(f"origin call {n} failed")
        pid = os.getpid()
        return {"dataset": dataset, "key": k, "fetch_start": fetch_start, "n": n, "pid": pid}

    return fetch


class Worker:
    """One process of the run: its instance, its decorated functions and its history file."""

    def __init__(self, plan: Plan, index: int) -> None:
        self.plan = plan
        self.process = f"p{index}"
        self.recorder = Recorder(Path(plan.directory) / f"{self.process}.jsonl")
        self.tap = RecordTap(self.recorder, self.process)
        logger = logging.getLogger("memofill")  # the runner's output stays readable
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
        counter = redis.Redis(
            host="127.0.0.1",
            port=plan.counter_port,
            socket_timeout=PATIENT_SOCKET_TIMEOUT_S,
            socket_connect_timeout=PATIENT_SOCKET_TIMEOUT_S,
        )
        self.mf = Memofill(
            make_client(Target(plan.data_port)),
            prefix=plan.prefix,
            policies=POLICIES,
            near=None,
            meta_check_ms=plan.meta_check_ms,
        )
        self.mf.events.subscribe(self.tap)
        self.functions = {
            dataset.key: self.mf.cached_dataset(dataset.key)(origin(plan, dataset.key, counter))
            for dataset in DATASETS
        }

    def perform(self, kind: str, dataset: str, key: str) -> tuple[Any, str | None]:
        """Do one operation; return its value and outcome (``None`` when it has none)."""
        fn = self.functions[dataset]
        if kind == "call":
            result = fn.call_with_outcome(key)
            return result.value, str(result.outcome)
        if kind == "refresh":
            return fn.refresh(key), None
        if kind == "invalidate":
            fn.invalidate(key)
        elif kind == "invalidate_dataset":
            fn.invalidate_dataset()
        elif kind == "invalidate_dataset_instance":
            self.mf.invalidate_dataset(dataset)
        else:
            raise ValueError(kind)
        return None, None

    def thread(self, thread: int, deadline: float) -> None:
        """One thread's operations until ``deadline`` (monotonic), drawn from its own RNG.

        The RNG is drawn from the same number of times per operation whatever
        happens, so a seed gives each thread the same sequence of operations.
        """
        rng = random.Random(f"{self.plan.seed}/{self.process}/{thread}")
        kinds, weights = list(OPERATIONS), list(OPERATIONS.values())
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            dataset = rng.choice(DATASETS).key
            key = rng.choice(self.plan.keys)
            think_s = rng.uniform(*self.plan.think_ms) / 1000
            with self.tap.collecting() as records:
                start = time.time()
                try:
                    value, outcome = self.perform(kind, dataset, key)
                except Exception as exc:
                    end = time.time()
                    result: dict[str, Any] = {
                        "ok": False,
                        "error": f"{error_type(exc)}: {exc}",
                        "error_type": error_type(exc),
                    }
                else:
                    end = time.time()
                    result = {"value": value, "outcome": outcome}
            self.recorder.write(
                Op(self.process, thread, kind, start, end, dataset, key, records=tuple(records),
                   **result)
            )  # fmt: skip
            time.sleep(think_s)

    def run(self, barrier: Any) -> bool:
        """Run every thread from the barrier to the deadline; whether none of them crashed."""
        crashed: list[BaseException] = []

        def guarded(thread: int, deadline: float) -> None:
            try:
                self.thread(thread, deadline)
            except BaseException as exc:  # a bug of the harness: the process exits with 1
                crashed.append(exc)
                raise

        barrier.wait(timeout=PATIENCE_S)
        deadline = time.monotonic() + self.plan.seconds
        threads = [
            threading.Thread(target=guarded, args=(n, deadline), name=f"{self.process}/t{n}")
            for n in range(self.plan.threads)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.recorder.close()
        return not crashed


def worker_main(plan: Plan, index: int, barrier: Any) -> None:
    """One process of the run (a spawned interpreter)."""
    if not Worker(plan, index).run(barrier):
        sys.exit(1)


# --- the nemesis ---------------------------------------------------------------------------


class Nemesis:
    """Faults of the cache server, drawn from the run's seed, until the run's deadline."""

    def __init__(self, plan: Plan, server: RedisServer, recorder: Recorder) -> None:
        self.plan = plan
        self.server = server
        self.recorder = recorder
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="nemesis", daemon=True)
        self.failure: BaseException | None = None
        self.deadline = 0.0

    def start(self, deadline: float) -> None:
        self.deadline = deadline
        self.thread.start()

    def run(self) -> None:
        rng = random.Random(f"{self.plan.seed}/nemesis")
        admin = self.server.client(socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while self.plan.faults:
                gap_s = rng.uniform(*self.plan.fault_gap_ms) / 1000
                fault = rng.choice(self.plan.faults)
                pause_s = rng.uniform(*self.plan.pause_ms) / 1000
                if self.stop.wait(gap_s) or time.monotonic() + pause_s > self.deadline:
                    return
                self.inject(fault, pause_s, admin)
        except BaseException as exc:  # the test fails on it, after the workers are stopped
            self.failure = exc
        finally:
            admin.close()
            self.heal()

    def inject(self, fault: str, pause_s: float, admin: redis.Redis) -> None:
        start = time.time()
        ok, error = True, None
        if fault == "restart":
            self.server.stop()
            self.server.start()
        elif fault == "kill":
            self.server.kill()
            self.server.start()
        elif fault == "pause":
            self.server.pause()
            try:
                time.sleep(pause_s)  # the fault's length, not a wait for anything
            finally:
                self.server.resume()
        elif fault == "del_meta":
            try:
                admin.delete(meta_key(self.plan.prefix))
            except redis.RedisError as exc:
                ok, error = False, f"{error_type(exc)}: {exc}"
        else:
            raise ValueError(fault)
        self.recorder.write(
            Op("nemesis", -1, "nemesis", start, time.time(), ok=ok, error=error, fault=fault)
        )

    def heal(self) -> None:
        """The server running and answering, whatever the last fault did."""
        self.server.resume()
        if self.server.process is None:
            self.server.start()

    def join(self) -> None:
        self.stop.set()
        self.thread.join(timeout=PATIENCE_S)


# --- a run ---------------------------------------------------------------------------------


@attrs.frozen
class Run:
    """The merged history of one run, and how its processes ended."""

    plan: Plan
    ops: list[Op]
    #: Processes that did not exit cleanly (a call that hung, a crash), with their exit codes.
    unfinished: dict[str, int | None]
    wall_s: float


def run(plan: Plan, data: RedisServer) -> Run:
    """Run ``plan`` against the cache server ``data``: workers, nemesis, then the merged history."""
    directory = Path(plan.directory)
    directory.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(plan.processes + 1)
    workers = [
        context.Process(target=worker_main, args=(plan, n, barrier), name=f"p{n}", daemon=True)
        for n in range(plan.processes)
    ]
    recorder = Recorder(directory / "nemesis.jsonl")
    nemesis = Nemesis(plan, data, recorder)
    started = time.monotonic()
    unfinished: dict[str, int | None] = {}
    try:
        for worker in workers:
            worker.start()
        barrier.wait(timeout=PATIENCE_S)
        deadline = time.monotonic() + plan.seconds
        nemesis.start(deadline)
        for worker in workers:
            worker.join(timeout=max(0.1, deadline + FINISH_GRACE_S - time.monotonic()))
    finally:
        nemesis.join()
        recorder.close()
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
            if worker.exitcode != 0:
                unfinished[worker.name] = worker.exitcode
    if nemesis.failure is not None:
        raise RuntimeError("the nemesis failed") from nemesis.failure
    return Run(plan, load(directory), unfinished, time.monotonic() - started)


# --- the checker ---------------------------------------------------------------------------


@attrs.frozen
class Bounds:
    """What the checker allows: propagation of a dataset invalidation, and clock slack."""

    #: How long another process may take to learn of a dataset invalidation (meta_check_ms).
    meta_check_s: float
    #: Slack on every comparison of two clock reads.
    slack_s: float = 0.005
    #: Each dataset's window, ``ttl_s + max(stale_s, stale_if_error_s)``: counted, not asserted.
    windows: Mapping[str, float] = attrs.field(factory=dict)
    #: Whether an outage copy (``fallback_hit``) served after *another* process's invalidation
    #: is a violation. A process that cannot reach Redis cannot learn of it, and SPEC §6 names
    #: no exception for outage copies: counted and printed, asserted only when strict.
    strict_outage: bool = False

    @classmethod
    def of(cls, plan: Plan, datasets: Iterable[Dataset] = DATASETS, **kwargs: Any) -> Bounds:
        windows = {d.key: d.ttl_s + max(d.stale_s, d.stale_if_error_s) for d in datasets}
        return cls(meta_check_s=plan.meta_check_ms / 1000, windows=windows, **kwargs)


@attrs.frozen(eq=False)
class Violation:
    rule: str
    op: Op
    #: The operation that makes ``op`` wrong (the invalidation), if another.
    cause: Op | None = None
    detail: str = ""


@attrs.frozen(eq=False)
class Note:
    """Something counted, not asserted: ``op``, and the earlier operation it is measured against."""

    kind: str
    op: Op
    other: Op | None = None


@attrs.frozen(eq=False)
class Verdict:
    violations: list[Violation]
    stats: dict[str, Any]
    notes: list[Note]


class LatestBefore:
    """Among invalidations, the one with the latest *start* whose deadline passed before a time.

    An invalidation's deadline is its end plus the delay a reader is allowed.
    """

    def __init__(self, ops: Iterable[Op], delay_s: float) -> None:
        ordered = sorted(ops, key=lambda op: op.end)
        self.deadlines = [op.end + delay_s for op in ordered]
        self.latest: list[Op] = []
        for op in ordered:
            best = self.latest[-1] if self.latest else None
            self.latest.append(op if best is None or op.start > best.start else best)

    def before(self, when: float) -> Op | None:
        index = bisect.bisect_left(self.deadlines, when)
        return self.latest[index - 1] if index else None


def _latest(indexes: Iterable[LatestBefore | None], when: float) -> Op | None:
    found = [index.before(when) for index in indexes if index is not None]
    return max((op for op in found if op is not None), key=lambda op: op.start, default=None)


class Invalidations:
    """The successful invalidations of a history, indexed for :meth:`rejecting`."""

    def __init__(self, ops: Iterable[Op], meta_check_s: float) -> None:
        by_key: dict[tuple[Any, ...], list[Op]] = defaultdict(list)
        by_dataset: dict[tuple[Any, ...], list[Op]] = defaultdict(list)
        for op in ops:
            if op.kind == "invalidate":
                by_key[op.dataset, op.key].append(op)
                by_key[op.dataset, op.key, op.process].append(op)
            else:
                by_dataset[op.dataset,].append(op)
                by_dataset[op.dataset, op.process].append(op)
        self.keys = {target: LatestBefore(ops, 0.0) for target, ops in by_key.items()}
        # Another process learns of a dataset invalidation within meta_check_ms; its own, at once.
        self.datasets = {
            target: LatestBefore(ops, meta_check_s if len(target) == 1 else 0.0)
            for target, ops in by_dataset.items()
        }

    def rejecting(self, read: Op, slack_s: float, own_only: bool = False) -> Op | None:
        """The latest invalidation ``read`` must respect (of its own process only, if asked)."""
        own = (read.dataset, read.key, read.process), (read.dataset, read.process)
        indexes = [self.keys.get(own[0]), self.datasets.get(own[1])]
        if not own_only:
            indexes += [self.keys.get((read.dataset, read.key)), self.datasets.get((read.dataset,))]
        return _latest(indexes, read.start - slack_s)


def check(ops: Sequence[Op], bounds: Bounds) -> Verdict:
    """Every violation of the rules in this module's docstring, with statistics of the run."""
    reads = [op for op in ops if op.kind in READS]
    served = [op for op in reads if op.ok and op.fetch_start is not None]
    violations: list[Violation] = []
    notes: list[Note] = []

    # (c) callers get their value or the origin's exception; values are theirs.
    for op in reads:
        if not op.ok:
            if not allowed_error(op):
                violations.append(
                    Violation("redis-error-reached-caller", op, detail=op.error or "")
                )
        elif op.fetch_start is None or not isinstance(op.value.get("n"), int):
            violations.append(
                Violation("wrong-value", op, detail=f"not an origin value: {op.value!r}")
            )
        elif op.value.get("dataset") != op.dataset or op.value.get("key") != op.key:
            violations.append(
                Violation("wrong-value", op, detail=f"another key's value: {op.value!r}")
            )

    # (a) invalidations are final.
    invalidations = Invalidations(
        (op for op in ops if op.kind in INVALIDATIONS and op.ok), bounds.meta_check_s
    )
    checked = 0
    for op in served:
        fetch_start: float = op.fetch_start  # type: ignore[assignment]
        outage = in_outage(op) and not bounds.strict_outage
        latest = invalidations.rejecting(op, bounds.slack_s, own_only=outage)
        if outage:
            anyone = invalidations.rejecting(op, bounds.slack_s)
            remote_only = latest is None or fetch_start >= latest.start - bounds.slack_s
            if anyone is not None and fetch_start < anyone.start - bounds.slack_s and remote_only:
                notes.append(Note("outage-copy-after-remote-invalidation", op, anyone))
        if latest is None:
            continue
        checked += 1
        if fetch_start < latest.start - bounds.slack_s:
            behind = latest.start - fetch_start
            detail = f"its fetch began {behind * 1000:.1f} ms before the invalidation did"
            violations.append(Violation("invalidated-value-served", op, latest, detail))

    # (b) and windows: counted only.
    by_target: dict[tuple[str | None, str | None], list[Op]] = defaultdict(list)
    for op in served:
        by_target[op.dataset, op.key].append(op)
    losses = [op for op in ops if op.kind == "nemesis" and op.fault in DATA_LOSS]
    for target_reads in by_target.values():
        for op, newer in _regressions(target_reads, bounds.slack_s):
            notes.append(Note("regression", op, newer))
        from_redis = [op for op in target_reads if op.outcome in REDIS_READS]
        for op, newer in _regressions(from_redis, bounds.slack_s):
            if not any(f.start <= op.start and f.end >= newer.end for f in losses):
                notes.append(Note("regression-in-redis", op, newer))
    for op in served:
        window = bounds.windows.get(op.dataset or "")
        if window is not None and op.start > _fetched(op) + window + bounds.slack_s:
            notes.append(Note("past-window", op))

    stats: dict[str, Any] = {
        "operations": dict(Counter(op.kind for op in ops if op.kind not in {"nemesis", "log"})),
        "outcomes": dict(Counter(op.outcome or op.kind for op in served)),
        "errors": dict(Counter(op.error_type for op in ops if op.error_type)),
        "faults": dict(Counter(op.fault for op in ops if op.kind == "nemesis")),
        "origin_values_served": len({op.value["n"] for op in served}),
        "reads_after_an_invalidation": checked,
        "violations": dict(Counter(v.rule for v in violations)),
    }
    for kind in NOTED:
        stats[kind] = dict(Counter(n.op.outcome or n.op.kind for n in notes if n.kind == kind))
    return Verdict(violations, stats, notes)


def _regressions(reads: Sequence[Op], slack_s: float) -> Iterator[tuple[Op, Op]]:
    """Each read of one key that got an older value than a read that ended before it began."""
    by_end = sorted(reads, key=lambda op: op.end)
    newest: Op | None = None
    cursor = 0
    for op in sorted(reads, key=lambda op: op.start):
        while cursor < len(by_end) and by_end[cursor].end < op.start - slack_s:
            earlier = by_end[cursor]
            if newest is None or _fetched(earlier) > _fetched(newest):
                newest = earlier
            cursor += 1
        if newest is not None and _fetched(op) < _fetched(newest) - slack_s:
            yield op, newest


def _fetched(op: Op) -> float:
    fetch_start = op.fetch_start
    assert fetch_start is not None
    return fetch_start


# --- the report ----------------------------------------------------------------------------


def describe(op: Op, t0: float) -> str:
    """One operation on one line, its times in ms since the run began."""
    span = f"[{(op.start - t0) * 1000:9.1f} .. {(op.end - t0) * 1000:9.1f}] ms"
    if op.kind == "nemesis":
        return f"nemesis {op.fault} {span}" + ("" if op.ok else f" failed: {op.error}")
    target = op.key if op.kind in READS or op.kind == "invalidate" else "(whole dataset)"
    text = f"{op.name} {op.kind} {op.dataset} {target} {span}"
    if not op.ok:
        text += f" raised {op.error}"
    elif op.fetch_start is not None:
        fetched = (op.fetch_start - t0) * 1000
        text += f" -> value n={op.value['n']} fetched at {fetched:.1f} ms by pid {op.value['pid']}"
    if op.outcome:
        text += f" ({op.outcome})"
    logged = [r["outcome"] + (f"[{r['error']}]" if r.get("error") else "") for r in op.records]
    if logged:
        text += f" logged {', '.join(logged)}"
    return text


#: The errors that say a process could not reach Redis, as memofill logs them.
UNREACHABLE = frozenset({"RedisUnavailable", "ConnectionError", "TimeoutError", "MarksUnread"})


def in_outage(op: Op) -> bool:
    """Whether ``op`` was served while its process could not reach Redis.

    An outage copy (``fallback_hit``), or a fill coalesced in the process
    (``local_join``, ``lock_error``) that met Redis unreachable: such a process
    cannot hear of another's invalidation, as docs/invalidation.rst says.
    """
    if op.outcome == "fallback_hit":
        return True
    return any(
        record.get("outcome") in {"local_join", "lock_error"} and record.get("error") in UNREACHABLE
        for record in op.records
    )


#: Counted, and asserted only with ``Bounds(strict_outage=True)``.
STRICT_ONLY = frozenset({"outage-copy-after-remote-invalidation"})


def replay(plan: Plan) -> str:
    """The environment that runs ``plan`` again (same seed, length and faults)."""
    words = [f"MEMOFILL_HISTORY_SEED={plan.seed}", f"MEMOFILL_HISTORY_SECONDS={plan.seconds:g}"]
    if plan.faults != FAULTS:
        words.append(f"MEMOFILL_HISTORY_FAULTS={','.join(plan.faults) or 'none'}")
    return " ".join(words)


#: What the checker counts without asserting, and how the report names the other operation.
NOTED = {
    "outage-copy-after-remote-invalidation": "after",
    "regression": "a newer value was returned before by",
    "regression-in-redis": "a newer value was read from Redis before by",
    "past-window": "",
}


def report(run: Run, verdict: Verdict, limit: int = 6) -> str:
    """The failure message: the seed and how to replay it, counts, and the offending operations.

    Violations are shown one per distinct value (the first call served it), with the
    call that first returned that value and the faults between its fetch and the call.
    """
    plan, ops = run.plan, run.ops
    t0 = min((op.start for op in ops), default=0.0)
    lines = [
        f"seed {plan.seed}: {len(verdict.violations)} violations in {len(ops)} operations, "
        f"{plan.processes} processes x {plan.threads} threads, {plan.seconds:g} s "
        f"(run took {run.wall_s:.1f} s)",
        f"replay: {replay(plan)} python -m pytest tests/test_history.py -m history",
        f"histories (JSON lines, times in s since the epoch): {plan.directory}",
        f"stats: {orjson.dumps(verdict.stats).decode()}",
    ]
    if run.unfinished:
        lines.append(f"processes that did not finish (exit codes): {run.unfinished}")
    first: dict[int, Op] = {}
    for op in ops:
        if op.kind in READS and op.ok and op.fetch_start is not None:
            first.setdefault(op.value["n"], op)
    faults = [op for op in ops if op.kind == "nemesis"]

    def context(op: Op, cause: Op | None, prefix: str) -> list[str]:
        text = []
        if cause is not None:
            text.append(f"{prefix}after {describe(cause, t0)}")
        fetch_start = op.fetch_start
        if fetch_start is not None:
            origin = first.get(op.value["n"])
            if origin is not None and origin is not op:
                text.append(f"{prefix}first returned by {describe(origin, t0)}")
            text.extend(
                f"{prefix}meanwhile {describe(fault, t0)}"
                for fault in faults
                if fault.end >= fetch_start and fault.start <= op.end
            )
        return text

    by_rule: dict[str, list[Violation]] = defaultdict(list)
    for violation in verdict.violations:
        by_rule[violation.rule].append(violation)
    for rule, found in by_rule.items():
        outcomes = Counter(v.op.outcome or v.op.kind for v in found)
        causes = Counter(v.cause.kind for v in found if v.cause is not None)
        lines.append(
            f"{rule}: {len(found)} (by outcome {dict(outcomes)}"
            + (f", by invalidation {dict(causes)})" if causes else ")")
        )
        shown: set[object] = set()
        for violation in found:
            distinct = violation.op.value.get("n") if violation.op.ok else id(violation)
            if distinct in shown:
                continue
            shown.add(distinct)
            if len(shown) > limit:
                break
            lines.append(f"  {describe(violation.op, t0)}: {violation.detail}")
            lines.extend(context(violation.op, violation.cause, "    "))
        if len(shown) > limit:
            lines.append(f"  ... {len(found)} in all")
    for kind, other in NOTED.items():
        noted = [note for note in verdict.notes if note.kind == kind]
        if not noted:
            continue
        hint = " (MEMOFILL_HISTORY_STRICT_OUTAGE=1 asserts them)" if kind in STRICT_ONLY else ""
        lines.append(f"not asserted, counted: {kind}: {len(noted)}{hint}")
        for note in noted[:2]:
            lines.append(f"  {describe(note.op, t0)}")
            if note.other is not None:
                lines.append(f"    {other} {describe(note.other, t0)}")
    return "\n".join(lines)
