"""Whole-dataset invalidation: the marks one process knows, and what they reject.

Every fill stamps its value with Redis's own clock (``TIME``, µs), read in the
lock's round trip before its fetch begins (:mod:`memofill.coordinator`).
``invalidate_dataset`` runs one script on the meta hash ``<prefix>#meta``: it
records Redis's clock as the dataset's mark (``hard:<dataset>``, or
``soft:<dataset>``), one µs past the mark before if the clock has not moved past
it, so marks never go backward. A value stamped at or before its dataset's hard
mark began its fetch before the invalidation (even if it landed afterwards) and
is never served again; it is ignored until its own TTL removes it. At or before
a soft mark only, it is stale: a dataset with ``stale_s`` serves it while exactly
one caller refreshes it, and one without treats it as behind a hard mark. O(1)
whatever the number of keys.

Losing marks makes values less servable, never more. The hash records when it
was **born** (Redis's clock) and the server's ``run_id``; a hash that is missing
(a restart without persistence, a ``DEL``, an eviction) or from another run (a
restart, perhaps from an older snapshot) is born again, and every value stamped
at or before ``born`` is behind a mark in every dataset: refilled, never revived.
A process's marks only move forward, whatever it reads.

Each process keeps the marks in memory (:class:`Generations`) and reads the
hash again at most every ``meta_check_ms``, and before its first hit; the read
(``READ_META_SCRIPT``) sends the version it knows and gets
the whole hash back only when it changed, so its cost is flat in the number of
datasets and processes. Where a near-cache listener runs, the meta key is
tracked too, and a change reaches the process in milliseconds. This module
decides; it does no I/O.

Tags (:mod:`memofill.tags`) are marked the same way, in the tags hash, which every
tagged read reads beside its value.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from memofill.codec import STAMP
from memofill.freshness import EARLY, EXPIRED, STALE

#: The fields of the meta hash besides the marks: when it was born, its server's run, its version.
BORN = "born"
VERSION = "v"
HARD = "hard:"
SOFT = "soft:"


class Marks:
    """One dataset's marks as this process knows them: cells the hit path reads without a lock.

    Changed in place, so that a decorated function holds its dataset's cell and
    its hit path pays one attribute read and one comparison (``top``).
    """

    __slots__ = ("explicit", "hard", "soft", "top")

    def __init__(self) -> None:
        #: A value must be stamped after this to be served at all. It is the dataset's hard
        #: mark in µs, or when the meta hash was born if later; 0 before the hash was read.
        self.hard = 0
        #: A value must be stamped after this to be served fresh, 0 for no soft mark.
        self.soft = 0
        #: The higher of the two; a value stamped after it is current.
        self.top = 0
        #: Whether the dataset was invalidated (a mark of its own, not ``born``): bytes
        #: without a header, which carry no stamp, are then behind it.
        self.explicit = False

    def set(self, hard: int, soft: int, explicit: bool) -> bool:
        """Move the marks forward to ``hard`` and ``soft``; whether they changed.

        A mark never goes back: the higher of what is held and what is given stays.
        """
        hard, soft = max(hard, self.hard), max(soft, self.soft)
        explicit = explicit or self.explicit
        if (hard, soft, explicit) == (self.hard, self.soft, self.explicit):
            return False
        self.hard, self.soft, self.explicit = hard, soft, explicit
        self.top = max(hard, soft)
        return True

    def behind(self, stamp: int | None, serves_stale: bool) -> str | None:
        """Whether a value stamped ``stamp`` is current (``None``), stale or expired.

        The last two as :data:`~memofill.freshness.STALE` and
        :data:`~memofill.freshness.EXPIRED`. A value without a header
        (``None``: a marker, or bytes written by hand or by an older release) is
        behind the dataset's own marks, not the hash's birth. Behind a soft mark
        only, it is stale where the dataset serves stale values (``serves_stale``),
        and expired where not.
        """
        if stamp is None:
            return EXPIRED if self.explicit else None
        if stamp <= self.hard:
            return EXPIRED
        if stamp <= self.soft:
            return STALE if serves_stale else EXPIRED
        return None


class Generations:
    """The marks of one instance's datasets, as this process last read them."""

    def __init__(self, check_s: float) -> None:
        #: How often the hash is read again, at most (``meta_check_ms``).
        self.check_s = check_s
        #: Until when (clock time) the marks are current, which is the time of the last
        #: read that Redis answered plus ``check_s``: a call that starts at or before it is
        #: judged by them (with ``check_s`` 0, only calls that started when it was read),
        #: and one that starts later reads them first. 0.0 reads them at the next call.
        self.next_check = 0.0
        #: When (clock time) the last read failed, Redis being unreachable or too slow. A
        #: blocking caller that started before shares that failure rather than waiting for
        #: a read of its own.
        self.failed_at = 0.0
        #: Redis's clock in µs when this process last read it. It is no later than now, so a
        #: fill that takes no lock stamps its value with it.
        self.clock_us = 0
        #: The hash's version as last read (``born:v``); the next read sends it.
        self.version = ""
        #: When the hash was born, in µs as last read. Every value stamped before is behind.
        self.born = 0
        #: Counts this process's ``invalidate()`` calls: a miss that starts after one joins no
        #: fill in flight that began before it (``misses.flight``).
        self.local = 0
        #: Dataset -> its marks; a cell made on first use stays (functions hold it).
        self.marks: dict[str, Marks] = {}
        #: Called when the marks changed (the near copies are dropped).
        self.on_change: Callable[[], object] = lambda: None
        #: Called when this process invalidated a tag (the copies of tagged datasets go).
        self.on_tag_change: Callable[[], object] = lambda: None
        #: Whether the hash was read (or tried) once; until then blocking callers wait for it.
        self.known = False
        #: Why the last read was refused (an ACL without the script's commands), else ``None``.
        self.unread: str | None = None
        #: The datasets whose callers were told so, at ERROR, once each.
        self.told_unread: set[str] = set()
        #: Held by the blocking caller that reads the hash when it is due; the others wait.
        self.first = threading.Lock()
        #: The due read in flight on each event loop, which that loop's callers await.
        self.first_reads: dict[object, Any] = {}
        _live.add(self)

    def of(self, dataset: str) -> Marks:
        """The marks of ``dataset``, kept up to date in place (``born`` already counted)."""
        marks = self.marks.get(dataset)
        if marks is None:
            marks = self.marks.setdefault(dataset, Marks())
            marks.set(self.born, 0, False)
        return marks

    def expire(self) -> None:
        """Something changed the hash (the listener saw it): read it at the next call."""
        self.next_check = 0.0
        self.on_change()

    def loaded(self, reply: Any, error: str | None = None, *, now: float) -> None:
        """Take what ``READ_META_SCRIPT`` returned (``None``: no reply).

        ``[clock, version]`` while the version known is current, else ``[clock,
        version, the hash as a flat list]``; ``error`` names why there is no reply.
        A read Redis refused (``error``) leaves the process blind until it is told
        (``meta_reads.tell_unread``); one Redis did not answer leaves
        the marks due, so no value is judged by them until a read succeeds.
        """
        self.unread = error
        if reply is None:
            if error is not None:
                self.next_check = now + self.check_s
            self.known = True
            return
        self.next_check = now + self.check_s
        clock_us, version = _number(reply[0]), _text(reply[1])
        changed = False
        if len(reply) > 2 and version != self.version:
            changed = self._take(reply[2])
            self.version = version
        # The marks first, then the clock: a fill that begins meanwhile stamps no later.
        self.clock_us = max(self.clock_us, clock_us)
        self.known = True  # last: a caller that sees it finds the marks in place
        if changed:
            self.on_change()

    def _take(self, flat: Any) -> bool:
        """Take the marks of the hash (``HGETALL`` as a script returns it); whether any moved."""
        pairs = zip(flat[::2], flat[1::2], strict=True) if isinstance(flat, list) else ()
        items = list(flat.items()) if isinstance(flat, dict) else list(pairs)
        born, read = 0, dict[str, list[int]]()
        for raw_field, raw_value in items:
            name, number = _text(raw_field), _number(raw_value)
            if name == BORN:
                born = number
            elif name.startswith((HARD, SOFT)):
                dataset = name.partition(":")[2]
                read.setdefault(dataset, [0, 0])[name.startswith(SOFT)] = number
        self.born = max(self.born, born)
        changed = False
        for dataset in {*self.marks, *read}:
            hard, soft = read.get(dataset, (0, 0))
            explicit = bool(hard or soft)
            changed = self.of(dataset).set(max(hard, self.born), soft, explicit) or changed
        return changed

    def invalidated(self, dataset: str, mark: int, soft: bool = False) -> None:
        """This process invalidated ``dataset`` at ``mark``: it knows at once."""
        self.clock_us = max(self.clock_us, mark)
        if soft:
            self.of(dataset).set(0, mark, True)
        else:
            self.of(dataset).set(mark, 0, True)
        self.on_change()

    def tag_invalidated(self, mark: int) -> None:
        """This process invalidated a tag at ``mark``: it knows at once.

        A miss that starts after it joins no fill in flight that began before it
        (``local`` parts them, as it does after ``invalidate()``): that fill's value
        may bear the tag, and its fetch began before the mark.
        """
        self.clock_us = max(self.clock_us, mark)
        self.local += 1
        self.on_tag_change()  # near and outage copies bearing it must not outlive the call

    def stamp(self) -> int:
        """The stamp of a fill that takes no lock (which reads Redis's clock): one µs past the
        clock last read, 0 (refused) when none was.

        Sound: its fetch begins at least a round trip after Redis answered that
        read, so no later than Redis's clock then; a mark made in that same µs was
        made before the fetch began.
        """
        return self.clock_us + 1 if self.clock_us else 0

    def heard_clock(self, clock_us: int) -> None:
        """Redis's clock read elsewhere (a key's tomb): fills stamp no earlier than it."""
        self.clock_us = max(self.clock_us, clock_us)


