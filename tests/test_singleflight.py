"""Process-local coalescing: threads and asyncio tasks share one fill, its value or its exception.

First :class:`ThreadFlights` and :class:`TaskFlights` on their own, then through
``@cached_dataset`` on fakeredis: cancelled and timed-out asyncio callers leave
the shared fetch running for the others, and no task or flight is left behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest

from memofill import Memofill, singleflight
from memofill.singleflight import Flight, TaskFlights, ThreadFlights
from tests.conftest import POLICIES

PATIENCE_S = 10.0


class Boom(Exception):
    """The shared fill failed."""


class Waiters:
    """How many threads wait on a fill in flight, so a test opens its gate once all have joined."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def all_in(self, count: int, gate: threading.Event) -> None:
        """Set ``gate`` once ``count`` threads wait (in a thread of its own)."""

        def watch() -> None:
            deadline = time.monotonic() + PATIENCE_S
            while self.count < count and time.monotonic() < deadline:
                time.sleep(0.001)
            gate.set()

        threading.Thread(target=watch, daemon=True).start()


@pytest.fixture
def waiters(monkeypatch: pytest.MonkeyPatch) -> Waiters:
    """Counts the threads that join a fill: its ``done`` event counts who waits on it."""
    seen = Waiters()

    class CountedEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            with seen._lock:
                seen.count += 1
            return super().wait(timeout)

    class CountedFlight(singleflight._Flight[Any]):
        def __init__(self, close: Callable[[], None]) -> None:
            super().__init__(close)
            self.done = CountedEvent()

    monkeypatch.setattr(singleflight, "_Flight", CountedFlight)
    return seen


