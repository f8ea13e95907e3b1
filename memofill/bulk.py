"""Bulk calls: ``fn.many(items)`` reads every key in one round trip, then fills what it missed.

Rules:

- Items become calls once, before Redis is asked: a mapping is a call's keyword
  arguments; anything else is the value of the key's one field (a key with
  another number of fields takes mappings only). Every item's key is built
  first, so a bad item fails the whole call, with the ``TypeError`` a single
  call with its arguments gets, before anything is read or fetched.
- Each item gets its own result, in the order given. An item whose key another
  item of the call has is read and judged with it: one key, one fill. Where
  that key was not a plain hit, the later item is a call made after the
  first's ended (a hit on what it stored), or, for a coroutine function, joins
  its fill in flight.
- Hits: near copies first, then one ``MGET`` of the other keys (on a cluster,
  one per node, sent together). Each value is judged exactly as a single
  call's (the marks read first when due, the same hit rule) and counted as
  one hit.
- What is not a plain hit (a miss, a stale or late value, a marker, a value
  judged by marks that could not be read) goes on as a single call's read
  that found it (:func:`~memofill.lookup.after_read`): a fill coordinated
  across the fleet, a stale value served while one caller refreshes it, an
  outage copy. The ``MGET`` failing is every key's read failing, told to the
  breaker once.
- The fills of a call run one after another for a blocking function, and
  concurrently, at most :data:`CONCURRENT_FILLS` at once, for a coroutine
  function.
- With a batch function (``@fn.batch``), the misses whose fills take the lock
  are driven together (:mod:`memofill.lockstep`): their locks in one round trip,
  one batch call for the keys this call leads, given the items as they were
  passed to ``many()``, their writes and releases in one round trip each. Keys
  others lead are waited for as a single call waits; a key taken over from a
  failed leader is fetched by the function itself. A batch that raises, or
  returns another number of values than it was given items, fails every key it
  was to fetch as a single fetch that raised fails its key.
- Caching off (``disabled()``): each item calls the function.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

import attrs

from memofill.commands import Commands
from memofill.errors import BatchError
from memofill.late import LateRead, serve_all_async, serve_all_sync
from memofill.lockstep import run_together_async, run_together_sync
from memofill.lookup import (
    after_read,
    by_tags,
    hit,
    hits,
    judged_by,
    lookup_async,
    lookup_sync,
    settle_async,
    settle_sync,
)
from memofill.meta_reads import MarksUnread, read_marks_async, read_marks_sync
from memofill.misses import Miss, bypass, refresh_all_async, refresh_all_sync
from memofill.near import serve_near
from memofill.outcomes import NOT_A_HIT, CallResult
from memofill.snapshot import BYPASS, Snapshot
from memofill.steps import Result, Steps

#: The most fills one asyncio ``many()`` runs at once.
CONCURRENT_FILLS = 16

#: One item as a call: positional and keyword arguments.
Call = tuple[tuple[Any, ...], dict[str, Any]]


def _keys(
    snapshot: Snapshot, instance: Any, items: list[Any]
) -> tuple[list[str], list[Call] | None]:
    """Each item's key, and its call; ``None`` for the calls where one loop built the keys
    (:attr:`~memofill.snapshot.Snapshot.page_keys`): a page of hits needs none."""
    page_keys = snapshot.page_keys
    if page_keys is not None and instance is None:
        keys = page_keys(items)
        if keys is not None:
            return keys, None
    calls = calls_of(snapshot, instance, items)
    key_of = snapshot.key_of
    return [key_of(instance, args, kwargs) for args, kwargs in calls], calls


def calls_of(snapshot: Snapshot, instance: Any, items: list[Any]) -> list[Call]:
    """The calls ``items`` stand for (see the module's rules); one clear line for bad input.

    A value of the key's one field is passed by position where its parameter
    comes first (the key is then built as fast as a single call's), else by name.
    """
    fields = snapshot.key_fields
    first = 0 if instance is None else 1  # a bound method's self is not among its arguments
    by_position = len(fields) == 1 and fields[0].position == first
    no_keywords: dict[str, Any] = {}
    calls: list[Call] = []
    for item in items:
        if type(item) is not dict and (type(item) in _SCALARS or not _mapping(item)):
            if by_position:
                calls.append(((item,), no_keywords))
            elif len(fields) == 1:
                calls.append(((), {fields[0].name: item}))
            else:
                raise TypeError(
                    f"{_name(snapshot)}.many(): {item!r} is not a mapping of keyword arguments, "
                    f"which a key with {len(fields)} fields ({snapshot.key}) needs for each item"
                )
        else:
            calls.append(((), dict(item)))
    return calls


#: Item types that are never a mapping: checked without ``isinstance`` against an ABC.
_SCALARS = frozenset({str, int, float, bytes, tuple})


def _mapping(item: Any) -> bool:
    return isinstance(item, Mapping)


def _name(snapshot: Snapshot) -> str:
    function = snapshot.current_function()
    return getattr(function, "__qualname__", None) or type(function).__qualname__


def many_sync(
    snapshot: Snapshot, instance: Any, wrapped: Any, items: Iterable[Any], batch: Any = None
) -> list[Any]:
    """:meth:`~memofill.CachedDataset.many` of a blocking function (``batch``: its batch)."""
    items = _listed(snapshot, items)
    commands = snapshot.gate() if snapshot.gated else snapshot.commands
    if commands is BYPASS:
        unread = calls_of(snapshot, instance, items)
        return [bypass(snapshot, wrapped, args, kwargs, False) for args, kwargs in unread]
    keys, calls = _keys(snapshot, instance, items)
    started = time.monotonic()
    if commands is not None and started > snapshot.generations.next_check:
        read_marks_sync(snapshot, commands, started)
    served = _near(snapshot, keys, started)
    reads = [key for key in dict.fromkeys(keys) if key not in served]
    raws: dict[str, Any] = {}
    judges: dict[str, tuple[Snapshot, Any]] = {}
    error: Exception | None = None
    asked = _may_ask(snapshot, commands) and bool(reads)
    if asked:
        assert commands is not None  # _may_ask
        try:
            if snapshot.tags_of is None:
                raws = dict(zip(reads, commands.mget(reads), strict=True))
            else:
                assert calls is not None  # a tagged dataset's keys are built call by call
                fields, tag_fields = _tag_fields(snapshot, instance, calls, keys)
                reply = commands.mget_tagged(reads, snapshot.tags_key, tag_fields)
                raws, judges = _tag_judged(snapshot, reads, fields, tag_fields, reply)
        except Exception as exc:  # any failure of the client, as a single call's GET
            error = exc
        else:
            _answered(snapshot)
            if not (
                started <= snapshot.generations.next_check
                or read_marks_sync(snapshot, commands, time.monotonic())
            ):
                raws, error = {}, MarksUnread()
    read = (started, served, raws, judges, asked, error, commands, wrapped)
    judged, pending = _judged(snapshot, instance, items, calls, keys, *read)
    if not pending:
        return judged
    led = _batched(judged, pending, batch, commands)
    if led:
        assert commands is not None  # _batched
        misses = [judged[position].then for position in led]
        fetch_all = _batch_fetch(snapshot, batch, instance, [items[i] for i in led], misses)
        with snapshot.metrics.events.fill_scope(snapshot.key):
            ended = run_together_sync(
                [miss.steps() for miss in misses],
                commands,
                fetch_all,
                lambda index: misses[index].fetch,
                snapshot.breaker,
            )
        for position, miss, result in zip(led, misses, ended, strict=True):
            judged[position] = _Ended(miss, miss.ended(result))
    stale = _stale(judged, pending, batch, commands)
    if stale:
        assert commands is not None  # _stale
        lates = [judged[position].then for position in stale]
        fetch_all = _batch_fetch(snapshot, batch, instance, [items[i] for i in stale], None)
        given = serve_all_sync(lates, _refresh_together_sync(lates, commands, fetch_all))
        for position, late in zip(stale, given, strict=True):
            judged[position] = late.value
        refreshed = set(stale)
        pending = [position for position in pending if position not in refreshed]
    for position in pending:
        item = judged[position]
        if isinstance(item, _Ended):
            judged[position] = item.miss.finish(item.result, False).value
        elif isinstance(item, _Fill):
            judged[position] = settle_sync(item.snapshot, item.key, item.then).value
        else:
            judged[position] = lookup_sync(
                snapshot, instance, wrapped, *item.call, with_outcome=False
            )
    return judged


async def many_async(
    snapshot: Snapshot, instance: Any, wrapped: Any, items: Iterable[Any], batch: Any = None
) -> list[Any]:
    """:func:`many_sync` for coroutine functions, on the asyncio client."""
    items = _listed(snapshot, items)
    commands = snapshot.gate() if snapshot.gated else snapshot.commands
    if commands is BYPASS:
        unread = calls_of(snapshot, instance, items)
        return [await bypass(snapshot, wrapped, args, kwargs, False) for args, kwargs in unread]
    keys, calls = _keys(snapshot, instance, items)
    started = time.monotonic()
    if commands is not None and started > snapshot.generations.next_check:
        await asyncio.shield(read_marks_async(snapshot, commands, started))
    served = _near(snapshot, keys, started)
    reads = [key for key in dict.fromkeys(keys) if key not in served]
    raws: dict[str, Any] = {}
    judges: dict[str, tuple[Snapshot, Any]] = {}
    error: Exception | None = None
    asked = _may_ask(snapshot, commands) and bool(reads)
    if asked:
        assert commands is not None  # _may_ask
        try:
            if snapshot.tags_of is None:
                raws = dict(zip(reads, await commands.mget(reads), strict=True))
            else:
                assert calls is not None  # a tagged dataset's keys are built call by call
                fields, tag_fields = _tag_fields(snapshot, instance, calls, keys)
                reply = await commands.mget_tagged(reads, snapshot.tags_key, tag_fields)
                raws, judges = _tag_judged(snapshot, reads, fields, tag_fields, reply)
        except Exception as exc:  # any failure of the client, as a single call's GET
            error = exc
        else:
            _answered(snapshot)
            if started > snapshot.generations.next_check:
                await asyncio.shield(read_marks_async(snapshot, commands, time.monotonic()))
            if started > snapshot.generations.next_check:
                raws, error = {}, MarksUnread()
    read = (started, served, raws, judges, asked, error, commands, wrapped)
    judged, pending = _judged(snapshot, instance, items, calls, keys, *read)
    if not pending:
        return judged
    led = _batched(judged, pending, batch, commands)
    if led:
        assert commands is not None  # _batched
        misses = [judged[position].then for position in led]
        fetch_all = _batch_fetch_async(snapshot, batch, instance, [items[i] for i in led], misses)
        with snapshot.metrics.events.fill_scope(snapshot.key):
            ended = await run_together_async(
                [miss.steps() for miss in misses],
                commands,
                fetch_all,
                lambda index: misses[index].fetch,
                snapshot.breaker,
            )
        for position, miss, result in zip(led, misses, ended, strict=True):
            judged[position] = _Ended(miss, miss.ended(result))
    stale = _stale(judged, pending, batch, commands)
    if stale:
        assert commands is not None  # _stale
        lates = [judged[position].then for position in stale]
        fetch_all = _batch_fetch_async(snapshot, batch, instance, [items[i] for i in stale], None)
        given = await serve_all_async(lates, _refresh_together_async(lates, commands, fetch_all))
        for position, late in zip(stale, given, strict=True):
            judged[position] = late.value
        refreshed = set(stale)
        pending = [position for position in pending if position not in refreshed]
    limit = asyncio.Semaphore(CONCURRENT_FILLS)

    async def settled(item: Any) -> Any:
        if isinstance(item, _Ended):
            return item.miss.finish(item.result, False).value
        async with limit:
            if isinstance(item, _Fill):
                return (await settle_async(item.snapshot, item.key, item.then)).value
            return await lookup_async(snapshot, instance, wrapped, *item.call, with_outcome=False)

    values = await asyncio.gather(*(settled(judged[position]) for position in pending))
    for position, value in zip(pending, values, strict=True):
        judged[position] = value
    return judged


@attrs.frozen
class _Fill:
    """An item that is not a plain hit: what a single call's read that found it does next."""

    key: str
    then: CallResult[Any] | LateRead | Miss
    #: What judges it: the function's snapshot, or one raised to its tags' marks.
    snapshot: Snapshot


@attrs.frozen
class _Ended:
    """An item whose key this call's batch filled (or tried to): its miss and how it ended."""

    miss: Miss
    result: Result


@attrs.frozen
class _Again:
    """An item whose key an earlier item of the call fills: a call made after that one."""

    call: Call


def _judged(  # noqa: PLR0917  # the read's own locals, passed on
    snapshot: Snapshot,
    instance: Any,
    items: list[Any],
    calls: list[Call] | None,
    keys: list[str],
    started: float,
    served: dict[str, Any],
    raws: dict[str, Any],
    judges: dict[str, tuple[Snapshot, Any]],
    asked: bool,
    error: Exception | None,
    commands: Commands | None,
    wrapped: Any,
) -> tuple[list[Any], list[int]]:
    """Each item's value where it is a plain hit, else a :class:`_Fill` or an :class:`_Again`;
    and the positions of the latter, which are all there is left to do for a page of hits.

    Written once for both kinds of function, which only settle the rest their way.
    """
    found: dict[str, Any] = {}
    if raws and not judges:  # one snapshot judges every value: judged in one loop
        values, missed = hits(snapshot, list(raws), list(raws.values()), started)
        if not missed and len(values) == len(keys):
            return values, []  # a page of distinct hits, the commonest page
        found = dict(zip(raws, values, strict=True))
    if calls is None:  # the keys were built in one loop: the calls are made where needed
        calls = calls_of(snapshot, instance, items)
    judged: list[Any] = []
    pending: list[int] = []
    told = False  # the breaker counts a failed MGET once
    filled: set[str] = set()
    seen: set[str] = set()
    for (args, kwargs), key in zip(calls, keys, strict=True):
        value = served.get(key, NOT_A_HIT) if served else NOT_A_HIT
        judge, later = judges.get(key, (snapshot, None)) if judges else (snapshot, None)
        if value is NOT_A_HIT:
            if found:
                value = found.get(key, NOT_A_HIT)
                if value is not NOT_A_HIT and key in seen:
                    snapshot.count_hit()  # another item of one key: a hit of its own
                seen.add(key)
            else:
                value = hit(judge, key, raws.get(key), started)
        if value is not NOT_A_HIT:
            judged.append(value)
            continue
        pending.append(len(judged))
        if key in filled:
            value = _Again((args, kwargs))
        else:
            filled.add(key)
            if later is not None:
                judge = judged_by(judge, later)
            then = after_read(
                judge, key, started, asked, raws.get(key), error, commands, wrapped, args,
                kwargs, told=told,
            )  # fmt: skip
            told = error is not None
            value = _Fill(key, then, judge)
        judged.append(value)
    return judged, pending


def _listed(snapshot: Snapshot, items: Iterable[Any]) -> list[Any]:
    """``items`` as a list (a batch is given them as they were passed); one line if not iterable."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(
            f"{_name(snapshot)}.many() takes an iterable of items (a list, say), "
            f"not {type(items).__name__}"
        )
    return items if type(items) is list else list(items)


def _batched(
    judged: list[Any], pending: list[int], batch: Any, commands: Commands | None
) -> list[int]:
    """The positions whose fills a batch runs: misses whose fill takes the lock in Redis.

    The others (no batch, an outage, a legacy dataset without a lock, a value
    served stale) go on as a single call's.
    """
    if batch is None or commands is None:
        return []
    return [
        position
        for position in pending
        if isinstance(item := judged[position], _Fill)
        and isinstance(item.then, Miss)
        and item.then.plan.redis_ok
        and item.then.plan.cache_fill is not None
    ]


def _stale(
    judged: list[Any], pending: list[int], batch: Any, commands: Commands | None
) -> list[int]:
    """The positions of values served stale (or early) whose refresh a batch runs: each
    handed off by its read (at most one per key and process, as for single calls)."""
    if batch is None or commands is None:
        return []
    return [
        position
        for position in pending
        if isinstance(item := judged[position], _Fill) and isinstance(item.then, LateRead)
    ]


def _refresh_together_sync(
    lates: list[LateRead], commands: Commands, fetch_all: Callable[[list[int]], list[Any]]
) -> Callable[[], list[Result]]:
    """The refreshes ``lates`` handed off, run together: one batch call for their values."""
    jobs = [late.job for late in lates if late.job is not None]
    assert len(jobs) == len(lates)  # each handed its refresh off (_stale)

    def drive(fills: list[Steps]) -> list[Result]:
        breaker = lates[0].snapshot.breaker
        return run_together_sync(fills, commands, fetch_all, lambda i: jobs[i].fetch, breaker)

    return lambda: refresh_all_sync(jobs, drive)


def _refresh_together_async(
    lates: list[LateRead],
    commands: Commands,
    fetch_all: Callable[[list[int]], Awaitable[list[Any]]],
) -> Callable[[], Coroutine[Any, Any, list[Result]]]:
    """:func:`_refresh_together_sync` for a coroutine batch."""
    jobs = [late.job for late in lates if late.job is not None]
    assert len(jobs) == len(lates)  # each handed its refresh off (_stale)

    async def drive(fills: list[Steps]) -> list[Result]:
        breaker = lates[0].snapshot.breaker
        return await run_together_async(
            fills, commands, fetch_all, lambda i: jobs[i].fetch, breaker
        )

    return lambda: refresh_all_async(jobs, drive)


def _batch_fetch(
    snapshot: Snapshot, batch: Any, instance: Any, items: list[Any], misses: list[Miss] | None
) -> Callable[[list[int]], list[Any]]:
    """The batch's call for the fills at some indexes: one call, their items, checked values."""

    def fetch_all(indexes: list[int]) -> list[Any]:
        asked = [items[index] for index in indexes]
        started = time.monotonic()
        try:
            values = batch(asked) if instance is None else batch(instance, asked)
        finally:
            _timed(misses, indexes, started)
        return _checked(snapshot, batch, values, len(asked))

    return fetch_all


def _batch_fetch_async(
    snapshot: Snapshot, batch: Any, instance: Any, items: list[Any], misses: list[Miss] | None
) -> Callable[[list[int]], Awaitable[list[Any]]]:
    """:func:`_batch_fetch` for a coroutine batch."""

    async def fetch_all(indexes: list[int]) -> list[Any]:
        asked = [items[index] for index in indexes]
        started = time.monotonic()
        try:
            values = await (batch(asked) if instance is None else batch(instance, asked))
        finally:
            _timed(misses, indexes, started)
        return _checked(snapshot, batch, values, len(asked))

    return fetch_all


def _timed(misses: list[Miss] | None, indexes: list[int], started: float) -> None:
    """Each key fetched by one batch call took that call's time (a refresh records its own)."""
    if misses is None:
        return
    elapsed_ms = (time.monotonic() - started) * 1000
    for index in indexes:
        misses[index].fetch_ms = elapsed_ms


def _checked(snapshot: Snapshot, batch: Any, values: Any, asked: int) -> list[Any]:
    """The batch's values as a list of one per item; a clear error naming it otherwise."""
    if isinstance(values, (list, tuple)) and len(values) == asked:
        return list(values)
    got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
    raise BatchError(
        f"{_name(snapshot)}'s batch {getattr(batch, '__qualname__', batch)!r} returned {got} "
        f"for {asked} items: it must return a list of one value per item, in the order given"
    )


def _tag_fields(
    snapshot: Snapshot, instance: Any, calls: list[Call], keys: list[str]
) -> tuple[dict[str, list[str]], list[str]]:
    """Each key's tag fields (``t:<tag>``), built from its call as a single call builds them,
    and every field of the page once, to read beside its ``MGET``."""
    tags_of = snapshot.tags_of
    assert tags_of is not None  # a tagged dataset's
    fields: dict[str, list[str]] = {}
    for (args, kwargs), key in zip(calls, keys, strict=True):
        if key not in fields:
            fields[key] = tags_of(instance, args, kwargs)
    return fields, list(dict.fromkeys(field for each in fields.values() for field in each))


def _tag_judged(
    snapshot: Snapshot,
    reads: list[str],
    fields: dict[str, list[str]],
    tag_fields: list[str],
    reply: list[Any],
) -> tuple[dict[str, Any], dict[str, tuple[Snapshot, Any]]]:
    """The values a tagged read of a page found, and what judges each (:func:`by_tags`)."""
    values, born, marks = reply[0], reply[1], dict(zip(tag_fields, reply[2:], strict=True))
    raws: dict[str, Any] = {}
    judges: dict[str, tuple[Snapshot, Any]] = {}
    for key, raw in zip(reads, values, strict=True):
        raws[key] = raw
        _, judge, later = by_tags(snapshot, [raw, born, *(marks[f] for f in fields[key])])
        judges[key] = (judge, later)
    return raws, judges


def _near(snapshot: Snapshot, keys: list[str], started: float) -> dict[str, Any]:
    """The keys served from near copies (datasets with ``near_ms``), with their values.

    Asked for every item, so that each counts as one near hit.
    """
    if snapshot.near is None:
        return {}
    served: dict[str, Any] = {}
    for key in keys:
        value = serve_near(snapshot, key, started)
        if value is not NOT_A_HIT:
            served.setdefault(key, value)
    return served


def _may_ask(snapshot: Snapshot, commands: Any) -> bool:
    breaker = snapshot.breaker
    return commands is not None and not (breaker.open_until and breaker.skips())


def _answered(snapshot: Snapshot) -> None:
    if snapshot.breaker.open_until:  # Redis answered this probe (or the cool-down is over)
        snapshot.breaker.reset()
