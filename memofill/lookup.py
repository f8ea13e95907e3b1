"""The hit path: one ``GET`` and one decode on a hit, and the first decision on anything else.

Rules that keep a hit at the cost of a plain ``GET`` + ``orjson.loads`` (a change
here is measured by ``python -m bench hit`` and guarded by ``tests/test_hit_budget.py``):

1. A plain hit enters exactly these Python frames: the function's own ``__call__``,
   :func:`lookup_sync` (or :func:`lookup_async`), its key builder, redis-py's ``get``,
   :func:`hit` and :func:`plain`. No generator, driver, closure or :class:`CallResult`
   (unless the caller asked for one with ``call_with_outcome``).
2. One round trip: nothing is read beside the value unless it is due (the marks every
   ``meta_check_ms``; ``PTTL`` only for a read that reserves a near copy).
3. What the hit reads, it reads from the flat :class:`~memofill.snapshot.Snapshot`;
   hits are counted on a lock-free tally; the cheap tests (``HEADED``, ``marks.top``)
   are inline, and anything headed or marked goes to :mod:`memofill.late`.
4. Everything after a read that is not a plain hit is decided once, in
   :func:`after_read`, for both lookups; the twins differ only where they await.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import attrs

from memofill.codec import (
    CORRUPT,
    HEADED,
    HEADER_LEN,
    NEGATIVE,
    OLD_HEADED,
    STAMP,
    VIEW_FROM_BYTES,
    ErrorMarker,
    decode_special,
    is_marker,
)
from memofill.commands import Commands
from memofill.errors import FillError
from memofill.failures import is_timeout, is_unreachable
from memofill.generations import Marks
from memofill.late import LateRead, marker_behind, sort_read
from memofill.meta_reads import MarksUnread, read_marks_async, read_marks_sync
from memofill.misses import Miss, bypass, flight, raise_if_cancel_was_lost
from memofill.near import keep_near, outage_copy, serve_near
from memofill.outcomes import FALLBACK_HIT, HIT, NEAR_HIT, NOT_A_HIT, CallResult
from memofill.snapshot import BYPASS, Snapshot
from memofill.tags import read_marks
from memofill.values import JSON

logger = logging.getLogger("memofill")


def lookup_sync(
    snapshot: Snapshot, instance: Any, wrapped: Any, args: Any, kwargs: Any, *, with_outcome: bool
) -> Any:
    """One call of a sync function: a ``GET`` and a decode on a hit, else what :func:`after_read`
    decides.

    ``instance`` is the bound method's ``self`` (``None`` for a function), and
    ``wrapped`` the function to call on a miss (``None``: the one decorated).
    Returns the value, or its :class:`CallResult` when ``with_outcome``.
    """
    if snapshot.gated:
        commands = snapshot.gate()
        if commands is BYPASS:
            return bypass(snapshot, wrapped, args, kwargs, with_outcome)
    else:
        commands = snapshot.commands
    started = time.monotonic()
    key = snapshot.key_of(instance, args, kwargs)
    if started > snapshot.generations.next_check and commands is not None:
        read_marks_sync(snapshot, commands, started)
    near = snapshot.near
    if near is not None:
        value = serve_near(snapshot, key, started)
        if value is not NOT_A_HIT:
            return CallResult(value, NEAR_HIT, False) if with_outcome else value
    breaker = snapshot.breaker
    asked, raw, error = False, None, None
    tags_of, later = snapshot.tags_of, None
    if commands is not None and not (breaker.open_until and breaker.skips()):
        asked = True
        reservation = None if near is None else near.reserve(key)
        try:
            if reservation is not None:
                if tags_of is None:
                    reply = commands.read_near(key)
                    raw = reply[0]
                else:
                    fields = tags_of(instance, args, kwargs)
                    reply = commands.read_near_tagged(key, snapshot.tags_key, fields)
                    raw, snapshot, later = by_tags(snapshot, [reply[0], *reply[2:]])
            elif tags_of is None:
                raw = commands.get(key)
            else:
                reply = commands.tagged_get(key, snapshot.tags_key, tags_of(instance, args, kwargs))
                raw, snapshot, later = by_tags(snapshot, reply)
        except Exception as exc:  # any failure of the client, as in the coordinator
            error = exc
            if reservation is not None:
                snapshot.local_store.abandon(key, reservation)
        else:
            if breaker.open_until:  # Redis answered this probe (or the cool-down is over)
                breaker.reset()
            if started <= snapshot.generations.next_check or read_marks_sync(
                snapshot, commands, time.monotonic()
            ):
                if reservation is None:
                    value = hit(snapshot, key, raw, started)
                else:
                    value = reserved_hit(snapshot, key, reply, started, reservation)
                if value is not NOT_A_HIT:
                    return CallResult(value, HIT, False) if with_outcome else value
            else:  # not judged by marks it could not renew
                error, raw = MarksUnread(), None
                if reservation is not None:
                    snapshot.local_store.abandon(key, reservation)
    if later is not None:
        snapshot = judged_by(snapshot, later)  # what follows is judged by its tags' marks too
    then = after_read(snapshot, key, started, asked, raw, error, commands, wrapped, args, kwargs)
    served = settle_sync(snapshot, key, then)
    return served if with_outcome else served.value


def settle_sync(
    snapshot: Snapshot, key: str, then: CallResult[Any] | LateRead | Miss
) -> CallResult[Any]:
    """Do what :func:`after_read` decided for a read that was not a plain hit; its result."""
    if isinstance(then, CallResult):
        return then
    if isinstance(then, LateRead):
        return then.run_sync()
    result, joined = snapshot.thread_flights.run(flight(snapshot, key), then.run_sync)
    return then.finish(result, joined)


async def lookup_async(
    snapshot: Snapshot, instance: Any, wrapped: Any, args: Any, kwargs: Any, *, with_outcome: bool
) -> Any:
    """:func:`lookup_sync` for coroutine functions, on the asyncio client."""
    if snapshot.gated:
        commands = snapshot.gate()
        if commands is BYPASS:
            return await bypass(snapshot, wrapped, args, kwargs, with_outcome)
    else:
        commands = snapshot.commands
    started = time.monotonic()
    key = snapshot.key_of(instance, args, kwargs)
    first_read = None
    if started > snapshot.generations.next_check and commands is not None:
        # Sent beside this caller's GET, and awaited before the value is judged.
        first_read = read_marks_async(snapshot, commands, started)
    near = snapshot.near
    if near is not None:
        value = serve_near(snapshot, key, started)
        if value is not NOT_A_HIT:
            return CallResult(value, NEAR_HIT, False) if with_outcome else value
    breaker = snapshot.breaker
    asked, raw, error = False, None, None
    tags_of, later = snapshot.tags_of, None
    if commands is not None and not (breaker.open_until and breaker.skips()):
        asked = True
        reservation = None if near is None else near.reserve(key)
        try:
            if reservation is not None:
                if tags_of is None:
                    reply = await commands.read_near(key)
                    raw = reply[0]
                else:
                    fields = tags_of(instance, args, kwargs)
                    reply = await commands.read_near_tagged(key, snapshot.tags_key, fields)
                    raw, snapshot, later = by_tags(snapshot, [reply[0], *reply[2:]])
            elif tags_of is None:
                raw = await commands.get(key)
            else:
                fields = tags_of(instance, args, kwargs)
                reply = await commands.tagged_get(key, snapshot.tags_key, fields)
                raw, snapshot, later = by_tags(snapshot, reply)
        except Exception as exc:  # any failure of the client, as in the coordinator
            error = exc
            if reservation is not None:
                snapshot.local_store.abandon(key, reservation)
        else:
            if breaker.open_until:  # Redis answered this probe (or the cool-down is over)
                breaker.reset()
            if first_read is not None:
                await asyncio.shield(first_read)
                first_read = None
            if started > snapshot.generations.next_check:  # unread, or skipped while open
                await asyncio.shield(read_marks_async(snapshot, commands, time.monotonic()))
            if started <= snapshot.generations.next_check:
                if reservation is None:
                    value = hit(snapshot, key, raw, started)
                else:
                    value = reserved_hit(snapshot, key, reply, started, reservation)
                if value is not NOT_A_HIT:
                    return CallResult(value, HIT, False) if with_outcome else value
            else:  # not judged by marks it could not renew
                error, raw = MarksUnread(), None
                if reservation is not None:
                    snapshot.local_store.abandon(key, reservation)
    if first_read is not None:
        await asyncio.shield(first_read)
    if later is not None:
        snapshot = judged_by(snapshot, later)  # what follows is judged by its tags' marks too
    then = after_read(snapshot, key, started, asked, raw, error, commands, wrapped, args, kwargs)
    served = await settle_async(snapshot, key, then)
    return served if with_outcome else served.value


async def settle_async(
    snapshot: Snapshot, key: str, then: CallResult[Any] | LateRead | Miss
) -> CallResult[Any]:
    """:func:`settle_sync` for coroutine functions."""
    if isinstance(then, CallResult):
        return then
    if isinstance(then, LateRead):
        return await then.run_async()
    raise_if_cancel_was_lost()
    result, joined = await snapshot.task_flights.run(flight(snapshot, key), then.run_async)
    return then.finish(result, joined)


def by_tags(
    snapshot: Snapshot, reply: list[Any]
) -> tuple[Any, Snapshot, tuple[int, int, bool] | None]:
    """What a tagged read (:meth:`~memofill.commands.Commands.tagged_get`) found.

    The stored bytes; the snapshot to judge them by as a hit; and, where the
    value's tags' marks (:func:`~memofill.tags.read_marks`) are beyond its
    dataset's, those marks, which judge what follows a read that is no plain
    hit (:func:`judged_by`: a miss's fill, its recheck and its flight, a stale
    value), else ``None``. A value stamped after every mark of its tags is
    judged as any other: the commonest tagged hit makes no new snapshot.
    """
    raw = reply[0]
    tag_marks = hard, soft, marked = read_marks(reply[1], reply[2:])
    generations = snapshot.generations
    if max(hard, soft) > generations.clock_us:  # a fill without a lock stamps after them
        generations.heard_clock(max(hard, soft))
    marks = snapshot.marks
    if hard <= marks.hard and soft <= marks.soft and (marks.explicit or not marked):
        return raw, snapshot, None
    if raw is not None and raw[:2] == HEADED:
        try:
            if int(raw[STAMP], 16) > max(hard, soft, marks.top):
                return raw, snapshot, tag_marks
        except ValueError:  # foreign bytes that only look like a header: judged as such
            pass
    return raw, judged_by(snapshot, tag_marks), None


def judged_by(snapshot: Snapshot, tag_marks: tuple[int, int, bool]) -> Snapshot:
    """``snapshot`` with its dataset's marks raised to a value's tags' (:func:`by_tags`)."""
    hard, soft, marked = tag_marks
    marks, cell = snapshot.marks, Marks()
    cell.set(max(hard, marks.hard), max(soft, marks.soft), marked or marks.explicit)
    return attrs.evolve(snapshot, marks=cell)


