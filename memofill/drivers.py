"""The drivers: perform the steps of :mod:`memofill.coordinator`'s algorithm with a real client.

Rules:

- A driver makes no decision. It sends each :class:`~memofill.steps.Command`
  through :class:`~memofill.commands.Commands`, sleeps a
  :class:`~memofill.steps.Sleep`, calls the origin at
  :data:`~memofill.steps.FETCH`, and throws any failure back into the
  algorithm, which decides how to degrade.
- The breaker is told here of every failure to reach Redis (a blocking wait's own
  time-out aside), and of every answer; an open breaker fails a command at once.
- :func:`run_sync` and :func:`run_async` are twins that differ only where one
  awaits, and in the asyncio driver's care for cancellation.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from memofill.commands import Commands
from memofill.failures import REDIS_ERRORS, RedisUnavailable, is_timeout, is_unreachable
from memofill.fallback import Breaker
from memofill.steps import Command, Fetch, Result, Sleep, Step, Steps


def _send(commands: Commands, step: Command, breaker: Breaker) -> Any:
    if breaker.is_open:
        raise RedisUnavailable("Redis was unreachable moments ago")
    return getattr(commands, step.name)(*step.args)


def on_error(exc: Exception, breaker: Breaker, step: Step) -> Exception:
    """Tell the breaker of a failure to reach Redis; a blocking wait's time-out is none.

    A ``wait`` blocks on purpose, for nearly as long as the socket time-out
    allows: its time-out says the process or the server's timer was late, and
    Redis answers the read that follows it.
    """
    if not (isinstance(exc, REDIS_ERRORS) and is_unreachable(exc)):
        return exc
    timed_out = is_timeout(exc)
    if not (timed_out and isinstance(step, Command) and step.name == "wait"):
        breaker.failed(timed_out=timed_out)
    return exc


def run_sync(
    steps: Steps,
    commands: Commands | None,
    fetch: Callable[[], Any],
    breaker: Breaker,
    on_fetch: Callable[[], object] = lambda: None,
) -> Result:
    """Perform the steps with a blocking client; return the algorithm's result.

    The :class:`~memofill.steps.Result` the steps return. ``on_fetch`` is
    called before the origin is.
    """
    reply: Any = None
    failure: Exception | None = None
    while True:
        try:
            step = steps.send(reply) if failure is None else steps.throw(failure)
        except StopIteration as finished:
            return finished.value  # type: ignore[no-any-return]
        reply, failure = None, None
        try:
            if isinstance(step, Fetch):
                on_fetch()
                reply = fetch()
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
            elif commands is None:
                raise RedisUnavailable("no Redis client is configured")
            else:
                reply = _send(commands, step, breaker)
                breaker.answered()
        except Exception as exc:
            failure = on_error(exc, breaker, step)


def _cancel_requested() -> bool:
    """Whether this task was asked to stop, even if the cancellation never arrived.

    redis-py's asyncio client, cancelled while its reply is already waiting (a
    busy event loop), returns the reply and drops the ``CancelledError``. A fill
    whose callers all gave up would then follow on and call the origin after
    ``wait_ms``. Python 3.11+ counts cancellation requests; 3.10 cannot tell.
    """
    task = asyncio.current_task()
    return task is not None and sys.version_info >= (3, 11) and task.cancelling() > 0


async def run_async(
    steps: Steps,
    commands: Commands | None,
    fetch: Callable[[], Awaitable[Any]],
    breaker: Breaker,
    on_fetch: Callable[[], object] = lambda: None,
) -> Result:
    """Perform the steps with an asyncio client; return the algorithm's result.

    A cancellation is thrown into the algorithm like any other failure of a
    step: it yields its clean-up steps (a leader releases its lock), which this
    driver performs even though its task is being cancelled (the cancellation
    was delivered; the next awaits run), then re-raises it. When
    :func:`asyncio.run` returns with a fill in flight, it cancels the fill's
    task and runs the loop until that task ends, so the clean-up reaches Redis.
    ``on_fetch`` is called before the origin is: from then on the fill must
    run to its end (the asyncio singleflight, ``TaskFlights``, stops a fill that no caller
    awaits any more only before then).
    """
    reply: Any = None
    failure: BaseException | None = None
    while True:
        try:
            step = steps.send(reply) if failure is None else steps.throw(failure)
        except StopIteration as finished:
            return finished.value  # type: ignore[no-any-return]
        reply, failure = None, None
        try:
            if isinstance(step, Fetch):
                if _cancel_requested():
                    raise asyncio.CancelledError  # one a Redis reply swallowed: never fetch
                on_fetch()
                reply = await fetch()
            elif isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
            elif commands is None:
                raise RedisUnavailable("no Redis client is configured")
            else:
                reply = await _send(commands, step, breaker)
                breaker.answered()
        except asyncio.CancelledError as exc:
            failure = exc  # the algorithm cleans up and re-raises it
        except Exception as exc:
            failure = on_error(exc, breaker, step)