def in_threads(count: int, target: Callable[[], Any]) -> list[Any]:
    """Run ``target`` in ``count`` threads released together; their results or exceptions."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait(PATIENCE_S)
        try:
            results[index] = target()
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE_S)
        assert not thread.is_alive(), "a caller is stuck"
    return results


# --- ThreadFlights ---------------------------------------------------------------------


def test_threads_share_one_fill_and_its_result(waiters: Waiters) -> None:
    flights: ThreadFlights[str] = ThreadFlights()
    gate = threading.Event()
    calls: list[int] = []

    def fill(flight: Flight) -> str:
        calls.append(1)
        gate.wait(PATIENCE_S)
        return "value"

    waiters.all_in(9, gate)
    results = in_threads(10, lambda: flights.run("k", fill))
    assert calls == [1]
    assert Counter(joined for _, joined in results) == Counter({True: 9, False: 1})
    assert {value for value, _ in results} == {"value"}
    assert len(flights) == 0


def test_every_thread_gets_the_fills_exception_and_none_is_left_waiting() -> None:
    flights: ThreadFlights[str] = ThreadFlights()
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def fill(flight: Flight) -> str:
        calls.append(1)
        started.set()
        release.wait(PATIENCE_S)
        raise Boom("shared failure")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            flights.run("k", fill)
        except Boom as exc:
            errors.append(exc)

    leader = threading.Thread(target=call)
    leader.start()
    assert started.wait(PATIENCE_S)
    joiners = [threading.Thread(target=call) for _ in range(5)]
    for joiner in joiners:
        joiner.start()
    release.set()
    for thread in [leader, *joiners]:
        thread.join(PATIENCE_S)
        assert not thread.is_alive(), "a caller is stuck"
    assert calls == [1]
    assert len(errors) == 6
    assert all(error is errors[0] for error in errors)  # the same exception, not a copy
    assert len(flights) == 0


def test_a_finished_flight_is_forgotten_and_keys_do_not_mix() -> None:
    flights: ThreadFlights[str] = ThreadFlights()
    assert flights.run("a", lambda flight: "first") == ("first", False)
    assert flights.run("a", lambda flight: "second") == ("second", False)
    assert flights.run("b", lambda flight: "other") == ("other", False)
    with pytest.raises(Boom):
        flights.run("a", _raise_boom)
    assert flights.run("a", lambda flight: "after") == ("after", False)
    assert len(flights) == 0


def _raise_boom(flight: Flight) -> str:
    raise Boom


# --- TaskFlights -----------------------------------------------------------------------


async def test_tasks_share_one_fill() -> None:
    flights: TaskFlights[str] = TaskFlights()
    calls: list[int] = []

    async def fill(flight: Flight) -> str:
        calls.append(1)
        await asyncio.sleep(0.05)
        return "value"

    results = await asyncio.gather(*(flights.run("k", fill) for _ in range(20)))
    assert calls == [1]
    assert Counter(joined for _, joined in results) == Counter({True: 19, False: 1})
    assert len(flights) == 0


async def test_a_cancelled_caller_neither_cancels_the_fill_nor_fails_the_others() -> None:
    flights: TaskFlights[str] = TaskFlights()
    release = asyncio.Event()
    calls: list[int] = []

    async def fill(flight: Flight) -> str:
        calls.append(1)
        flight.commit()
        await release.wait()
        return "value"

    first = asyncio.ensure_future(flights.run("k", fill))  # it starts the fill
    await asyncio.sleep(0)
    others = [asyncio.ensure_future(flights.run("k", fill)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    others[0].cancel()
    await asyncio.sleep(0)
    release.set()
    assert [await other for other in others[1:]] == [("value", True)] * 2
    assert first.cancelled()
    assert others[0].cancelled()
    assert calls == [1]
    assert len(flights) == 0


async def test_a_caller_that_times_out_leaves_the_fill_running() -> None:
    flights: TaskFlights[str] = TaskFlights()
    done: list[str] = []

    async def fill(flight: Flight) -> str:
        flight.commit()  # it has called the origin
        await asyncio.sleep(0.2)
        done.append("filled")
        return "value"

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(flights.run("k", fill), timeout=0.01)
    assert len(flights) == 1  # still running for whoever comes next
    assert await flights.run("k", fill) == ("value", True)
    assert done == ["filled"]
    assert len(flights) == 0


async def test_a_fill_nobody_awaits_any_more_finishes_without_a_warning() -> None:
    flights: TaskFlights[str] = TaskFlights()
    finished = asyncio.Event()

    async def fill(flight: Flight) -> str:
        flight.commit()
        await asyncio.sleep(0.01)
        finished.set()
        raise Boom

    caller = asyncio.ensure_future(flights.run("k", fill))
    await asyncio.sleep(0)
    caller.cancel()
    await finished.wait()
    await asyncio.sleep(0.01)  # the done callback has run: the exception was retrieved
    assert len(flights) == 0


async def test_every_task_gets_the_fills_exception() -> None:
    flights: TaskFlights[str] = TaskFlights()

    async def fill(flight: Flight) -> str:
        await asyncio.sleep(0.01)
        raise Boom

    results = await asyncio.gather(
        *(flights.run("k", fill) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(result, Boom) for result in results)
    assert len(flights) == 0


async def test_a_fill_that_has_not_called_the_origin_stops_with_its_last_caller() -> None:
    flights: TaskFlights[str] = TaskFlights()
    stopped, calls = asyncio.Event(), []

    async def fill(flight: Flight) -> str:
        try:
            await asyncio.sleep(PATIENCE_S)  # waiting for another process's fill
        except asyncio.CancelledError:
            stopped.set()
            raise
        flight.commit()
        calls.append(1)
        return "value"

    callers = [asyncio.ensure_future(flights.run("k", fill)) for _ in range(3)]
    await asyncio.sleep(0.01)
    callers[0].cancel()
    callers[1].cancel()
    await asyncio.sleep(0.01)
    assert not stopped.is_set()  # one caller still waits
    assert len(flights) == 1
    callers[2].cancel()
    await asyncio.wait_for(stopped.wait(), PATIENCE_S)
    assert len(flights) == 0
    assert calls == []


# --- through the decorator -------------------------------------------------------------


@pytest.fixture
async def amf() -> AsyncIterator[Memofill]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield Memofill(client, prefix="s:", policies=POLICIES)
    await client.aclose()


async def test_cancelled_and_timed_out_callers_do_not_stop_the_shared_fetch(
    amf: Memofill,
) -> None:
    release = asyncio.Event()
    calls: list[str] = []

    @amf.cached_dataset("item:{name}")
    async def fetch(name: str) -> dict[str, str]:
        calls.append(name)
        await release.wait()
        return {"name": name}

    leader = asyncio.ensure_future(fetch.call_with_outcome("a"))
    while not calls:
        await asyncio.sleep(0.001)
    waiters = [asyncio.ensure_future(fetch.call_with_outcome("a")) for _ in range(5)]
    impatient = asyncio.ensure_future(asyncio.wait_for(fetch("a"), timeout=0.05))
    await asyncio.sleep(0.01)
    leader.cancel()
    waiters[0].cancel()
    with pytest.raises(asyncio.TimeoutError):
        await impatient
    release.set()
    results = [await waiter for waiter in waiters[1:]]
    assert {repr(r.value) for r in results} == {"{'name': 'a'}"}
    assert {r.outcome for r in results} == {"local_join"}
    assert leader.cancelled()
    assert calls == ["a"]
    assert len(amf.task_flights) == 0
    # The fill the cancelled leader started still landed in Redis.
    assert (await fetch.call_with_outcome("a")).outcome == "hit"
    assert amf.counters.snapshot()["item:{name}"]["leader_fill"] == 1


async def test_concurrent_tasks_on_different_keys_do_not_coalesce(amf: Memofill) -> None:
    @amf.cached_dataset("item:{name}")
    async def fetch(name: str) -> str:
        await asyncio.sleep(0.01)
        return name

    names = [f"k{i}" for i in range(10)]
    assert await asyncio.gather(*(fetch(n) for n in names)) == names
    assert amf.counters.snapshot() == {"item:{name}": {"leader_fill": 10}}


def test_threads_through_the_decorator_all_get_the_fetchs_exception(waiters: Waiters) -> None:
    mf = Memofill(fakeredis.FakeRedis(server=fakeredis.FakeServer()), policies=POLICIES)
    calls: list[str] = []
    gate = threading.Event()

    @mf.cached_dataset("plain:{name}")
    def fetch(name: str) -> str:
        calls.append(name)
        gate.wait(PATIENCE_S)
        raise Boom(name)

    waiters.all_in(7, gate)
    results = in_threads(8, lambda: fetch("a"))
    assert all(isinstance(result, Boom) for result in results)
    assert len({id(result) for result in results}) == 1
    assert calls == ["a"]
    assert len(mf.thread_flights) == 0
    snapshot = mf.counters.snapshot()["plain:{name}"]
    assert snapshot["fetch_error"] + snapshot["local_join"] == 8
