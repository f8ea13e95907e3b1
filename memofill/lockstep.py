"""Several fills driven together: their lock and write steps in one round trip, their fetches
in one call.

Rules:

- Each fill is the coordinator's own algorithm (:func:`memofill.coordinator.fill`),
  unchanged: this driver decides only when its steps are performed, never what
  they are, so every key of a bulk call is coordinated exactly as a single call's.
- Rounds: the steps of every fill that waits on a script (a lock, a write, a
  release, a hold) are sent in one pipeline
  (:meth:`~memofill.commands.Commands.pipelined`), one round trip whatever the
  number of keys. Once no fill waits on one, the fills at their fetch get their
  values from one call of ``fetch_all``.
- A fill whose next step is anything else (a follower's blocking wait on its
  wake stream, a pause) leaves the rounds, and is finished on its own by
  :func:`~memofill.drivers.run_sync` (or :func:`~memofill.drivers.run_async`)
  once they are over: no follower's wait holds up the leaders' writes, and
  leaders write before anyone waits on them. A key such a fill takes over from a
  failed leader is fetched by ``fetch_one``.
- Failures are thrown into the fills they concern, which degrade as a single
  fill does: a pipeline that fails, into every fill in it; an exception of
  ``fetch_all``, into every fill at its fetch. A cancellation thrown in lets each
  fill release its lock (the rounds go on for those steps), then is raised.
- The breaker is told as :mod:`memofill.drivers` tells it: of every failure to
  reach Redis, and of every answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from memofill.commands import Commands
from memofill.drivers import on_error, run_async, run_sync
from memofill.failures import RedisUnavailable
from memofill.fallback import Breaker
from memofill.steps import Command, Fetch, Result, Step, Steps

#: The steps sent in a round: the scripts of a lock, a write, a release and a hold.
PIPELINED = frozenset({"acquire", "write", "release", "hold"})


class _Rounds:
    """The fills in lockstep and what each waits on: the decisions both drivers share."""

    def __init__(self, fills: list[Steps]) -> None:
        self.fills = fills
        #: Index -> the step a fill in the rounds waits on.
        self.waiting: dict[int, Step] = {}
        #: Index -> the step a fill left the rounds at, to be finished on its own.
        self.left: dict[int, Step] = {}
        self.results: dict[int, Result] = {}
        #: What a fill raised rather than returned: a cancellation, after its clean-up.
        self.raised: BaseException | None = None
        for index in range(len(fills)):
            self.advance(index, None, None)

    def advance(self, index: int, reply: Any, failure: BaseException | None) -> None:
        """Send ``reply`` (or throw ``failure``) into fill ``index``; file its next step."""
        fill = self.fills[index]
        try:
            step = fill.send(reply) if failure is None else fill.throw(failure)
        except StopIteration as finished:
            self.results[index] = finished.value
            return
        except BaseException as exc:  # a cancellation, re-raised once its lock was released
            self.raised = exc
            return
        if isinstance(step, Fetch) or (isinstance(step, Command) and step.name in PIPELINED):
            self.waiting[index] = step
        else:
            self.left[index] = step

    def take(self, kind: type[Command] | type[Fetch]) -> list[tuple[int, Step]]:
        """The fills waiting on a step of ``kind``, taken out of :attr:`waiting`."""
        due: list[tuple[int, Step]] = [
            (index, step) for index, step in self.waiting.items() if isinstance(step, kind)
        ]
        for index, _ in due:
            del self.waiting[index]
        return due

    def answered(self, due: list[tuple[int, Step]], replies: list[Any]) -> None:
        """Each fill gets its reply from Redis; one that is an error is thrown into it."""
        for (index, _), reply in zip(due, replies, strict=True):
            failure = reply if isinstance(reply, Exception) else None
            self.advance(index, None if failure else reply, failure)

    def fetched(self, due: list[tuple[int, Step]], values: list[Any]) -> None:
        """Each fill at its fetch gets its value (whatever it is: never thrown)."""
        for (index, _), value in zip(due, values, strict=True):
            self.advance(index, value, None)

    def failed(self, due: list[tuple[int, Step]], failure: BaseException) -> None:
        for index, _ in due:
            self.advance(index, None, failure)

    def abandon(self) -> None:
        """A cancellation ends the rounds: fills that left them hold no lock; close them."""
        for index in self.left:
            self.fills[index].close()


def _resumed(step: Step, fill: Steps) -> Steps:
    """``fill`` from ``step`` on, which it has already yielded, for a driver of one fill."""
    while True:
        try:
            reply = yield step
        except BaseException as exc:  # thrown in by the driver: the fill decides
            try:
                step = fill.throw(exc)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]
        else:
            try:
                step = fill.send(reply)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]


def _sent(due: list[tuple[int, Step]]) -> list[tuple[str, tuple[Any, ...]]]:
    return [(step.name, step.args) for _, step in due if isinstance(step, Command)]


def run_together_sync(
    fills: list[Steps],
    commands: Commands,
    fetch_all: Callable[[list[int]], list[Any]],
    fetch_one: Callable[[int], Callable[[], Any]],
    breaker: Breaker,
) -> list[Result]:
    """Drive ``fills`` together with a blocking client; their results, in order.

    ``fetch_all(indexes)`` returns the values of the fills at those indexes, in
    that order; ``fetch_one(index)`` is the fetch of one fill that takes over a
    key on its own.
    """
    rounds = _Rounds(fills)
    while True:
        due = rounds.take(Command)
        if due:
            try:
                if breaker.is_open:
                    raise RedisUnavailable("Redis was unreachable moments ago")
                replies = commands.pipelined(_sent(due))
                breaker.answered()
            except Exception as exc:
                rounds.failed(due, on_error(exc, breaker, due[0][1]))
            else:
                rounds.answered(due, replies)
            continue
        due = rounds.take(Fetch)
        if not due:
            break
        try:
            values = fetch_all([index for index, _ in due])
        except Exception as exc:
            rounds.failed(due, exc)
        else:
            rounds.fetched(due, values)
    if rounds.raised is not None:
        rounds.abandon()
        raise rounds.raised
    for index, step in rounds.left.items():
        fill = _resumed(step, fills[index])
        rounds.results[index] = run_sync(fill, commands, fetch_one(index), breaker)
    return [rounds.results[index] for index in range(len(fills))]


async def run_together_async(
    fills: list[Steps],
    commands: Commands,
    fetch_all: Callable[[list[int]], Awaitable[list[Any]]],
    fetch_one: Callable[[int], Callable[[], Awaitable[Any]]],
    breaker: Breaker,
) -> list[Result]:
    """:func:`run_together_sync` on the asyncio client; the fills left finish concurrently."""
    rounds = _Rounds(fills)
    while True:
        due = rounds.take(Command)
        if due:
            try:
                if breaker.is_open:
                    raise RedisUnavailable("Redis was unreachable moments ago")
                replies = await commands.pipelined(_sent(due))
                breaker.answered()
            except asyncio.CancelledError as exc:
                rounds.failed(due, exc)  # each fill cleans up and re-raises it
            except Exception as exc:
                rounds.failed(due, on_error(exc, breaker, due[0][1]))
            else:
                rounds.answered(due, replies)
            continue
        due = rounds.take(Fetch)
        if not due:
            break
        try:
            values = await fetch_all([index for index, _ in due])
        except (Exception, asyncio.CancelledError) as exc:
            rounds.failed(due, exc)
        else:
            rounds.fetched(due, values)
    if rounds.raised is not None:
        rounds.abandon()
        raise rounds.raised
    left = list(rounds.left.items())
    finished = await asyncio.gather(
        *(
            run_async(_resumed(step, fills[index]), commands, fetch_one(index), breaker)
            for index, step in left
        )
    )
    for (index, _), result in zip(left, finished, strict=True):
        rounds.results[index] = result
    return [rounds.results[index] for index in range(len(fills))]
