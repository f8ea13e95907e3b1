"""Calls that reach the origin: a miss's fill, a refresh of a served value, a forced refresh.

Rules:

- Everything a miss or a refresh decides is here once, for blocking and asyncio
  callers alike; only the line that runs the coordinator's steps differs
  (:meth:`Miss.run_sync` / :meth:`Miss.run_async`, and the same for :class:`Refresh`).
- A miss is recorded where its fill runs, exactly once, even when the asyncio caller
  that started it was cancelled: it called the origin, so it is logged and counted.
- A process-local flight per key (and per dataset generation) joins the callers of one
  process to one fill; the coordinator joins processes.
- Nothing here runs on a hit: a hit never builds a :class:`Miss`, a plan, or a closure.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs

from memofill.codec import CORRUPT, Header, read_header
from memofill.commands import Commands, acl_rule
from memofill.coordinator import fill, refresh
from memofill.drivers import run_async, run_sync
from memofill.failures import is_timeout, is_unreachable
from memofill.fallback import Breaker
from memofill.freshness import wall_clock
from memofill.meta_reads import (
    MarksUnread,
    read_marks_async,
    read_marks_sync,
    reread_marks_async,
    reread_marks_sync,
    tell_unread,
)
from memofill.outcomes import (
    DISABLED,
    CallResult,
    MissRecord,
    Outcome,
    RefreshRecord,
    refused_by_acl,
)
from memofill.singleflight import Flight
from memofill.snapshot import BYPASS, Snapshot
from memofill.steps import LEASE_EXPIRED, REFUSALS, Plan, Result, Steps
from memofill.values import decode_stored

logger = logging.getLogger("memofill")
_rng = random.Random()
#: Ticks once per call that runs without a client: only the first logs the warning.
_no_client_calls = itertools.count()


def bypass(snapshot: Snapshot, wrapped: Any, args: Any, kwargs: Any, with_outcome: bool) -> Any:
    """Caching is off: call the function, count the call as ``disabled``, log nothing.

    For a coroutine function this returns its coroutine, for the caller to await.
    """
    snapshot.counters.add(snapshot.key, DISABLED)
    function = snapshot.current_function() if wrapped is None else wrapped
    if not with_outcome:
        return function(*args, **kwargs)
    if snapshot.is_async:
        return _with_outcome_async(function(*args, **kwargs))
    return CallResult(function(*args, **kwargs), DISABLED, False)


async def _with_outcome_async(call: Any) -> CallResult[Any]:
    return CallResult(await call, DISABLED, False)


def warn_no_client(snapshot: Snapshot) -> None:
    """Once per process: a cached function ran with no Redis client, so nothing is shared."""
    if next(_no_client_calls):
        return
    function = snapshot.current_function()
    logger.warning(
        "%s (dataset %s) ran with no Redis client configured: values are kept only in this "
        "process, for at most 30 s, and every process calls the origin itself. Call "
        "memofill.configure(client=redis.Redis(...)) at start-up (this is logged once)",
        getattr(function, "__qualname__", function),
        snapshot.key,
        extra={"dataset": snapshot.key},
    )


def fetcher(
    snapshot: Snapshot, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], Any]:
    """The call of the origin with these arguments (``wrapped`` None: the function as it is now)."""
    function = snapshot.current_function() if wrapped is None else wrapped
    return lambda: function(*args, **kwargs)


def plan_for(
    snapshot: Snapshot, key: str, commands: Commands | None, error: Exception | None, **extra: Any
) -> Plan:
    """What a fill or a refresh of ``key`` needs; Redis usable unless the breaker is open or
    the ``GET`` failed to connect.

    A ``GET`` that Redis answered with an error (another type under the key,
    say) still leaves Redis usable: the lock path runs, and its write
    replaces the key. ``extra`` sets the :class:`~memofill.steps.Plan` fields of one kind of fill.
    """
    dataset = snapshot.dataset
    # A time-out alone is not proof (the breaker counts them): the lock path runs, unless the
    # marks that would judge its recheck are unread.
    unreachable = error is not None and is_unreachable(error) and not is_timeout(error)
    unreachable = unreachable or isinstance(error, MarksUnread)
    breaker_open = snapshot.breaker.is_open
    return Plan(
        dataset=dataset.key,
        redis_key=key,
        ttl_ms=max(1, round(dataset.ttl_s * 1000)),
        window_ms=round(dataset.window_s * 1000),
        negative_ttl_ms=round(dataset.negative_ttl_s * 1000),
        error_ttl_ms=round(dataset.error_ttl_s * 1000),
        # No client configured is the legacy set-up, not a lock error: nothing to coordinate.
        cache_fill=None if commands is None else dataset.fill_in_force,
        redis_ok=commands is not None and not breaker_open and not unreachable,
        redis_error=None if error is None else type(error).__name__,
        block_limit_ms=None if commands is None else commands.socket_timeout_ms,
        codec=snapshot.values.codec,
        stamp=snapshot.generations.stamp(),
        floor=snapshot.marks.top,
        unstamped_ok=not snapshot.marks.explicit,
        **extra,
    )


class Refresh:
    """One refresh of a value served stale (or early), run by a worker, a task or the caller."""

    def __init__(  # noqa: PLR0917  # one call site
        self,
        snapshot: Snapshot,
        key: str,
        commands: Commands,
        fetch: Callable[[], Any],
        trigger: str,
        seen: Header,
        stale_age_ms: float,
        caller: contextvars.Context | None,
    ) -> None:
        self.snapshot, self.key, self.commands, self.fetch = snapshot, key, commands, fetch
        self.trigger, self.seen, self.stale_age_ms = trigger, seen, stale_age_ms
        #: The context of the caller that handed this refresh off, for the refresh's scope.
        self.caller = caller
        self.local_at = snapshot.generations.local  # as for a Miss
        self.plan = plan_for(snapshot, key, commands, None)

    def steps(self) -> Steps:
        """The refresh's steps (:func:`memofill.coordinator.refresh`), for a driver to run."""
        return refresh(self.plan, self.seen.fetch_start_ms)

    def run_sync(self) -> Result:
        """Run the refresh with the blocking client, and record it."""
        driven = self.commands, self.fetch, self.snapshot.breaker
        return refresh_all_sync([self], lambda fills: [run_sync(fills[0], *driven)])[0]

    async def run_async(self) -> Result:
        """Run the refresh with the asyncio client, and record it."""
        driven = self.commands, self.fetch, self.snapshot.breaker

        async def drive(fills: list[Steps]) -> list[Result]:
            return [await run_async(fills[0], *driven)]

        return (await refresh_all_async([self], drive))[0]

    def record(self, result: Result, started: float) -> Result:
        """Count and log the refresh, keep its value for outages, and set the busy memo."""
        snapshot, policy, outcome = self.snapshot, self.plan.cache_fill, result.outcome
        busy_s = 0.0
        retry_ms = snapshot.dataset.refresh_retry_ms
        if policy is not None and outcome is Outcome.REFRESH_ERROR:
            busy_s = retry_ms / 1000  # the lock is held that long
        elif policy is not None and outcome in (Outcome.REFRESH_BUSY, Outcome.REFRESH_LOCK_ERROR):
            # Free by the end of a lease, or of a hold after a failure, whichever comes first.
            busy_s = min(policy.lease_ms, retry_ms) / 1000
        snapshot.counters.add(snapshot.key, outcome.value)
        record = RefreshRecord(
            outcome=outcome,
            dataset=snapshot.key,
            redis_key=self.key,
            trigger=self.trigger,
            stale_age_ms=self.stale_age_ms,
            delta_ms=result.delta_ms,
            elapsed_ms=(time.monotonic() - started) * 1000,
            error=result.error,
        )
        record.emit()
        snapshot.metrics.refreshed(record)
        overtaken = snapshot.generations.local != self.local_at
        if outcome is Outcome.REFRESH_FILL and result.stored is not None and not overtaken:
            snapshot.local_store.put(self.key, result.stored, snapshot.outage_s)
        if result.unstorable is not None:
            warn_unstorable(snapshot, self.key, result)
        # Last: whoever waits for no refresh in flight then sees it counted and logged.
        snapshot.refreshes.done(self.key, busy_s, self.seen.fetch_start_ms)
        return result


