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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs

from memofill.commands import Commands
from memofill.errors import BatchError
from memofill.fallback import Breaker
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
from memofill.misses import Miss, Refresh, bypass, refresh_all_async, refresh_all_sync
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
    page = _Page(snapshot, instance, wrapped, items, batch, commands)
    if page.marks_due:
        read_marks_sync(snapshot, page.redis, page.started)
    if page.asks():
        try:
            page.took(page.request())
        except Exception as exc:  # any failure of the client, as a single call's GET
            page.failed(exc)
        else:
            if page.marks_due and not read_marks_sync(snapshot, page.redis, time.monotonic()):
                page.unread()
    if not page.judge():
        return page.judged
    led = page.led()
    if led:
        misses = page.misses(led)
        driving = page.driving(led, misses, _batch_fetch)
        with snapshot.metrics.events.fill_scope(snapshot.key):
            page.ended(led, run_together_sync([miss.steps() for miss in misses], *driving))
    stale = page.stale()
    if stale:
        lates, jobs = page.lates(stale)
        driving = page.driving(stale, jobs, _batch_fetch)

        def run() -> list[Result]:
            return refresh_all_sync(jobs, lambda fills: run_together_sync(fills, *driving))

        page.refreshed(stale, serve_all_sync(lates, run))
    judged = page.judged
    for position in page.pending:
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
    page = _Page(snapshot, instance, wrapped, items, batch, commands)
    if page.marks_due:
        await asyncio.shield(read_marks_async(snapshot, page.redis, page.started))
    if page.asks():
        try:
            page.took(await page.request())
        except Exception as exc:  # any failure of the client, as a single call's GET
            page.failed(exc)
        else:
            if page.marks_due:
                await asyncio.shield(read_marks_async(snapshot, page.redis, time.monotonic()))
            if page.marks_due:
                page.unread()
    if not page.judge():
        return page.judged
    led = page.led()
    if led:
        misses = page.misses(led)
        driving = page.driving(led, misses, _batch_fetch_async)
        with snapshot.metrics.events.fill_scope(snapshot.key):
            ended = await run_together_async([miss.steps() for miss in misses], *driving)
        page.ended(led, ended)
    stale = page.stale()
    if stale:
        lates, jobs = page.lates(stale)
        driving = page.driving(stale, jobs, _batch_fetch_async)

        async def drive(fills: list[Steps]) -> list[Result]:
            return await run_together_async(fills, *driving)

        page.refreshed(stale, await serve_all_async(lates, lambda: refresh_all_async(jobs, drive)))
    limit = asyncio.Semaphore(CONCURRENT_FILLS)

    async def settled(item: Any) -> Any:
        if isinstance(item, _Ended):
            return item.miss.finish(item.result, False).value
        async with limit:
            if isinstance(item, _Fill):
                return (await settle_async(item.snapshot, item.key, item.then)).value
            return await lookup_async(snapshot, instance, wrapped, *item.call, with_outcome=False)

    judged = page.judged
    values = await asyncio.gather(*(settled(judged[position]) for position in page.pending))
    for position, value in zip(page.pending, values, strict=True):
        judged[position] = value
    return judged