def hit(snapshot: Snapshot, key: str, raw: bytes | None, started: float) -> Any:
    """The value of a plain hit, counted and kept for outages; :data:`NOT_A_HIT` otherwise.

    The local copy is refreshed at most every :data:`~memofill.near.REFRESH_S`
    (the check :meth:`~memofill.near.LocalStore.remember` makes, without its call).
    """
    if raw is None:
        return NOT_A_HIT
    value = plain(snapshot, raw)
    if value is NOT_A_HIT:
        return value
    snapshot.count_hit()
    store = snapshot.local_store
    kept = store.entries.get(key)
    if kept is None or kept.refresh_after <= started:
        store.put(key, raw, snapshot.outage_s)
    return value


def hits(
    snapshot: Snapshot, keys: list[str], raws: list[Any], started: float
) -> tuple[list[Any], int]:
    """:func:`hit` of each key of a page and its stored bytes (``None``: not found), in one
    loop: the values (:data:`NOT_A_HIT` where none) and how many are not hits."""
    store = snapshot.local_store
    entries, put, outage_s, count = store.entries, store.put, snapshot.outage_s, snapshot.count_hit
    values, missed = [], 0
    for key, raw in zip(keys, raws, strict=True):
        value = NOT_A_HIT if raw is None else plain(snapshot, raw)
        if value is NOT_A_HIT:
            missed += 1
        else:
            count()
            kept = entries.get(key)
            if kept is None or kept.refresh_after <= started:
                put(key, raw, outage_s)
        values.append(value)
    return values, missed