def refresh_all_sync(
    jobs: list[Refresh], drive: Callable[[list[Steps]], list[Result]]
) -> list[Result]:
    """Run the refreshes of one caller (one value, or a ``many()`` page's stale values) with
    ``drive``, which runs their steps; each recorded, in the scope of the caller that handed
    them off. A refresh cut short is no longer in flight."""
    with _refreshing(jobs) as started:
        results = drive([job.steps() for job in jobs])
        return [job.record(result, started) for job, result in zip(jobs, results, strict=True)]


async def refresh_all_async(
    jobs: list[Refresh], drive: Callable[[list[Steps]], Awaitable[list[Result]]]
) -> list[Result]:
    """:func:`refresh_all_sync` with the asyncio client (cancelled: each released its lock)."""
    with _refreshing(jobs) as started:
        results = await drive([job.steps() for job in jobs])
        return [job.record(result, started) for job, result in zip(jobs, results, strict=True)]


@contextlib.contextmanager
def _refreshing(jobs: list[Refresh]) -> Iterator[float]:
    """The refresh scope of ``jobs``, and when they started; cut short, none is in flight."""
    first = jobs[0]
    with first.snapshot.metrics.events.refresh_scope(first.snapshot.key, first.caller):
        try:
            yield time.monotonic()
        except BaseException:
            for job in jobs:
                job.snapshot.refreshes.done(job.key)
            raise


