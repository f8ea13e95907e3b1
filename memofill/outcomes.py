"""What happened on each miss: the closed outcome vocabulary, one log record per miss, counters.

memofill logs on the ``memofill`` logger and installs no handler: the
application decides where records go. Every miss emits exactly one record whose
fields are record attributes (``record.outcome``, ``record.dataset``...), so a
JSON formatter or structlog picks them up without parsing the message. Hits are
only counted: logging them would cost more than the hit itself.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import threading
import weakref
from collections import Counter
from typing import Any, Generic, TypeVar

import attrs

from memofill.repeats import REPEATS

logger = logging.getLogger("memofill")


class Outcome(str, enum.Enum):
    """How one caller's miss ended."""

    #: This caller held the lock, fetched, and wrote the value.
    LEADER_FILL = "leader_fill"
    #: A ``refresh()`` call (a warm-up, an admin's refresh) held the lock, fetched, and
    #: wrote the value over whatever was there. Not a miss; a refresh that ended otherwise
    #: has that ending's outcome (``fetch_error``...).
    FORCED_FILL = "forced_fill"
    #: This caller took the lock, but the recheck found a value another leader had just written.
    LEADER_RECHECK_HIT = "leader_recheck_hit"
    #: Another process held the lock; the value appeared in Redis while this caller waited.
    FOLLOWER_HIT = "follower_hit"
    #: The value did not appear within ``wait_ms``; this caller fetched uncoordinated.
    FOLLOWER_TIMEOUT = "follower_timeout"
    #: Redis failed in the lock path; the caller fell back to process-local singleflight.
    LOCK_ERROR = "lock_error"
    #: The dataset has no fill policy, or there is no Redis; process-local singleflight only.
    LEGACY = "legacy"
    #: Another caller in this process was already filling the key; this one shared its result.
    LOCAL_JOIN = "local_join"
    #: The fetch raised (here, or in the leader this caller waited on).
    FETCH_ERROR = "fetch_error"
    #: The fetch returned ``None``; a negative marker now stands for it.
    NEGATIVE = "negative"
    #: The fill failed past ``stale_s`` but within ``stale_if_error_s``, and the caller got
    #: the stale value instead of the error.
    STALE_ON_ERROR = "stale_on_error"
    #: This caller led the fill and got its value, and Redis refused to store it. Since
    #: its fetch began, the key was invalidated (``error=invalidated``), a later fill wrote
    #: it (``newer``), or longer ago than a tomb lives (``old``). Nothing stale was written.
    #: (A fill without the lock whose write is refused keeps its outcome, such as
    #: ``follower_timeout``, with the same ``error``.)
    FILL_REFUSED = "fill_refused"

    # One refresh of a value that went stale (or was due early), run beside the callers
    # that were served it; one record each, except the two counted only.

    #: The refresh fetched and stored a fresh value.
    REFRESH_FILL = "refresh_fill"
    #: The refresh's fetch returned ``None``; the negative marker replaces the value.
    REFRESH_NEGATIVE = "refresh_negative"
    #: The recheck made with the lock found a value fetched after the stale one (nothing to do).
    REFRESH_RECHECK_HIT = "refresh_recheck_hit"
    #: The refresh fetched, but Redis refused its write, as for ``fill_refused``.
    REFRESH_REFUSED = "refresh_refused"
    #: The refresh's fetch raised. The stale value stays, and the lock is held for
    #: ``refresh_retry_ms`` so that no process retries before then.
    REFRESH_ERROR = "refresh_error"
    #: Redis failed during the refresh. The stale value stays, and nothing was fetched.
    REFRESH_LOCK_ERROR = "refresh_lock_error"
    #: Another process holds the lock (refreshing, or holding after a failure). Counted only.
    REFRESH_BUSY = "refresh_busy"
    #: The refresh pool's queue was full, so this refresh was skipped. Counted only.
    REFRESH_DROPPED = "refresh_dropped"


#: Outcomes that mean something went wrong, logged at WARNING; the rest at INFO.
WARNING_OUTCOMES = frozenset(
    {
        Outcome.FOLLOWER_TIMEOUT,
        Outcome.LOCK_ERROR,
        Outcome.FETCH_ERROR,
        Outcome.STALE_ON_ERROR,
        Outcome.REFRESH_ERROR,
        Outcome.REFRESH_LOCK_ERROR,
    }
)
#: Refresh outcomes that are counted and never logged.
UNLOGGED_REFRESHES = frozenset({Outcome.REFRESH_BUSY, Outcome.REFRESH_DROPPED})
#: The ``error`` of a miss that Redis refused a command or key (an ACL): a configuration
#: mistake, logged once at ERROR with its fix, so its misses are logged at INFO.
PERMISSION_ERROR = "NoPermissionError"