def plain(snapshot: Snapshot, raw: bytes) -> Any:
    """The value of stored bytes that are a plain fresh hit, else :data:`NOT_A_HIT`.

    A value stamped at or before its dataset's marks is none (see :class:`LateRead`);
    nor, once the dataset was invalidated, is a value without a header.
    """
    body = raw
    if raw[:2] == HEADED:
        late = snapshot.late
        try:
            if late is not None and late(raw):
                return NOT_A_HIT  # stale, or due early: see LateRead
            if int(raw[STAMP], 16) <= snapshot.marks.top:
                return NOT_A_HIT  # fetched before a dataset invalidation: see LateRead
        except ValueError:  # foreign bytes that only look like a header: a miss refills them
            return NOT_A_HIT
        body = raw[HEADER_LEN:] if len(raw) < VIEW_FROM_BYTES else snapshot.view(raw)
    elif snapshot.marks.explicit:
        return NOT_A_HIT  # a marker, or written without a header: sorted out on the miss path
    try:
        return snapshot.decode(body)
    except Exception:  # a marker, corrupt bytes, or another schema: sorted out on the miss path
        return NOT_A_HIT


def reserved_hit(
    snapshot: Snapshot,
    key: str,
    reply: list[Any],
    started: float,
    reservation: tuple[object, int],
) -> Any:
    """:func:`hit` for a read that reserved a near copy (``reply`` begins ``[bytes, ms left]``).

    A plain value, and a negative marker, are kept near as
    :func:`~memofill.near.keep_near` says; anything else (stale, due early,
    corrupt, an error marker) is not, and the reservation is given up.
    """
    near = snapshot.near
    assert near is not None  # called only for functions whose dataset keeps near copies
    raw, ms_left = reply[0], reply[1]  # a tagged read has its marks after them
    if raw is None:
        near.abandon(key, reservation)
        return NOT_A_HIT
    if raw[:1] == b"\0" or is_marker(raw):  # served by the miss path, which reads markers
        if decode_special(raw) is NEGATIVE and not marker_behind(snapshot, raw):
            keep_near(snapshot, key, reservation, raw, NEGATIVE, ms_left, started)
        else:
            near.abandon(key, reservation)
        return NOT_A_HIT
    value = plain(snapshot, raw)
    if value is NOT_A_HIT:  # sorted out on the miss path, or served stale
        near.abandon(key, reservation)
        return NOT_A_HIT
    snapshot.count_hit()
    keep_near(snapshot, key, reservation, raw, value, ms_left, started)
    return value