class Miss:
    """One caller's miss: the fill it runs or joins, and how it is logged.

    Everything here is shared by sync and asyncio callers; only the two lines
    that run the fill differ (:meth:`run_sync`, :meth:`run_async`).
    """

    def __init__(  # noqa: PLR0917  # one call site per lookup, the lookup's own locals
        self,
        snapshot: Snapshot,
        key: str,
        started: float,
        commands: Commands | None,
        error: Exception | None,
        wrapped: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        refresh: bool = False,
        stale: bytes | None = None,
        behind: str | None = None,
    ) -> None:
        self.snapshot, self.key, self.started, self.commands = snapshot, key, started, commands
        #: Which marks put the value this caller read behind (its record tells it), if any.
        self.behind = behind
        #: This process's ``invalidate()`` count when the miss began: a fill that an
        #: invalidation here overtook keeps no copy for outages.
        self.local_at = snapshot.generations.local
        # ``wrapped`` is None for a direct call: the decorated function, as it is now.
        function = snapshot.current_function() if wrapped is None else wrapped
        #: How long this caller's call of the origin took, once it made one (see _timed).
        self.fetch_ms: float | None = None
        timer = _timed_async if snapshot.is_async else _timed
        self.fetch = timer(self, function, args, kwargs)
        if commands is None:
            warn_no_client(snapshot)
        elif snapshot.generations.unread is not None:
            tell_unread(snapshot)  # this dataset's callers may never be the ones that read
        timed = snapshot.late is not None
        self.plan = plan_for(
            snapshot,
            key,
            commands,
            error,
            refresh=refresh,
            stale=stale,
            # A value read under the key must be fresher than now to end this fill.
            fresh_after_ms=round(wall_clock() * 1000) if timed else 0,
            hold_on_error=timed and not refresh,
        )

    def steps(self) -> Steps:
        """The fill's steps (:func:`~memofill.coordinator.fill`), judged by the marks known now."""
        return fill(self._current_plan(), time.monotonic, _rng)

    def run_sync(self, flight: Flight) -> Result:
        """Run the fill with the blocking client; end its ``flight`` and record it."""
        steps = self.steps()
        with self.snapshot.metrics.events.fill_scope(self.snapshot.key):
            result = run_sync(steps, self.commands, self.fetch, self._breaker(), flight.commit)
            flight.refill = not self._ended_sync(result, flight)
            return result

    async def run_async(self, flight: Flight) -> Result:
        """Run the fill with the asyncio client; end its ``flight`` and record it."""
        steps = self.steps()
        breaker = self._breaker()
        with self.snapshot.metrics.events.fill_scope(self.snapshot.key):
            result = await run_async(steps, self.commands, self.fetch, breaker, flight.commit)
            flight.refill = not await self._ended_async(result, flight)
            return result

    def _current_plan(self) -> Plan:
        """The plan, judged by the marks as they are now.

        A joiner that fills on its own after the fill it joined (``refill``) may
        know newer marks than when its call began: the value that fill wrote is
        behind them, and its recheck must not take it.
        """
        marks, plan = self.snapshot.marks, self.plan
        if plan.floor == marks.top:
            return plan
        self.plan = attrs.evolve(
            plan,
            floor=marks.top,
            unstamped_ok=not marks.explicit,
            stamp=self.snapshot.generations.stamp(),
        )
        return self.plan

    def _breaker(self) -> Breaker:
        return self.snapshot.breaker

    def ended(self, result: Result) -> Result:
        """Record a fill that ran with no flight of its own (a bulk call's, driven in lockstep)."""
        return self._record(result)

    def _record(self, result: Result, joined: bool = False, served: int = 0) -> Result:
        """Count one caller's miss; log a fill's, with the ``served`` joiners that shared it.

        A fill is recorded where it runs, inside its scopes, once its flight is closed:
        an asyncio caller that started it may be cancelled while it runs on, and
        the fill, which called the origin, must still be logged exactly once. A
        joiner (``joined``) is counted, observed and sent to the hooks, not logged:
        its fill's record says how many shared it. A fill's own record also keeps
        the value for outages.
        """
        snapshot = self.snapshot
        outcome = Outcome.LOCAL_JOIN if joined else result.outcome
        snapshot.counters.add(snapshot.key, outcome.value)
        told = snapshot.told_permission
        if snapshot.key not in told and refused_by_acl(result.outcome, result.error):
            told.add(snapshot.key)
            logger.error(
                "Redis refused memofill a command or key for dataset %s (NoPermissionError): "
                "its misses are not coordinated across processes until the ACL user may run "
                "them; grant it: %s",
                snapshot.key,
                acl_rule(snapshot.prefix),
                extra={"dataset": snapshot.key, "redis_key": self.key},
            )
        record = MissRecord(
            outcome=outcome,
            dataset=snapshot.key,
            redis_key=self.key,
            elapsed_ms=(time.monotonic() - self.started) * 1000,
            waited_ms=result.waited_ms,
            polls=0 if joined else result.polls,
            payload_bytes=result.payload_bytes,
            # A joiner whose own read failed tells that: it is why it had no value of its own.
            error=(self.plan.redis_error or result.error) if joined else result.error,
            fetch_ms=self.fetch_ms,
            joined=served,
            behind=self.behind,
        )
        if not joined:
            record.emit()
        snapshot.metrics.miss(record)
        if joined:
            return result
        if result.stored is not None and snapshot.generations.local == self.local_at:
            snapshot.local_store.put(self.key, result.stored, snapshot.outage_s)
        elif result.led and snapshot.near is not None:
            # This fill wrote a marker, or nothing: a near copy of the key is not the answer now.
            snapshot.local_store.invalidate((self.key,))
        if result.unstorable is not None:
            warn_unstorable(snapshot, self.key, result)
        return result

    def _ended_sync(self, result: Result, flight: Flight) -> bool:
        """Close the fill's ``flight``, record the fill; whether its joiners may share ``result``.

        A caller that joined before the fetch began began before any
        invalidation the value predates: it shares whatever the fill got. One
        that joined later may have begun after another process invalidated the
        key while this fill fetched, whose write was then refused, or the key
        deleted after it: the value is shared with the joiners only if it is what
        Redis holds when the fill ends. One ``GET`` tells (a Redis error: shared,
        as in an outage, where the process's own coalescing is what spares the
        origin). A fill whose lock was gone when it released may have outlived
        what Redis knew (a restart without persistence loses the key's tomb):
        the marks are read again too, and a value behind them (the meta hash
        born again after its stamp) is not shared either.
        """
        joiners = flight.close()
        shareable = True
        try:
            verdict = _shareable(result) if joiners and flight.joined_late else True
            if verdict is None and self.commands is not None:
                lost = result.error == LEASE_EXPIRED
                if lost and reread_marks_sync(self.snapshot, self.commands):
                    shareable = self._above_marks(result.stored)
                shareable = shareable and self.commands.get(self.key) == result.stored
            else:
                shareable = verdict is not False
        except Exception:  # Redis failing: see the docstring
            shareable = True
        finally:
            self._record(result, served=joiners if shareable else 0)
        return shareable

    async def _ended_async(self, result: Result, flight: Flight) -> bool:
        """:meth:`_ended_sync` on the asyncio client."""
        joiners = flight.close()
        shareable = True
        try:
            verdict = _shareable(result) if joiners and flight.joined_late else True
            if verdict is None and self.commands is not None:
                lost = result.error == LEASE_EXPIRED
                if lost and await reread_marks_async(self.snapshot, self.commands):
                    shareable = self._above_marks(result.stored)
                shareable = shareable and await self.commands.get(self.key) == result.stored
            else:
                shareable = verdict is not False
        except Exception:  # Redis failing: see _ended_sync
            shareable = True
        finally:
            self._record(result, served=joiners if shareable else 0)
        return shareable

    def _above_marks(self, stored: bytes | None) -> bool:
        """Whether ``stored`` is current by the dataset's marks as just read."""
        header = None if stored is None else read_header(stored)
        stamp = None if header is None else header.stamp
        return stored is None or self.snapshot.marks.behind(stamp, False) is None

    def finish(self, result: Result, joined: bool) -> CallResult[Any]:
        """This caller's result: a joiner is logged as one; the value, or raise.

        A joiner gets its own copy, decoded from the bytes the fill stored, so
        that no caller can change what another holds; a value that could not be
        stored is the one object every joiner shares.
        """
        if joined:
            self._record(result, joined=True)
        value = result.unwrap()
        if joined and result.stored is not None:
            copy = decode_stored(self.snapshot.values.codec, result.stored)
            value = value if copy is CORRUPT else copy
        outcome = Outcome.LOCAL_JOIN if joined else result.outcome
        return CallResult(value, outcome.value, result.led and not joined)


