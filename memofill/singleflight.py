"""Process-local coalescing: one caller per key runs the fill, the others share its result.

The same two-method shape serves threads and asyncio tasks. With tasks, the
fill runs in a task of its own and every caller awaits it through
:func:`asyncio.shield`, so a caller that is cancelled or times out leaves the
shared fill running for the others. When the last of them goes, the fill stops
too, unless it has already called the origin (see :class:`TaskFlights`).

A fill is handed its :class:`Flight`. When its result is known it closes the
flight to new callers, which tells it how many joined: it records itself then,
once for all the callers it served, and may send them to fill on their own
(``refill``). A fill's result is shared with its joiners only once it is known
to be current when the fill ends: a joiner may have begun its call after
another process invalidated the key, while the fill it joined was fetching. A
fill that does not close its flight has it closed when it returns or raises.

A forked child (a pre-forking server, ``multiprocessing``) starts with no fills
in flight: it inherits the parent's table but not the threads or tasks that
would finish those fills, so a caller there would wait for them forever.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")


class Flight(Protocol):
    """What a fill sees of its flight."""

    #: Set by the fill: its result is not current for the joiners, each runs its own fill.
    refill: bool

    def close(self) -> int:
        """Close the flight to new callers (they start a fill of their own); how many joined."""

    def commit(self) -> None:
        """The fill is about to call the origin (asyncio: from now on it runs to its end)."""

    @property
    def joined_late(self) -> bool:
        """Whether a caller joined after the fill began to call the origin (``commit``).

        Only such a caller can have begun after an invalidation that the fill's
        value predates: one that joined before the fetch began started before it.
        """


class _Alone:
    """The flight of a joiner's own fill, after a fill it joined said ``refill``: no joiners."""

    refill = False

    def close(self) -> int:
        return 0

    def commit(self) -> None:
        pass

    joined_late = False


class _Flight(Generic[T]):
    __slots__ = ("_close", "done", "error", "fetch_joiners", "joiners", "refill", "result")

    def __init__(self, close: Callable[[], None]) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.joiners = 0
        #: The result is not current for the joiners: each runs its own fill.
        self.refill = False
        #: How many had joined when the fill began to call the origin; ``None`` before.
        self.fetch_joiners: int | None = None
        self._close = close

    def close(self) -> int:
        self._close()
        return self.joiners

    def commit(self) -> None:
        self.fetch_joiners = self.joiners

    @property
    def joined_late(self) -> bool:
        return self.fetch_joiners is not None and self.joiners > self.fetch_joiners


class ThreadFlights(Generic[T]):
    """Coalesces fills of one key across the threads of this process."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self._lock = threading.Lock()
        _live.add(self)

    def _forget(self) -> None:
        """In a forked child: no fill is in flight, and nobody holds the lock."""
        self._flights = {}
        self._lock = threading.Lock()

    def run(self, key: str, fill: Callable[[Flight], T]) -> tuple[T, bool]:
        """Run ``fill`` unless another thread is already filling ``key``; then share its result.

        Returns the result and whether this caller joined another's fill. If the
        fill raises, every caller that joined it gets the same exception; the
        event is set in ``finally``, so no joiner is left waiting.
        """
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight(lambda: self._close(key, flight))
            else:
                flight.joiners += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.refill:
                return fill(_Alone()), False
            return flight.result, True  # type: ignore[return-value]
        try:
            flight.result = fill(flight)
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            self._close(key, flight)
            flight.done.set()
        return flight.result, False

    def _close(self, key: str, flight: _Flight[T] | None) -> None:
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]

    def __len__(self) -> int:
        return len(self._flights)


class _TaskFlight(Generic[T]):
    __slots__ = (
        "arrivals",
        "closing",
        "committed",
        "fetch_arrivals",
        "joiners",
        "refill",
        "task",
        "waiters",
    )

    def __init__(self, fill: Callable[[Flight], Awaitable[T]], close: Callable[[], None]) -> None:
        self.waiters = 0
        #: The callers awaiting it that did not start it.
        self.joiners = 0
        #: Every caller that joined, those since gone included; and how many at ``commit``.
        self.arrivals = 0
        self.fetch_arrivals = 0
        self.committed = False
        self.refill = False
        self.closing = close
        self.task: asyncio.Task[T] = asyncio.get_running_loop().create_task(self._run(fill))

    async def _run(self, fill: Callable[[Flight], Awaitable[T]]) -> T:
        try:
            return await fill(self)
        finally:
            self.closing()

    def close(self) -> int:
        self.closing()
        return self.joiners

    def commit(self) -> None:
        """The fill is about to call the origin: from now on it runs to its end."""
        self.committed = True
        self.fetch_arrivals = self.arrivals

    @property
    def joined_late(self) -> bool:
        return self.committed and self.arrivals > self.fetch_arrivals


class TaskFlights(Generic[T]):
    """Coalesces fills of one key across the asyncio tasks of each event loop.

    A fill that nobody awaits any more stops, unless it has called the origin:
    when the last caller awaiting it is cancelled, its task is cancelled too
    while it is still waiting for another process's fill (or for its lock), so
    an abandoned wait never ends in an origin call. A fill that has called the
    origin runs on and stores the value, which the next caller (here or in
    another process) then finds: the origin's work is not thrown away.
    """

    def __init__(self) -> None:
        self._flights: dict[tuple[asyncio.AbstractEventLoop, str], _TaskFlight[T]] = {}
        _live.add(self)

    def _forget(self) -> None:
        """In a forked child: the parent's event loops and their fills do not run here."""
        self._flights = {}

    async def run(self, key: str, fill: Callable[[Flight], Awaitable[T]]) -> tuple[T, bool]:
        """Await the fill of ``key``, starting it in its own task if none is running.

        ``fill`` is handed its :class:`Flight`; it calls ``commit()`` before it
        calls the origin. Returns the result and whether this caller joined
        another's fill. A flight's ``joiners`` are those still awaiting it.
        """
        loop = asyncio.get_running_loop()
        slot = (loop, key)
        flight = self._flights.get(slot)
        joined = flight is not None
        if flight is None:
            flight = self._flights[slot] = _TaskFlight(fill, lambda: self._close(slot))
            flight.task.add_done_callback(lambda done: self._finish(slot, done))
        flight.waiters += 1
        flight.joiners += joined
        flight.arrivals += joined
        try:
            result = await asyncio.shield(flight.task)
            if joined and flight.refill:
                return await fill(_Alone()), False
            return result, joined
        finally:
            flight.waiters -= 1
            flight.joiners -= joined
            if flight.waiters == 0 and not flight.committed and not flight.task.done():
                # Every caller gave up before the origin was called: stop waiting for nothing.
                if self._flights.get(slot) is flight:
                    del self._flights[slot]
                flight.task.cancel()

    def _close(self, slot: tuple[asyncio.AbstractEventLoop, str]) -> None:
        flight = self._flights.get(slot)
        if flight is not None and flight.task is asyncio.current_task():
            del self._flights[slot]

    def _finish(self, slot: tuple[asyncio.AbstractEventLoop, str], task: asyncio.Task[T]) -> None:
        flight = self._flights.get(slot)
        if flight is not None and flight.task is task:
            del self._flights[slot]
        if not task.cancelled():
            task.exception()  # retrieved here, so a fill nobody awaits any more logs no warning

    def __len__(self) -> int:
        return len(self._flights)


_live: weakref.WeakSet[ThreadFlights[Any] | TaskFlights[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for flights in list(_live):
        flights._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
