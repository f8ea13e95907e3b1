"""What one process does while Redis is unreachable: remember recent values, and stop knocking.

Two small pieces, both process-local and thread-safe:

* the process's :class:`~memofill.near.LocalStore` (defined beside the near
  cache, whose copies it also keeps, so that no value is kept twice) keeps the
  values this process recently read or wrote, each for as long as it would be
  served from Redis after its fetch began (``ttl_s + stale_if_error_s``) and
  at most 30 s, within a budget of bytes and of entries, so a warm process
  keeps serving them while Redis is down instead of sending every caller to
  the upstream;
* :class:`Breaker` remembers that Redis just failed to connect (or timed out
  several times in a row), and for a short cool-down sends calls straight to
  the local path: a paused Redis would otherwise cost every caller a full
  socket time-out. After a refused or reset connection, which costs a caller
  almost nothing to try again, one call every :data:`PROBE_S` asks Redis
  anyway (the probe), and Redis's answer closes the breaker: once Redis is
  back, its values win over the copies kept for the outage within
  :data:`PROBE_S`, not at the end of the cool-down.

Both survive a ``fork()`` (a pre-forking server, ``multiprocessing``): the
child gets fresh locks and a closed breaker, and keeps the values.

The store's names are exported here too, where they were first defined.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable

from memofill.near import (
    ENTRY_OVERHEAD_BYTES,
    EVICTION_LOG_INTERVAL_S,
    MAX_LOCAL_BYTES,
    MAX_LOCAL_ENTRIES,
    MAX_LOCAL_TTL_S,
    REFRESH_S,
    LocalStore,
    entry_bytes,
)
from memofill.outcomes import Tally

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "EVICTION_LOG_INTERVAL_S",
    "MAX_LOCAL_BYTES",
    "MAX_LOCAL_ENTRIES",
    "MAX_LOCAL_TTL_S",
    "PROBE_S",
    "REFRESH_S",
    "TIMEOUTS_TO_OPEN",
    "Breaker",
    "LocalStore",
    "entry_bytes",
]

#: How many time-outs in a row (no reply between them, each within the cool-down of the
#: last) open the breaker. One slow reply says little: a busy event loop or CPU delays
#: replies from a healthy Redis; a stalled Redis times out every caller.
TIMEOUTS_TO_OPEN = 3
#: After a refused or reset connection, how often one call probes Redis while the breaker
#: is open. Each probe costs its caller a refused connection; after time-outs there is
#: no probe (it would cost a socket time-out): calls skip Redis for the whole cool-down.
PROBE_S = 0.05


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
        #: While open, no probe before this (monotonic seconds; see :meth:`skips`).
        self.probe_at = 0.0
        #: How many times it opened (exported as ``memofill_breaker_trips_total``).
        self.trips = Tally()
        _live_breakers.add(self)

    @property
    def is_open(self) -> bool:
        """Whether calls should skip Redis right now."""
        return self.open_until > self._clock()

    def skips(self) -> bool:
        """Whether a call should skip Redis now: while open, unless it is the probe.

        The first call once :attr:`probe_at` has passed is the probe: it asks
        Redis, and no other call probes before the next failure re-opens the
        breaker (which sets the next probe time) or the cool-down ends. Its
        caller closes the breaker if Redis answers (:meth:`reset`).
        """
        now = self._clock()
        if not self.open_until > now:
            return False
        if now < self.probe_at:
            return True
        self.probe_at = self.open_until  # this call probes: the others wait for its answer
        return False

    def trip(self, *, probe: bool = False) -> None:
        """Redis is unreachable: skip it for the cool-down (probing, with ``probe``)."""
        now = self._clock()
        self.open_until = now + self.cooldown_s
        self.probe_at = now + PROBE_S if probe else self.open_until
        self.timeouts = 0
        self.trips.add()

    def failed(self, *, timed_out: bool) -> None:
        """Redis failed to answer a command: open now, or on the last of a few time-outs.

        A refused or reset connection opens it at once, with probes (see
        :meth:`skips`): trying again costs a caller next to nothing.
        """
        if not timed_out:
            self.trip(probe=True)
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
        self.open_until = self.probe_at = 0.0
        self.timeouts = 0


_live_breakers: weakref.WeakSet[Breaker] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child starts with a closed breaker: the parent's says nothing of its connections."""
    for breaker in list(_live_breakers):
        breaker.reset()
        breaker.trips = Tally()  # counted per process, as the outcomes are


os.register_at_fork(after_in_child=_after_fork_in_child)
