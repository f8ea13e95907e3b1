"""Warnings that repeat for one key are logged once, then summed up, so an outage cannot flood.

Rules:

- A warning record (``fetch_error``, ``stale_on_error``, ``lock_error``,
  ``refresh_error``...) whose outcome and Redis key were not logged in the last
  :data:`WINDOW_S` seconds goes out as it is, and opens a window.
- The records of that outcome and key within the window are not logged one by
  one: they are counted, and when the window ends one summary record goes out
  (``repeated``: how many; ``error``: the last one's). Nothing repeated, no
  summary. The next record after a window opens a new one, so a steady flood
  logs two records per key every :data:`WINDOW_S` seconds, whatever its rate.
- Counters, metrics and hooks see every record: only logging is summed up.
- Summaries are written by one daemon thread, started on the first repeat and
  gone once no window is open; what is pending at interpreter exit is written
  then. A forked child starts with no window open.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

logger = logging.getLogger("memofill")

#: How long the repeats of one outcome and key are summed up before they are told.
WINDOW_S = 5.0


class _Window:
    __slots__ = ("fields", "level", "repeated", "until")

    def __init__(self, until: float, level: int) -> None:
        self.until, self.level = until, level
        self.repeated = 0
        #: The last repeat's record fields, which its summary tells.
        self.fields: dict[str, Any] = {}


class Repeats:
    """The open windows of one process; see the module's rules."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def admit(self, level: int, fields: dict[str, Any]) -> bool:
        """Whether this warning is logged now; if not, it is summed up in its window."""
        kind = (fields["outcome"], fields["redis_key"])
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now >= window.until:
                if window is not None and window.repeated:
                    self._tell(kind, window)
                self._windows[kind] = _Window(now + self.window_s, level)
                self._start()
                return True
            window.repeated += 1
            window.fields = fields
            return False

    def flush(self, *, all_of_them: bool = False) -> float | None:
        """Tell the windows that ended (every one, with ``all_of_them``); when the next ends."""
        now = time.monotonic()
        with self._lock:
            for kind, window in list(self._windows.items()):
                if all_of_them or now >= window.until:
                    del self._windows[kind]
                    if window.repeated:
                        self._tell(kind, window)
            if not self._windows:
                return None
            return min(window.until for window in self._windows.values())

    def _tell(self, kind: tuple[str, str], window: _Window) -> None:
        fields = {**window.fields, "repeated": window.repeated, "window_s": self.window_s}
        logger.log(
            window.level,
            "%s %s repeated %d more times in %.0f s (summed up: counters and metrics count "
            "each) error=%s",
            kind[0],
            kind[1],
            window.repeated,
            self.window_s,
            fields.get("error"),
            extra=fields,
        )

    def _start(self) -> None:
        """Start the writer if none runs (called under the lock)."""
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write, name="memofill-log-repeats", daemon=True
            )
            self._writer.start()

    def _write(self) -> None:
        while True:
            next_end = self.flush()
            if next_end is None:
                with self._lock:
                    if not self._windows:  # nothing opened since the flush: the thread ends
                        self._writer = None
                        return
                continue
            time.sleep(max(0.0, next_end - time.monotonic()) + 0.01)

    def forget(self) -> None:
        """In a forked child: no window is open and no writer runs."""
        self._windows = {}
        self._lock = threading.Lock()
        self._writer = None


#: The process's windows, which every warning record goes through.
REPEATS = Repeats()
atexit.register(lambda: REPEATS.flush(all_of_them=True))
os.register_at_fork(after_in_child=REPEATS.forget)
