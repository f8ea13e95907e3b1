"""What one process does while Redis is unreachable: remember recent values, and stop knocking.

Two small pieces, both process-local and thread-safe:

* :class:`LocalStore` keeps the values this process recently read or wrote,
  as their stored bytes (never an object a caller holds, so no caller can
  change what the next one is served),
  each for at most 30 s and at most 5000 of them (oldest dropped first), so a
  warm process keeps serving them while Redis is down instead of sending every
  caller to the upstream.
* :class:`Breaker` remembers that Redis just failed to connect or answer, and
  for a short cool-down sends calls straight to the local path: a paused Redis
  would otherwise cost every caller a full socket time-out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

#: The longest a value is served locally without Redis, whatever the dataset's TTL.
MAX_LOCAL_TTL_S = 30.0
#: The most values one process keeps for when Redis is down.
MAX_LOCAL_ENTRIES = 5000
#: How often a hit refreshes the locally kept copy of its value, at most.
REFRESH_S = 1.0

_MISSING: Any = object()


class LocalStore:
    """A bounded map of final key -> (expiry, stored bytes), evicting the oldest entry first."""

    def __init__(
        self,
        max_entries: int = MAX_LOCAL_ENTRIES,
        max_ttl_s: float = MAX_LOCAL_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_ttl_s = max_ttl_s
        self._clock = clock
        #: key -> (expires, value, refresh after), in clock seconds. Read it freely (the
        #: hit path checks "refresh after" itself); change it through the methods.
        self.entries: dict[str, tuple[float, Any, float]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Remember ``value`` (a value's stored bytes) for ``min(ttl_s, max_ttl_s)`` seconds."""
        now = self._clock()
        expires = now + min(ttl_s, self.max_ttl_s)
        with self._lock:
            self.entries.pop(key, None)
            self.entries[key] = (expires, value, now + REFRESH_S)
            while len(self.entries) > self.max_entries:
                del self.entries[next(iter(self.entries))]

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
            self.entries.pop(key, None)

    def __len__(self) -> int:
        return len(self.entries)


class Breaker:
    """Open for ``cooldown_s`` after a connection failure; while open, calls skip Redis.

    Only failures to reach Redis open it (refused, reset, timed out): a command
    Redis answers with an error (no permission, out of memory) says Redis is up.
    """

    def __init__(
        self, cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cooldown_s = cooldown_s
        self._clock = clock
        #: When the cool-down ends (monotonic seconds); ``0.0`` while closed, so the hit
        #: path tests one float before it reads the clock.
        self.open_until = 0.0

    @property
    def is_open(self) -> bool:
        """Whether calls should skip Redis right now."""
        return self.open_until > self._clock()

    def trip(self) -> None:
        """Redis just failed to answer: skip it for the cool-down."""
        self.open_until = self._clock() + self.cooldown_s

    def reset(self) -> None:
        """Redis answered: use it again."""
        self.open_until = 0.0
