"""Whole-dataset invalidation: the generation marks one process knows, and what they reject.

``invalidate_dataset`` runs one script on the meta hash ``<prefix>#meta``: it
bumps a counter ``seq`` and records the new value as the dataset's mark
(``hard:<dataset>``, or ``soft:<dataset>``). Every fill writes, in its value's
header, the ``seq`` its process knew when the miss began. A value whose ``seq``
is below its dataset's hard mark began its fetch before the invalidation (or in
a process that had not heard of it yet) and is never served again; it is simply
ignored until its own TTL removes it. Below a soft mark only, it is stale: a
dataset with ``stale_s`` serves it while exactly one caller refreshes it, and
one without treats it as below a hard mark. O(1) whatever the number of keys,
and no clock is compared: a fill that straddles the invalidation carries the
older number and is rejected even if it lands afterwards.

Each process keeps the hash in memory (:class:`Generations`) and reads it again
(one ``HGETALL``) at most every ``meta_check_ms``, and before its first hit;
where a near-cache listener runs, the meta key is tracked too, and a change
reaches the process in milliseconds. This module decides; it does no I/O.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from memofill.codec import SEQ as SEQ_FIELD
from memofill.freshness import EARLY, EXPIRED, STALE

#: The field of the meta hash that counts invalidations.
SEQ = "seq"
HARD = "hard:"
SOFT = "soft:"


class Marks:
    """One dataset's marks as this process knows them: cells the hit path reads without a lock.

    Changed in place, so that a decorated function holds its dataset's cell and
    its hit path pays one attribute read and one test (``top``) while no
    invalidation has been made.
    """

    __slots__ = ("hard", "soft", "top")

    def __init__(self) -> None:
        #: The lowest ``seq`` a value must carry to be served at all, 0 for no mark.
        self.hard = 0
        #: The lowest ``seq`` a value must carry to be served fresh, 0 for no mark.
        self.soft = 0
        #: The higher of the two; a value at or above it is current.
        self.top = 0

    def set(self, hard: int, soft: int) -> bool:
        """Take new marks; whether they differ from those held."""
        if (hard, soft) == (self.hard, self.soft):
            return False
        self.hard, self.soft = hard, soft
        self.top = max(hard, soft)
        return True

    def behind(self, seq: int | None, serves_stale: bool) -> str | None:
        """Whether a value carrying ``seq`` is current (``None``), stale or expired.

        The last two as :data:`~memofill.freshness.STALE` and
        :data:`~memofill.freshness.EXPIRED`. A value without a header
        (``None``: written by an older release) is older than any mark. Below a
        soft mark only, it is stale where the dataset serves stale values
        (``serves_stale``), and expired where not.
        """
        if seq is None:
            return EXPIRED if self.top else None
        if seq < self.hard:
            return EXPIRED
        if seq < self.soft:
            return STALE if serves_stale else EXPIRED
        return None


class Generations:
    """The marks of one instance's datasets, as this process last read them."""

    def __init__(self, check_s: float) -> None:
        #: How often the hash is read again, at most (``meta_check_ms``).
        self.check_s = check_s
        #: The clock time of the next read; 0.0 reads it at the next call.
        self.next_check = 0.0
        #: The last ``seq`` known: what a fill beginning now records.
        self.seq = 0
        #: Dataset -> its marks; a cell made on first use stays (functions hold it).
        self.marks: dict[str, Marks] = {}
        #: Called when the marks changed (the near copies are dropped).
        self.on_change: Callable[[], object] = lambda: None
        #: Whether the hash was read (or tried) once; until then blocking callers wait for it.
        self.known = False
        #: Held by the blocking caller that reads the hash the first time.
        self.first = threading.Lock()
        #: The first read in flight on each event loop, which that loop's callers await.
        self.first_reads: dict[object, Any] = {}
        _live.add(self)

    def of(self, dataset: str) -> Marks:
        """The marks of ``dataset``, kept up to date in place."""
        marks = self.marks.get(dataset)
        if marks is None:
            marks = self.marks.setdefault(dataset, Marks())
        return marks

    def claim(self, now: float) -> bool:
        """Whether this caller reads the hash again now; the others go on with the marks known.

        Claimed for the next interval at once, so that a hundred concurrent
        callers send one ``HGETALL``, not a hundred.
        """
        if now < self.next_check:
            return False
        self.next_check = now + self.check_s
        return True

    def expire(self) -> None:
        """Something changed the hash (the listener saw it): read it at the next call."""
        self.next_check = 0.0
        self.on_change()

    def loaded(self, reply: Mapping[Any, Any] | None, now: float) -> None:
        """Take the hash as ``HGETALL`` returned it (``None``: it could not be read)."""
        self.next_check = now + self.check_s
        if reply is None:
            self.known = True
            return
        seq = 0
        read: dict[str, list[int]] = {}
        for raw_field, raw_value in reply.items():
            name = _text(raw_field)
            try:
                number = int(raw_value)
            except (TypeError, ValueError):
                continue  # not memofill's: the hash is read, never trusted blindly
            if name == SEQ:
                seq = number
            elif name.startswith((HARD, SOFT)):
                dataset = name.partition(":")[2]
                read.setdefault(dataset, [0, 0])[name.startswith(SOFT)] = number
        # What is known first, then the marks: a fill that begins meanwhile records no less.
        self.seq = max(self.seq, seq)
        changed = False
        for dataset in {*self.marks, *read}:
            hard, soft = read.get(dataset, (0, 0))
            changed = self.of(dataset).set(hard, soft) or changed
        self.known = True  # last: a caller that sees it finds the marks in place
        if changed:
            self.on_change()

    def invalidated(self, dataset: str, seq: int, soft: bool = False) -> None:
        """This process invalidated ``dataset`` at ``seq``: it knows at once."""
        self.seq = max(self.seq, seq)
        marks = self.of(dataset)
        if soft:
            marks.set(marks.hard, max(marks.soft, seq))
        else:
            marks.set(max(marks.hard, seq), marks.soft)
        self.on_change()


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


def amended(kind: str, marks: Marks, raw: bytes, serves_stale: bool) -> str:
    """``kind`` (a :func:`~memofill.freshness.verdict` of headed ``raw``) as the marks amend it.

    Below a hard mark (or a soft one, without ``stale_s``) a value is expired
    whatever its clock says, and never served, not even on error; below a soft
    mark only, a value still fresh by the clock is stale, served while one refreshes.
    """
    try:
        seq: int | None = int(raw[SEQ_FIELD], 16)
    except ValueError:
        seq = None
    behind = marks.behind(seq, serves_stale)
    if behind == EXPIRED:
        return EXPIRED
    if behind == STALE and kind == EARLY:
        return STALE
    return kind


def invalidate_dataset(
    commands: Any, meta_key: str, generations: Generations, dataset: str, soft: bool
) -> Any:
    """Mark ``dataset`` invalidated in Redis and tell this process; the new generation.

    The one invalidation :meth:`memofill.Memofill.invalidate_dataset` and a
    function's ``invalidate_dataset`` both make, on ``commands`` (which return a
    value, or an awaitable of it on the asyncio client, then so does this).
    """
    reply = commands.invalidate_dataset(meta_key, mark_field(dataset, soft))
    if not inspect.isawaitable(reply):
        generations.invalidated(dataset, int(reply), soft)
        return int(reply)

    async def finish() -> int:
        seq = int(await reply)
        generations.invalidated(dataset, seq, soft)
        return seq

    return finish()


#: ``meta_check_ms`` when none is given: a second.
DEFAULT_CHECK_MS = 1000
