"""Reading the invalidation marks: when a call reads them, and once for all callers.

Rules:

- A call judges a value it read from Redis only by marks read less than
  ``meta_check_ms`` before it started; a call that finds them older waits for
  one read, shared by every caller that finds them due (blocking callers under
  ``Generations.first``, asyncio callers on one task per event loop, sent beside
  their own ``GET``).
- A read Redis does not answer leaves the marks due. A call whose ``GET`` Redis
  then answers reads them once more; if that fails too, the value it read is not
  judged at all: the call goes on as if Redis were unreachable
  (:class:`MarksUnread`), never serving a value by marks it could not renew.
- While the breaker is open, a due read waits for Redis to answer again, and the
  call that finds it back reads the marks before it judges its value.
- A read Redis refuses (an ACL) is told at ERROR, once per instance and
  dataset, naming the rule to grant: such a process cannot know of invalidations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import TimeoutError as _TimeoutError

from memofill.commands import Commands
from memofill.failures import is_timeout, is_unreachable
from memofill.snapshot import Snapshot

logger = logging.getLogger("memofill")


class MarksUnread(_TimeoutError):
    """Redis answered a call's ``GET`` but not the reads of the marks that judge its value.

    The breaker counts it as a time-out (Redis answered the ``GET``, so it is
    not yet gone). The call goes on as in an outage: its outage copy, or a fill
    without the lock (the lock path's recheck would be judged by the same
    unread marks); never the value it could not judge.
    """

    def __init__(self) -> None:
        super().__init__("Redis did not answer the read of the invalidation marks")


def read_marks_sync(snapshot: Snapshot, commands: Commands, now: float) -> bool:
    """Read the marks when due, once for all concurrent callers; whether they are current.

    Every caller that finds the marks due waits for the one read, so that no call
    is judged by marks older than ``meta_check_ms`` (however long the process
    was idle); the read sets the next due time, so the others send nothing. A
    caller that started before a read failed shares its failure rather than
    waiting for a read of its own. Returns whether the marks are current for a
    call started at ``now``.
    """
    generations = snapshot.generations
    with generations.first:
        due = now > generations.next_check and now > generations.failed_at
        if due and not _skipped(snapshot):
            _take(snapshot, _meta_or_none(snapshot, commands), now)
    tell_unread(snapshot)
    return now <= generations.next_check


def reread_marks_sync(snapshot: Snapshot, commands: Commands) -> bool:
    """Read the marks now, due or not; whether Redis answered.

    For a fill whose lock was lost while it fetched (Redis restarted, or
    flushed): the meta hash may have been born again since, which no due time
    would tell.
    """
    now = time.monotonic()
    read = _meta_or_none(snapshot, commands)
    with snapshot.generations.first:
        _take(snapshot, read, now)
    return read[0] is not None


async def reread_marks_async(snapshot: Snapshot, commands: Commands) -> bool:
    """:func:`reread_marks_sync` on the asyncio client."""
    now = time.monotonic()
    read = await _meta_or_none_async(snapshot, commands)
    _take(snapshot, read, now)
    return read[0] is not None


def _take(snapshot: Snapshot, read: tuple[Any, str | None], now: float) -> None:
    """Take a read's reply (``read`` is what :func:`_meta_or_none` returned)."""
    snapshot.generations.loaded(*read, now=now)
    if read == (None, None):
        snapshot.generations.failed_at = time.monotonic()


def _skipped(snapshot: Snapshot) -> bool:
    """Whether a due read waits for Redis to answer again: the breaker is open, the marks known.

    The read stays due, so the call that finds Redis back (the breaker's probe)
    reads the marks before it judges the value it read.
    """
    return snapshot.generations.known and snapshot.breaker.is_open


def _meta_or_none(snapshot: Snapshot, commands: Commands) -> tuple[Any, str | None]:
    """The meta read's reply, or ``None`` and why (see :func:`tell_unread`)."""
    if snapshot.breaker.is_open:
        return None, None
    try:
        return commands.read_meta(snapshot.meta_key, snapshot.generations.version), None
    except Exception as exc:  # read again after meta_check_ms; the GET will tell the breaker
        return None, _why_unread(exc)


def read_marks_async(snapshot: Snapshot, commands: Commands, now: float) -> asyncio.Task[None]:
    """The read of the marks that is due on this event loop, one task for all its callers.

    Each caller sends its own ``GET`` meanwhile and awaits the task (shielded:
    a cancelled caller leaves it to the others) before it judges the value, so
    no call is judged by marks older than ``meta_check_ms``, and a due read
    costs no round trip more than a ``GET``. After it, the marks are current
    for a caller that started at ``started`` when ``started <=
    generations.next_check``. Reaching the fill no later than without it
    matters: on Python 3.10 a caller cancelled while a reply is on its way may
    not see the cancellation (redis-py drops it).
    """
    generations = snapshot.generations
    loop = asyncio.get_running_loop()
    task: asyncio.Task[None] | None = generations.first_reads.get(loop)
    if task is None:
        task = generations.first_reads[loop] = loop.create_task(
            _first_read(snapshot, commands, now)
        )
    return task


async def _first_read(snapshot: Snapshot, commands: Commands, now: float) -> None:
    generations = snapshot.generations
    try:
        if not _skipped(snapshot):
            _take(snapshot, await _meta_or_none_async(snapshot, commands), now)
            tell_unread(snapshot)
    finally:
        generations.first_reads.pop(asyncio.get_running_loop(), None)


async def _meta_or_none_async(snapshot: Snapshot, commands: Commands) -> tuple[Any, str | None]:
    if snapshot.breaker.is_open:
        return None, None
    try:
        return await commands.read_meta(snapshot.meta_key, snapshot.generations.version), None
    except Exception as exc:  # read again after meta_check_ms; the GET will tell the breaker
        return None, _why_unread(exc)


def tell_unread(snapshot: Snapshot) -> None:
    """Say at ERROR, once per instance and dataset, that the marks could not be read.

    Such a process cannot know of invalidations: it serves what others
    invalidated until its TTL ends. The fix is a permission, named here.
    """
    generations = snapshot.generations
    if generations.unread is None or snapshot.key in generations.told_unread:
        return
    generations.told_unread.add(snapshot.key)
    logger.error(
        "memofill cannot read the invalidation marks under %r (%s): values of %s invalidated "
        "by invalidate_dataset() may be served until their TTL ends; grant this Redis user "
        "memofill.acl_rule(%r) (EVALSHA, and TIME, INFO, HGET, HSET, HINCRBY and HGETALL on %s)",
        snapshot.meta_key,
        generations.unread,
        snapshot.key,
        snapshot.prefix,
        snapshot.meta_key,
        extra={"dataset": snapshot.key, "error": generations.unread},
    )


def _why_unread(error: Exception) -> str | None:
    """What to tell of a failed meta read: a refusal (an ACL, a server without scripts) only.

    An unreachable Redis is the breaker's to tell; a refused read is a configuration
    that leaves the process blind to invalidations, told once at ERROR.
    """
    return None if is_unreachable(error) or is_timeout(error) else type(error).__name__
