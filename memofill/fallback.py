"""What one process does while Redis is unreachable: remember recent values, and stop knocking.

Two small pieces, both process-local and thread-safe:

* :class:`LocalStore` keeps the values this process recently read or wrote,
  as their stored bytes (never an object a caller holds, so no caller can
  change what the next one is served), each for at most 30 s, within a budget
  of bytes and of entries (oldest dropped first), so a warm process keeps
  serving them while Redis is down instead of sending every caller to the
  upstream, and a process that reads many large values does not grow with them.
* :class:`Breaker` remembers that Redis just failed to connect (or timed out
  several times in a row), and for a short cool-down sends calls straight to
  the local path: a paused Redis would otherwise cost every caller a full
  socket time-out.

Both survive a ``fork()`` (a pre-forking server, ``multiprocessing``): the
child gets fresh locks and a closed breaker, and keeps the values.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from memofill.outcomes import Tally

logger = logging.getLogger("memofill")

#: The longest a value is served locally without Redis, whatever the dataset's TTL.
MAX_LOCAL_TTL_S = 30.0
#: The most values one process keeps for when Redis is down.
MAX_LOCAL_ENTRIES = 5000
#: The most bytes of values one process keeps for when Redis is down. Several worker
#: processes with this much fit a container of a few hundred MB with room to spare; a
#: value over a quarter of it is not kept.
MAX_LOCAL_BYTES = 32 * 1024 * 1024
#: What an entry costs beyond its key and its bytes: the dict slot, the tuple, two floats.
ENTRY_OVERHEAD_BYTES = 200
#: Evictions are told at most this often, with their count since the last time.
EVICTION_LOG_INTERVAL_S = 60.0
#: How often a hit refreshes the locally kept copy of its value, at most.
REFRESH_S = 1.0

_MISSING: Any = object()


class LocalStore:
    """A map of final key -> (expiry, stored bytes), bounded in bytes and entries.

    When a new entry would pass either bound, the oldest entries are dropped
    first (a dict keeps insertion order, and :meth:`put` re-inserts). Each
    eviction is counted (:attr:`evictions`, ``evicted_bytes``) and told on
    the ``memofill`` logger at INFO, at most once a minute. A value larger than
    a quarter of the byte budget is not kept at all (:attr:`too_large`): one
    huge value would otherwise push out every other. The hit path reads
    :attr:`entries` without the lock and calls :meth:`put` at most once a
    second per key, so the bookkeeping stays off the hit.
    """

    def __init__(
        self,
        max_entries: int = MAX_LOCAL_ENTRIES,
        max_ttl_s: float = MAX_LOCAL_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = MAX_LOCAL_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_ttl_s = max_ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        #: key -> (expires, value, refresh after), in clock seconds. Read it freely (the
        #: hit path checks "refresh after" itself); change it through the methods.
        self.entries: dict[str, tuple[float, Any, float]] = {}
        #: What the entries cost, by :func:`entry_bytes`.
        self.bytes = 0
        #: Entries dropped to make room since the store was made.
        self.evictions = 0
        #: What those entries cost, by :func:`entry_bytes`.
        self.evicted_bytes = 0
        #: Values not kept because they alone were over a quarter of ``max_bytes``.
        self.too_large = 0
        self._told_evictions = 0
        self._told_at = -EVICTION_LOG_INTERVAL_S
        self._lock = threading.Lock()
        _live_stores.add(self)

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Remember ``value`` (a value's stored bytes) for ``min(ttl_s, max_ttl_s)`` seconds."""
        now = self._clock()
        expires = now + min(ttl_s, self.max_ttl_s)
        size = entry_bytes(key, value)
        with self._lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= entry_bytes(key, old[1])
            if size > self.max_bytes // 4:
                self.too_large += 1
                return
            self.entries[key] = (expires, value, now + REFRESH_S)
            self.bytes += size
            while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
                oldest = next(iter(self.entries))
                dropped = entry_bytes(oldest, self.entries.pop(oldest)[1])
                self.bytes -= dropped
                self.evictions += 1
                self.evicted_bytes += dropped
            if self.evictions > self._told_evictions and now - self._told_at >= (
                EVICTION_LOG_INTERVAL_S
            ):
                self._tell_evictions(now)

    def _tell_evictions(self, now: float) -> None:
        logger.info(
            "outage store full (%d entries, %d of %d bytes): %d older entries dropped since "
            "the last report; values kept for Redis outages are bounded by max_bytes",
            len(self.entries),
            self.bytes,
            self.max_bytes,
            self.evictions - self._told_evictions,
            extra={"evictions": self.evictions, "evicted_bytes": self.evicted_bytes},
        )
        self._told_evictions, self._told_at = self.evictions, now

    def remember(self, key: str, value: bytes, ttl_s: float) -> None:
        """:meth:`put` from the hit path: skipped while the kept copy is under a second old.

        Every hit would otherwise take the lock and reorder the map; a copy at
        most :data:`REFRESH_S` older than the last hit serves an outage as well.
        """
        entry = self.entries.get(key)
        if entry is None or entry[2] <= self._clock():
            self.put(key, value, ttl_s)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The remembered value, or ``default`` when there is none or it has expired."""
        entry = self.entries.get(key)
        if entry is None or entry[0] <= self._clock():
            return default
        return entry[1]

    def discard(self, key: str) -> None:
        """Forget ``key`` (after an invalidation)."""
        with self._lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= entry_bytes(key, old[1])

    def __len__(self) -> int:
        return len(self.entries)


def entry_bytes(key: str, value: bytes) -> int:
    """What one kept entry costs against the byte budget."""
    return len(key) + len(value) + ENTRY_OVERHEAD_BYTES


#: How many time-outs in a row (no reply between them, each within the cool-down of the
#: last) open the breaker. One slow reply says little: a busy event loop or CPU delays
#: replies from a healthy Redis; a stalled Redis times out every caller.
TIMEOUTS_TO_OPEN = 3


class Breaker:
    """Open for ``cooldown_s`` once Redis is shown unreachable; while open, calls skip Redis.

    Evidence, not one bad moment, opens it: a connection refused, reset or
    not made (:meth:`failed` with ``timed_out=False``) opens it at once;
    time-outs open it when :data:`TIMEOUTS_TO_OPEN` come in a row, each within
    ``cooldown_s`` of the one before, with no reply between them
    (:meth:`answered`). A command Redis answers with an error (no permission,
    out of memory) says Redis is up and is not reported at all. The breaker is
    process-wide, so one slow reply opening it would send the misses of every
    dataset to their origins for the cool-down.
    """

    def __init__(
        self, cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cooldown_s = cooldown_s
        self._clock = clock
        #: When the cool-down ends (monotonic seconds); ``0.0`` while closed, so the hit
        #: path tests one float before it reads the clock.
        self.open_until = 0.0
        #: Time-outs in a row, and when the last one was.
        self.timeouts = 0
        self._last_timeout = 0.0
        #: How many times it opened (exported as ``memofill_breaker_trips_total``).
        self.trips = Tally()
        _live_breakers.add(self)

    @property
    def is_open(self) -> bool:
        """Whether calls should skip Redis right now."""
        return self.open_until > self._clock()

    def trip(self) -> None:
        """Redis is unreachable: skip it for the cool-down."""
        self.open_until = self._clock() + self.cooldown_s
        self.timeouts = 0
        self.trips.add()

    def failed(self, *, timed_out: bool) -> None:
        """Redis failed to answer a command: open now, or on the last of a few time-outs."""
        if not timed_out:
            self.trip()
            return
        now = self._clock()
        in_a_row = self.timeouts and now - self._last_timeout <= self.cooldown_s
        self.timeouts = self.timeouts + 1 if in_a_row else 1
        self._last_timeout = now
        if self.timeouts >= TIMEOUTS_TO_OPEN:
            self.trip()

    def answered(self) -> None:
        """Redis replied to a command: the time-outs before it were not in a row."""
        if self.timeouts:
            self.timeouts = 0

    def reset(self) -> None:
        """Redis answered: use it again."""
        self.open_until = 0.0
        self.timeouts = 0


_live_stores: weakref.WeakSet[LocalStore] = weakref.WeakSet()
_live_breakers: weakref.WeakSet[Breaker] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child starts with a closed breaker and unheld locks; kept values stay.

    The parent's threads do not exist in the child, so a lock one of them held
    at the fork would never be released; the stored bytes are plain data and
    still serve outages. The parent's breaker state says nothing of the child's
    connections, which are new.
    """
    for store in list(_live_stores):
        store._lock = threading.Lock()
    for breaker in list(_live_breakers):
        breaker.reset()
        breaker.trips = Tally()  # counted per process, as the outcomes are


os.register_at_fork(after_in_child=_after_fork_in_child)
