"""Small helpers several test modules share."""

from __future__ import annotations

import threading
from typing import Any

import attrs

from memofill import Memofill


def notify_after_acquire(mf: Memofill) -> threading.Event:
    """An event set once ``mf`` has tried to take a lock, so it is past its hit path.

    A test that must have a caller follow (not hit) waits for this before it lets
    the leader finish.
    """
    tried = threading.Event()
    commands: Any = mf._async or mf._sync
    original = commands.acquire
    if mf._async:

        async def acquire_async(*args: Any) -> Any:
            try:
                return await original(*args)
            finally:
                tried.set()

        commands.acquire = acquire_async
    else:

        def acquire(*args: Any) -> Any:
            try:
                return original(*args)
            finally:
                tried.set()

        commands.acquire = acquire
    return tried


class FakeClock:
    """A monotonic clock that moves only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@attrs.frozen
class Refresh:
    """A stand-in for a refresh record: only what metrics and exporters read of one."""

    dataset: str
    trigger: str
    outcome: str
    elapsed_ms: float
    delta_ms: float | None
    stale_age_ms: float | None