def refused_by_acl(outcome: Outcome, error: str | None) -> bool:
    """Whether Redis refused this miss a command or key (not the fetch raising that error)."""
    return error == PERMISSION_ERROR and outcome is not Outcome.FETCH_ERROR


@attrs.frozen
class MissRecord:
    """The fields of one miss record, as they appear on the log record."""

    outcome: Outcome
    dataset: str
    redis_key: str
    elapsed_ms: float
    waited_ms: float = 0.0
    polls: int = 0
    payload_bytes: int = 0
    error: str | None = None
    #: How long the origin took, when this caller called it (``None``: it did not).
    fetch_ms: float | None = None
    #: The other callers in this process that shared this fill's result. Their own
    #: ``local_join`` records are counted and sent to hooks, not logged; the ``error`` of
    #: one is its own read's failure (Redis unreachable, say) where it had one, else the
    #: fill's.
    joined: int = 0
    #: The value this caller read was behind marks, which: ``"dataset"`` (its dataset was
    #: invalidated, or its marks born again) or ``"tags"`` (one of its tags was); ``None``
    #: when nothing was there, or its own clock expired it.
    behind: str | None = None

    def emit(self) -> None:
        """Log this record on the ``memofill`` logger (never the payload, only its size)."""
        warn = self.outcome in WARNING_OUTCOMES and not refused_by_acl(self.outcome, self.error)
        level = logging.WARNING if warn else logging.INFO
        if not logger.isEnabledFor(level):
            return
        fields = attrs.asdict(self)
        fields["outcome"] = self.outcome.value
        if warn and not REPEATS.admit(level, fields):
            return
        message = (
            "%s %s elapsed_ms=%.1f waited_ms=%.1f polls=%d payload_bytes=%d error=%s joined=%d"
        )
        args: tuple[Any, ...] = (
            self.outcome.value,
            self.redis_key,
            self.elapsed_ms,
            self.waited_ms,
            self.polls,
            self.payload_bytes,
            self.error,
            self.joined,
        )
        if self.behind is not None:
            message, args = message + " behind=%s", (*args, self.behind)
        logger.log(level, message, *args, extra=fields)


@attrs.frozen
class RefreshRecord:
    """The fields of one refresh record, as they appear on the log record.

    ``trigger`` is ``stale`` (a read found the value past its soft deadline)
    or ``early`` (the XFetch draw on a fresh read fired);
    ``stale_age_ms`` how far past its soft deadline the value was when the
    refresh was handed off (negative for an early one: how long before);
    ``delta_ms`` how long this refresh's fetch took (0 when it fetched nothing).
    """

    outcome: Outcome
    dataset: str
    redis_key: str
    trigger: str
    stale_age_ms: float
    delta_ms: int
    elapsed_ms: float
    error: str | None = None

    def emit(self) -> None:
        """Log this record on the ``memofill`` logger: WARNING for a failure, else INFO."""
        if self.outcome in UNLOGGED_REFRESHES:
            return
        warn = self.outcome in WARNING_OUTCOMES
        level = logging.WARNING if warn else logging.INFO
        if not logger.isEnabledFor(level):
            return
        fields = attrs.asdict(self)
        fields["outcome"] = self.outcome.value
        if warn and not REPEATS.admit(level, fields):
            return
        logger.log(
            level,
            "%s %s trigger=%s stale_age_ms=%.1f delta_ms=%d elapsed_ms=%.1f error=%s",
            self.outcome.value,
            self.redis_key,
            self.trigger,
            self.stale_age_ms,
            self.delta_ms,
            self.elapsed_ms,
            self.error,
            extra=fields,
        )