_live: weakref.WeakSet[Generations] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A lock a parent thread held at the fork would never be released in the child."""
    for generations in list(_live):
        generations.first = threading.Lock()
        generations.first_reads = {}


os.register_at_fork(after_in_child=_after_fork_in_child)


def mark_field(dataset: str, soft: bool) -> str:
    """The meta hash field of ``dataset``'s hard or soft mark."""
    return (SOFT if soft else HARD) + dataset


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def _number(raw: Any) -> int:
    """A number of the hash, 0 for what is not one: the hash is read, never trusted blindly."""
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def amended(kind: str, marks: Marks, raw: bytes, serves_stale: bool) -> str:
    """``kind`` (a :func:`~memofill.freshness.verdict` of headed ``raw``) as the marks amend it.

    Below a hard mark (or a soft one, without ``stale_s``) a value is expired
    whatever its clock says, and never served, not even on error; below a soft
    mark only, a value still fresh by the clock is stale, served while one refreshes.
    """
    try:
        stamp: int | None = int(raw[STAMP], 16)
    except ValueError:
        stamp = None
    behind = marks.behind(stamp, serves_stale)
    if behind == EXPIRED:
        return EXPIRED
    if behind == STALE and kind == EARLY:
        return STALE
    return kind


def invalidate_dataset(
    commands: Any, meta_key: str, generations: Generations, dataset: str, soft: bool
) -> Any:
    """Mark ``dataset`` invalidated in Redis and tell this process; the mark (Redis µs).

    The one invalidation :meth:`memofill.Memofill.invalidate_dataset` and a
    function's ``invalidate_dataset`` both make, on ``commands`` (which return a
    value, or an awaitable of it on the asyncio client, then so does this).
    """
    reply = commands.invalidate_dataset(meta_key, mark_field(dataset, soft))
    if not inspect.isawaitable(reply):
        generations.invalidated(dataset, int(reply), soft)
        return int(reply)

    async def finish() -> int:
        mark = int(await reply)
        generations.invalidated(dataset, mark, soft)
        return mark

    return finish()


def invalidate_tag(  # noqa: PLR0917  # invalidate_dataset's arguments, and how long to keep
    commands: Any, tags_key: str, generations: Generations, tag: str, soft: bool, keep_ms: int
) -> Any:
    """Mark ``tag`` invalidated in Redis and tell this process; the mark (Redis µs).

    As :func:`invalidate_dataset`: a value from the blocking client's ``commands``,
    an awaitable of it from the asyncio client's. ``keep_ms``: how long the mark is
    kept (:meth:`memofill.tags.TagIndex.keep_ms`).
    """
    reply = commands.invalidate_tag(tags_key, tag, soft, keep_ms)
    if not inspect.isawaitable(reply):
        generations.tag_invalidated(int(reply))
        return int(reply)

    async def finish() -> int:
        mark = int(await reply)
        generations.tag_invalidated(mark)
        return mark

    return finish()


#: ``meta_check_ms`` when none is given: a second.
DEFAULT_CHECK_MS = 1000