def _shareable(result: Result) -> bool | None:
    """Whether joiners may share ``result`` as it is, or ``None``: ask Redis.

    A write Redis refused for an invalidation is never shared. Only
    a value this caller fetched and wrote without an error needs asking (where
    Redis failed, the process's coalescing spares the origin): a value read from Redis
    (a follower's, a recheck's) was current when it was read, after every joiner
    had joined.
    """
    if result.error in REFUSALS:
        # Refused for a tomb (or one that may have gone): the key was invalidated meanwhile.
        # "newer" is checked after the tomb: a later fill, and no invalidation since.
        return result.error == "newer"
    if not result.led or result.stored is None or result.outcome is Outcome.LEADER_RECHECK_HIT:
        return True
    # The lock was lost: Redis may have lost the key's tomb and the marks with it. Ask.
    if result.error == LEASE_EXPIRED:
        return None
    # Redis failed on the way (the write may not have landed): shared, as in an outage.
    return True if result.error is not None else None


def _timed(
    miss: Miss, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], Any]:
    """The fetch, ``function(*args, **kwargs)``: its time is kept in ``miss.fetch_ms``."""

    def fetch() -> Any:
        started = time.monotonic()
        try:
            return function(*args, **kwargs)
        finally:
            miss.fetch_ms = (time.monotonic() - started) * 1000

    return fetch