class _Page:
    """One ``many()`` between its round trips: every decision both drivers share.

    The drivers (:func:`many_sync`, :func:`many_async`) only send what it asks
    for and hand back what came: the marks' read, the page's read, the batch's
    fills and refreshes, and the settling of the rest. Made with its keys built,
    before Redis is asked.
    """

    def __init__(  # noqa: PLR0917  # a many() call's own arguments
        self,
        snapshot: Snapshot,
        instance: Any,
        wrapped: Any,
        items: list[Any],
        batch: Any,
        commands: Commands | None,
    ) -> None:
        self.snapshot, self.instance, self.wrapped = snapshot, instance, wrapped
        self.items, self.batch, self.commands = items, batch, commands
        self.keys: list[str]
        #: Each item's call; ``None`` where one loop built the keys (made when needed).
        self.calls: list[Call] | None
        self.keys, self.calls = _keys(snapshot, instance, items)
        self.started = time.monotonic()
        #: Keys served from near copies, with their values.
        self.served: dict[str, Any] = {}
        #: The distinct keys the page reads from Redis, and what it found under them.
        self.reads: list[str] = []
        self.raws: dict[str, Any] = {}
        #: For a tagged dataset: what judges each key read (:func:`by_tags`).
        self.judges: dict[str, tuple[Snapshot, Any]] = {}
        self.asked = False
        self.error: Exception | None = None
        #: Each item's value, or what it does next; and the positions of the latter.
        self.judged: list[Any] = []
        self.pending: list[int] = []
        #: A tagged page's fields: each key's, and all of them once.
        self.fields: dict[str, list[str]] = {}
        self.tag_fields: list[str] = []

    @property
    def redis(self) -> Commands:
        """The commands, where the page asks Redis (a due read, its read)."""
        assert self.commands is not None  # asked only where there are commands
        return self.commands

    @property
    def marks_due(self) -> bool:
        """Whether the marks are to be read (again) before a value is judged."""
        return self.commands is not None and self.started > self.snapshot.generations.next_check

    def asks(self) -> bool:
        """Serve the near copies (each item counts as one near hit); whether Redis is asked
        for the other keys (not while the breaker skips it)."""
        snapshot, served, started = self.snapshot, self.served, self.started
        if snapshot.near is not None:
            for key in self.keys:
                value = serve_near(snapshot, key, started)
                if value is not NOT_A_HIT:
                    served.setdefault(key, value)
        # No comprehension without near copies: it is a frame of its own before Python 3.12.
        reads = list(dict.fromkeys(self.keys))
        self.reads = [key for key in reads if key not in served] if served else reads
        breaker = snapshot.breaker
        skipped = bool(breaker.open_until) and breaker.skips()
        self.asked = self.commands is not None and not skipped and bool(self.reads)
        return self.asked

    def request(self) -> Any:
        """The page's read: one ``MGET`` (and its tags' marks), its reply or an awaitable."""
        snapshot, redis = self.snapshot, self.commands
        assert redis is not None  # asks()
        if snapshot.tags_of is None:
            return redis.mget(self.reads)
        assert self.calls is not None  # a tagged dataset's keys are built call by call
        self.fields, self.tag_fields = _tag_fields(snapshot, self.instance, self.calls, self.keys)
        return redis.mget_tagged(self.reads, snapshot.tags_key, self.tag_fields)

    def took(self, reply: Any) -> None:
        """What the read found (Redis answered it)."""
        snapshot = self.snapshot
        if snapshot.tags_of is None:
            self.raws = dict(zip(self.reads, reply, strict=True))
        else:
            self.raws, self.judges = _tag_judged(
                snapshot, self.reads, self.fields, self.tag_fields, reply
            )
        if snapshot.breaker.open_until:  # Redis answered this probe (or the cool-down is over)
            snapshot.breaker.reset()

    def failed(self, error: Exception) -> None:
        """The read failed: every key's read failed (told to the breaker once)."""
        self.error = error

    def unread(self) -> None:
        """Redis answered, but the marks that judge the values could not be read."""
        self.raws, self.error = {}, MarksUnread()

    def judge(self) -> bool:
        """Each item's value where it is a plain hit, else a :class:`_Fill` or an
        :class:`_Again`; whether any item is one of those (a page of hits is done)."""
        snapshot, raws, keys, started = self.snapshot, self.raws, self.keys, self.started
        found: dict[str, Any] = {}
        if raws and not self.judges:  # one snapshot judges every value: judged in one loop
            values, missed = hits(snapshot, list(raws), list(raws.values()), started)
            if not missed and len(values) == len(keys):
                self.judged = values  # a page of distinct hits, the commonest page
                return False
            found = dict(zip(raws, values, strict=True))
        if self.calls is None:  # the keys were built in one loop: the calls are made now
            self.calls = calls_of(snapshot, self.instance, self.items)
        served, judges, error = self.served, self.judges, self.error
        judged, pending = self.judged, self.pending
        told = False  # the breaker counts a failed MGET once
        filled: set[str] = set()
        seen: set[str] = set()
        for (args, kwargs), key in zip(self.calls, keys, strict=True):
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
                    judge, key, started, self.asked, raws.get(key), error, self.commands,
                    self.wrapped, args, kwargs, told=told,
                )  # fmt: skip
                told = error is not None
                value = _Fill(key, then, judge)
            judged.append(value)
        return bool(pending)

    def led(self) -> list[int]:
        """The positions whose fills a batch runs: misses whose fill takes the lock in Redis.

        The others (no batch, an outage, a legacy dataset without a lock, a value
        served stale) go on as a single call's.
        """
        if self.batch is None or self.commands is None:
            return []
        return [
            position
            for position in self.pending
            if isinstance(item := self.judged[position], _Fill)
            and isinstance(item.then, Miss)
            and item.then.plan.redis_ok
            and item.then.plan.cache_fill is not None
        ]

    def misses(self, led: list[int]) -> list[Miss]:
        return [self.judged[position].then for position in led]

    def driving(
        self, positions: list[int], runs: list[Miss] | list[Refresh], batch_fetch: Any
    ) -> tuple[Commands, Any, Callable[[int], Any], Breaker]:
        """What :func:`~memofill.lockstep.run_together_sync` (or ``_async``) needs besides
        the steps of ``runs`` (the fills or refreshes of the items at ``positions``): the
        commands, one call of the batch for their fetches, each one's own fetch, the breaker."""
        items = [self.items[position] for position in positions]
        misses = [run for run in runs if isinstance(run, Miss)] or None  # timed by the batch
        fetch_all = batch_fetch(self.snapshot, self.batch, self.instance, items, misses)
        return self.redis, fetch_all, lambda index: runs[index].fetch, self.snapshot.breaker

    def ended(self, led: list[int], results: list[Result]) -> None:
        """How the fills at ``led`` ended."""
        for position, result in zip(led, results, strict=True):
            miss = self.judged[position].then
            self.judged[position] = _Ended(miss, miss.ended(result))

    def stale(self) -> list[int]:
        """The positions of values served stale (or early) whose refresh a batch runs: each
        handed off by its read (at most one per key and process, as for single calls)."""
        if self.batch is None or self.commands is None:
            return []
        return [
            position
            for position in self.pending
            if isinstance(item := self.judged[position], _Fill) and isinstance(item.then, LateRead)
        ]

    def lates(self, stale: list[int]) -> tuple[list[LateRead], list[Refresh]]:
        """The reads at ``stale`` and the refreshes they handed off."""
        lates: list[LateRead] = [self.judged[position].then for position in stale]
        return lates, [late.job for late in lates if late.job is not None]

    def refreshed(self, stale: list[int], given: list[CallResult[Any]]) -> None:
        """What the stale items were served; they are done."""
        for position, result in zip(stale, given, strict=True):
            self.judged[position] = result.value
        done = set(stale)
        self.pending = [position for position in self.pending if position not in done]


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


def _listed(snapshot: Snapshot, items: Iterable[Any]) -> list[Any]:
    """``items`` as a list (a batch is given them as they were passed); one line if not iterable."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(
            f"{_name(snapshot)}.many() takes an iterable of items (a list, say), "
            f"not {type(items).__name__}"
        )
    return items if type(items) is list else list(items)


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