def after_read(  # noqa: PLR0917  # the two lookups' own locals, passed on
    snapshot: Snapshot,
    key: str,
    started: float,
    asked: bool,
    raw: bytes | None,
    error: Exception | None,
    commands: Commands | None,
    wrapped: Any,
    args: Any,
    kwargs: Any,
    *,
    told: bool = False,
) -> CallResult[Any] | LateRead | Miss:
    """What a call whose read was not a plain hit does next, for both lookups and ``many()``.

    A :class:`CallResult` to return now (a marker, an outage copy, a late read
    served without a refresh); a :class:`~memofill.late.LateRead` served now
    whose refresh is handed off; or the :class:`~memofill.misses.Miss` to run,
    with the stale bytes it may serve if its fill fails. ``told``: the breaker
    already counted ``error`` (one ``MGET`` that failed for several keys).
    """
    stale, behind = None, None
    if raw is not None and (snapshot.late is not None or snapshot.marks.top):  # top: see plain
        behind = behind_marks(snapshot, raw)
        raw, late = sort_read(snapshot, key, raw)
        if late is not None:
            if late.result is not None:
                return late if late.hand_off(commands, wrapped, args, kwargs) else late.result
            stale, raw = late.stale, None
    served = served_without_fill(snapshot, key, asked, raw, error, told=told)
    if served is not None:
        return served
    return Miss(
        snapshot, key, started, commands, error, wrapped, args, kwargs, stale=stale, behind=behind
    )