def _timed_async(
    miss: Miss, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], Any]:
    """:func:`_timed` for a coroutine function: the time until its awaitable is done."""

    async def fetch() -> Any:
        started = time.monotonic()
        try:
            return await function(*args, **kwargs)
        finally:
            miss.fetch_ms = (time.monotonic() - started) * 1000

    return fetch


def warn_unstorable(snapshot: Snapshot, key: str, result: Result) -> None:
    """Say once per dataset and instance that its values are never stored, and how to fix it."""
    warned = snapshot.unstorable_warned
    if snapshot.key in warned:
        return
    warned.add(snapshot.key)
    logger.warning(
        "dataset %s: a %s value cannot be stored (%s), so every call fetches; annotate the "
        "function's return type, pass codec= to cached_dataset, or return JSON data",
        snapshot.key,
        type(result.value).__qualname__,
        result.unstorable,
        extra={"dataset": snapshot.key, "redis_key": key, "unstorable": result.unstorable},
    )


def refresh_sync(snapshot: Snapshot, instance: Any, wrapped: Any, args: Any, kwargs: Any) -> Any:
    """:meth:`CachedDataset.refresh` of a sync function: the miss's fill, told not to reuse."""
    commands = snapshot.gate() if snapshot.gated else snapshot.commands
    if commands is BYPASS:
        return bypass(snapshot, wrapped, args, kwargs, False)
    started = time.monotonic()
    key = snapshot.key_of(instance, args, kwargs)
    if started > snapshot.generations.next_check and commands is not None:
        read_marks_sync(snapshot, commands, started)  # what ends its fill is judged by them
    miss = Miss(snapshot, key, started, commands, None, wrapped, args, kwargs, refresh=True)
    # Not joined with a plain miss in flight, which may end with the value it found.
    name = _REFRESH + flight(snapshot, key)
    result, joined = snapshot.thread_flights.run(name, miss.run_sync)
    return miss.finish(result, joined).value