#: The counter name for hits; outcomes use their own values.
HIT = "hit"
#: A value past its soft deadline, within ``stale_s``, served at once while one caller
#: refreshes it. Counted, never logged, and never counted as a hit.
STALE_HIT = "stale_hit"
#: Served from the process-local fallback while Redis was unreachable.
FALLBACK_HIT = "fallback_hit"
#: Served from the process's near copy, without asking Redis (datasets with ``near_ms``).
#: Counted, never logged, like a hit.
NEAR_HIT = "near_hit"
#: Caching was off (``MEMOFILL_DISABLED``, ``memofill.disabled()``): the function was called
#: directly. Counted, never logged, like a hit.
DISABLED = "disabled"
#: The names counted but never logged, beside the miss outcomes. Each is an ``outcome`` of
#: ``memofill_calls_total`` (:mod:`memofill.metrics`).
COUNTED_ONLY: tuple[str, ...] = (HIT, STALE_HIT, NEAR_HIT, FALLBACK_HIT, DISABLED)
#: The names counted on a hit path, on lock-free tallies rather than under a lock.
_TALLIED = frozenset({HIT, STALE_HIT, NEAR_HIT})


#: What the hit path's readers return for anything that is not a value to serve now
#: (``None`` is a value: a cached ``None``).
NOT_A_HIT: Any = object()


#: The type of a :class:`CallResult`'s value: what the decorated function returns.
T = TypeVar("T")


@attrs.frozen
class CallResult(Generic[T]):
    """A value with how it was obtained: ``hit``, ``fallback_hit``, or a miss :class:`Outcome`.

    Generic in the value's type, so that a type checker knows what
    ``call_with_outcome(...).value`` is: ``CallResult[R]`` for a function returning ``R``.
    """

    value: T
    outcome: str
    led: bool


class Tally:
    """An exact count that a thread adds to without taking a lock.

    ``add`` is ``itertools.count().__next__``: one C call, which the
    interpreter never interrupts halfway, so concurrent adds are never lost.
    Reading takes one tick from the same sequence and subtracts the ticks that
    were not adds (earlier reads, and every tick before the last reset), so a
    read is exact too and never races an add.
    """

    __slots__ = ("_lock", "_not_adds", "_ticks", "add")

    def __init__(self) -> None:
        self._ticks = itertools.count()
        self.add = self._ticks.__next__
        self._not_adds = 0
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        """How many times ``add`` was called since it was made or last reset."""
        with self._lock:
            value = next(self._ticks) - self._not_adds
            self._not_adds += 1
        return value

    def reset(self) -> None:
        """Count from zero again; holders of ``add`` keep adding to this tally."""
        with self._lock:
            self._not_adds = next(self._ticks) + 1


class Counters:
    """Per-dataset counts of hits and miss outcomes, readable in-process.

    Thread-safe and exact. Hits and near hits, the hot paths, go to a lock-free
    :class:`Tally` per dataset; misses, which already cost Redis round trips,
    take a lock.
    """

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        #: Tallies of the names counted on a hit path (see :data:`_TALLIED`), by (dataset, name).
        self._hits: dict[tuple[str, str], Tally] = {}
        self._lock = threading.Lock()
        _live_counters.add(self)

    def add(self, dataset: str, name: str) -> None:
        """Count one ``name``: an outcome value, :data:`HIT`, :data:`FALLBACK_HIT`, ``disabled``."""
        if name in _TALLIED:
            self.tally(dataset, name).add()
            return
        with self._lock:
            self._counts[dataset, name] += 1

    def hit_tally(self, dataset: str) -> Tally:
        """The tally of ``dataset``'s hits, made on first use; callers keep it and add to it."""
        return self.tally(dataset, HIT)

    def tally(self, dataset: str, name: str) -> Tally:
        """The lock-free tally of one of the names counted on a hit path, made on first use."""
        tally = self._hits.get((dataset, name))
        if tally is None:
            with self._lock:
                tally = self._hits.setdefault((dataset, name), Tally())
        return tally

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{dataset: {name: count}}`` for everything counted so far."""
        with self._lock:
            items = list(self._counts.items())
            tallies = list(self._hits.items())
        items.extend((counted, tally.value) for counted, tally in tallies)
        result: dict[str, dict[str, int]] = {}
        for (dataset, name), count in sorted(items):
            if count:
                result.setdefault(dataset, {})[name] = count
        return result

    def reset(self) -> None:
        """Forget every count (tests and benchmarks start from zero)."""
        with self._lock:
            self._counts.clear()
            tallies = list(self._hits.values())
        for tally in tallies:
            tally.reset()


_live_counters: weakref.WeakSet[Counters] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child counts from zero, with locks no parent thread can be holding.

    Counts are per process: a child that kept the parent's would have them
    counted twice in any sum over the workers of a pre-forking server.
    """
    for counters in list(_live_counters):
        counters._lock = threading.Lock()
        for tally in counters._hits.values():
            tally._lock = threading.Lock()
        counters.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