def behind_marks(snapshot: Snapshot, raw: bytes) -> str | None:
    """Which marks put the value read behind: ``"dataset"``, ``"tags"``, or ``None``.

    Its dataset's own marks (an ``invalidate_dataset``, or the meta hash born
    again) are told first; then its tags' (:func:`by_tags` raised ``snapshot``'s).
    What the miss's record tells operators (``behind``), never what it decides.
    """
    if raw[:2] != HEADED:
        return None
    try:
        stamp = int(raw[STAMP], 16)
    except ValueError:
        return None
    if stamp <= snapshot.generations.of(snapshot.key).top:
        return "dataset"
    return "tags" if stamp <= snapshot.marks.top else None


def served_without_fill(
    snapshot: Snapshot,
    key: str,
    asked: bool,
    raw: bytes | None,
    error: Exception | None,
    *,
    told: bool = False,
) -> CallResult[Any] | None:
    """A result that needs no fill, or ``None`` to fill.

    Redis not asked (breaker open, no client): the locally kept value, if any
    (see :func:`outage_copy`).
    Bytes the codec cannot read may be a negative marker (a hit on ``None``), an
    error marker (the last fill failed: raise at once), or corruption or another
    schema (a miss that the fill overwrites). A failed ``GET`` is told to the breaker
    when Redis seems unreachable and serves the locally kept value when there is one;
    one refused by a full pool goes on to the fill, which waits for a connection.
    """
    codec = snapshot.values.codec
    if not asked or error is not None:
        if error is not None and is_unreachable(error) and not told:
            snapshot.breaker.failed(timed_out=is_timeout(error))
        value = outage_copy(snapshot, key)
        if value is None or value is NEGATIVE or value is CORRUPT or isinstance(value, ErrorMarker):
            return None
        return counted(snapshot, value, FALLBACK_HIT)
    if raw is None or raw[:2] == OLD_HEADED:  # a release before stamps wrote it: refilled
        return None
    special = decode_special(raw)
    if special is NEGATIVE:
        return counted(snapshot, None, HIT)
    if isinstance(special, ErrorMarker):
        raise FillError(snapshot.key, key, special.error)
    why = "corrupt bytes"
    if codec is not JSON:
        why = f"bytes that {codec!r} cannot decode (written before a change of type?)"
    logger.warning(
        "%s under %s (%d bytes): treated as a miss",
        why,
        key,
        len(raw),
        extra={"dataset": snapshot.key, "redis_key": key},
    )
    return None


def counted(snapshot: Snapshot, value: Any, name: str) -> CallResult[Any]:
    snapshot.counters.add(snapshot.key, name)
    return CallResult(value, name, False)