async def refresh_async(
    snapshot: Snapshot, instance: Any, wrapped: Any, args: Any, kwargs: Any
) -> Any:
    """:func:`refresh_sync` for coroutine functions, on the asyncio client."""
    commands = snapshot.gate() if snapshot.gated else snapshot.commands
    if commands is BYPASS:
        return await bypass(snapshot, wrapped, args, kwargs, False)
    started = time.monotonic()
    key = snapshot.key_of(instance, args, kwargs)
    if started > snapshot.generations.next_check and commands is not None:
        await asyncio.shield(read_marks_async(snapshot, commands, started))
    miss = Miss(snapshot, key, started, commands, None, wrapped, args, kwargs, refresh=True)
    name = _REFRESH + flight(snapshot, key)
    result, joined = await snapshot.task_flights.run(name, miss.run_async)
    return miss.finish(result, joined).value


def flight(snapshot: Snapshot, key: str) -> str:
    """The process-local flight a miss of ``key`` joins: one per mark and local invalidation.

    A caller that knows of a dataset invalidation, or that starts after this
    process invalidated a key, must not join a fill that began before it, whose
    value it would then be served.
    """
    return f"{key}\0{snapshot.marks.top}\0{snapshot.generations.local}"


#: Prefixes a refresh's key in the process-local flights, apart from the misses'.
_REFRESH = "refresh\0"


def raise_if_cancel_was_lost() -> None:
    """Raise the cancellation a Redis reply swallowed, before a miss joins a fill.

    redis-py's asyncio client, cancelled while the reply of its command is
    already waiting (a busy event loop), returns the reply and drops the
    ``CancelledError``; the task is still marked as being cancelled. The caller
    would then join the fill and wait for it, so an ``asyncio.timeout`` or
    ``wait_for`` around the call would not end when it should. Checked on the
    miss path only (a hit returns at once anyway), from Python 3.11, which
    counts cancellation requests. A miss made while the task handles its own
    cancellation (in an ``except CancelledError`` block) is refused the same way.
    """
    task = asyncio.current_task()
    if task is not None and sys.version_info >= (3, 11) and task.cancelling():
        raise asyncio.CancelledError
