"""Process-local coalescing: one caller per key runs the fill, the others share its result.

The same two-method shape serves threads and asyncio tasks. With tasks, the
fill runs in a task of its own and every caller awaits it through
:func:`asyncio.shield`, so a caller that is cancelled or times out leaves the
shared fill running for the others.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class ThreadFlights(Generic[T]):
    """Coalesces fills of one key across the threads of this process."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self._lock = threading.Lock()

    def run(self, key: str, fill: Callable[[], T]) -> tuple[T, bool]:
        """Run ``fill`` unless another thread is already filling ``key``; then share its result.

        Returns the result and whether this caller joined another's fill. If the
        fill raises, every caller that joined it gets the same exception; the
        event is set in ``finally``, so no joiner is left waiting.
        """
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result, True  # type: ignore[return-value]
        try:
            flight.result = fill()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
        return flight.result, False

    def __len__(self) -> int:
        return len(self._flights)


class TaskFlights(Generic[T]):
    """Coalesces fills of one key across the asyncio tasks of each event loop."""

    def __init__(self) -> None:
        self._flights: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Task[T]] = {}

    async def run(self, key: str, fill: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Await the fill of ``key``, starting it in its own task if none is running.

        Returns the result and whether this caller joined another's fill.
        """
        loop = asyncio.get_running_loop()
        slot = (loop, key)
        task = self._flights.get(slot)
        joined = task is not None
        if task is None:
            task = loop.create_task(_call(fill))
            self._flights[slot] = task
            task.add_done_callback(lambda done: self._finish(slot, done))
        return await asyncio.shield(task), joined

    def _finish(self, slot: tuple[asyncio.AbstractEventLoop, str], task: asyncio.Task[T]) -> None:
        if self._flights.get(slot) is task:
            del self._flights[slot]
        if not task.cancelled():
            task.exception()  # retrieved here, so a fill nobody awaits any more logs no warning

    def __len__(self) -> int:
        return len(self._flights)


async def _call(fill: Callable[[], Awaitable[Any]]) -> Any:
    return await fill()
