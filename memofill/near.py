"""The one bounded in-process store, and its two serving rules: near copies and outage copies.

Each process keeps recent values in one :class:`LocalStore`, bounded in
entries and bytes, so that a value is never kept twice. An entry may be served
by either of two rules:

* **near** (datasets with ``near_ms``): while this process's invalidation
  listener is live (:mod:`memofill.listener`), and at most ``near_ms`` after
  the moment the value was read from Redis, and never past the value's own
  expiry in Redis. Served without asking Redis: a hit is a dict lookup and
  three comparisons. The listener drops an entry as soon as Redis says its key
  was written, and drops every entry at once (``epoch += 1``) when it loses its
  connection, is told of a flush, or reconnects.
* **outage**: while Redis is unreachable (the breaker is open or the ``GET``
  failed), until ``ttl_s + stale_if_error_s`` after the value's fetch began
  (the stored header's ``fetch_start_ms``, the time every process judges the
  value by; from when it was kept, for bytes without a header), and for at
  most :data:`MAX_LOCAL_TTL_S` after it was kept. Whoever keeps a copy passes
  that window (``Snapshot.outage_s``); re-keeping the
  same bytes on later hits never lengthens it.

The byte budget bounds what the entries really take in memory, whatever the
values' shape: stored bytes count as their length, and a near copy kept
decoded counts as an upper bound on its decoded size, worked out from the
bytes when it is kept (:func:`decoded_bytes`: every JSON mark may become an
object, a slot or a string's header). Counting decoded copies at their stored
size let ``[{}, {}, ...]`` (3 bytes an element, 72 decoded) grow a process by
23 times its budget.

The hit path reads :attr:`LocalStore.entries` without a lock; every change
(insertion, eviction, invalidation) takes the store's lock. Eviction is CLOCK
(FIFO with a second chance): a near hit sets the entry's ``visited`` bit, and
an insertion that needs room moves visited entries to the back once instead of
dropping them, so hot keys stay without any bookkeeping on the hit itself.

A near copy is read from Redis with a placeholder put down first
(:meth:`LocalStore.reserve`): an invalidation that arrives while the read is in
flight removes the placeholder, and the read's value is then not kept. That
closes the race between the reply on the data connection and the invalidation
on the listener's.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs

from memofill.codec import HEADED, HEADER_LEN, NEGATIVE, read_header
from memofill.errors import ConfigurationError
from memofill.freshness import EXPIRED, wall_clock
from memofill.outcomes import NOT_A_HIT
from memofill.values import JSON, decode_stored

if TYPE_CHECKING:
    from memofill.generations import Marks
    from memofill.policy import Dataset
    from memofill.values import Values

logger = logging.getLogger("memofill")

#: The longest a value is served locally without Redis, whatever the dataset's TTL.
MAX_LOCAL_TTL_S = 30.0
#: The most values one process keeps (near and outage copies together), by default.
MAX_LOCAL_ENTRIES = 5000
#: The most bytes of values one process keeps, by default. Several worker processes with
#: this much fit a container of a few hundred MB with room to spare; a value over a quarter
#: of it is not kept.
MAX_LOCAL_BYTES = 32 * 1024 * 1024
#: What an entry costs beyond its key and its bytes: the dict slot, the entry, its floats.
ENTRY_OVERHEAD_BYTES = 200
#: What one JSON mark (``{ } [ ] , : "``) of stored bytes may take once decoded, beyond its own
#: byte: a container's object (two marks each), an element's slot and number object, half a
#: string's header. Measured (tracemalloc, CPython 3.13, orjson): at most 31 bytes a mark, for
#: deep nesting, ints past 256 and floats; 40 leaves room for the allocator's rounding.
DECODED_BYTES_PER_MARK = 40
#: What one JSON object may take beyond that when decoded into a typed value (a pydantic
#: model keeps a set of its fields beside its dict, about 480 bytes with two fields).
TYPED_OBJECT_BYTES = 512
#: A decoded ``str`` takes up to 4 bytes a character (any character past U+FFFF makes the
#: whole string so): an upper bound for stored bytes that are not all ASCII.
WIDE_TEXT_FACTOR = 4
_MARKS = b'{}[],:"'
#: Evictions are told at most this often, with their count since the last time.
EVICTION_LOG_INTERVAL_S = 60.0
#: How often a Redis hit refreshes the outage copy of its value, at most.
REFRESH_S = 1.0

_MISSING: Any = object()


@attrs.frozen
class NearCache:
    """How an instance keeps near copies (``Memofill(..., near=NearCache(...))``).

    Attributes:
        max_entries: the most entries the process's one local store keeps, near and
            outage copies together (``None``: :data:`~memofill.near.MAX_LOCAL_ENTRIES`).
        max_bytes: the most bytes it keeps (``None``: the instance's
            ``local_store_bytes``): stored bytes at their size, a near copy
            kept decoded at an upper bound of its size in memory
            (:func:`~memofill.near.decoded_bytes`), so the budget bounds what the process
            holds, whatever the values' shape.
        invalidation: ``"tracking"``: a listener connection is told of every write
            by Redis (``CLIENT TRACKING ... BCAST``), and copies are dropped within
            milliseconds; ``"ttl"``: no listener (fakeredis, a proxy without
            tracking), copies live their ``near_ms`` whatever happens in Redis.
        heartbeat_ms: how often the listener pings Redis; copies are served only
            while a ping sent at most twice this long ago has been answered.
        copy_on_hit: ``False`` (the default): a near hit returns the object kept,
            the same object to every caller, which must not change it; ``True``:
            the stored bytes are kept and decoded for each hit (a few µs more).
    """

    max_entries: int | None = None
    max_bytes: int | None = None
    invalidation: Literal["tracking", "ttl"] = "tracking"
    heartbeat_ms: int = 250
    copy_on_hit: bool = False

    def __attrs_post_init__(self) -> None:
        problems = []
        for name in ("max_entries", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                problems.append(f"{name}={value!r}: must be None or an int >= 0")
        if self.invalidation not in ("tracking", "ttl"):
            problems.append(f"invalidation={self.invalidation!r}: must be 'tracking' or 'ttl'")
        if not _is_int(self.heartbeat_ms) or not 10 <= self.heartbeat_ms <= 60_000:
            problems.append(f"heartbeat_ms={self.heartbeat_ms!r}: must be an int in 10..60000")
        if not isinstance(self.copy_on_hit, bool):
            problems.append(f"copy_on_hit={self.copy_on_hit!r}: must be a bool")
        if problems:
            raise ConfigurationError("NearCache: " + "; ".join(problems))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Entry:
    """One kept value: how it may be served near, and for outages."""

    __slots__ = (
        "epoch",
        "near_until",
        "outage_until",
        "owner",
        "refresh_after",
        "size",
        "value",
        "visited",
    )

    def __init__(  # noqa: PLR0917  # one slot each
        self,
        value: Any,
        owner: object,
        near_until: float,
        epoch: int,
        outage_until: float,
        refresh_after: float,
        size: int,
    ) -> None:
        #: The stored bytes, or the decoded object of a near copy (see ``owner``).
        self.value = value
        #: Who decoded ``value`` (a function's ``Values``), or ``None``
        #: for stored bytes: a near copy is served only to functions that decode alike.
        self.owner = owner
        #: The clock time after which the near rule no longer serves it (0.0 for never).
        self.near_until = near_until
        #: The store's epoch when the read that made it began.
        self.epoch = epoch
        self.outage_until = outage_until
        self.refresh_after = refresh_after
        self.size = size
        self.visited = False


class Listening(Protocol):
    """What the store asks of its invalidation listener (:class:`memofill.listener.Listener`)."""

    def ensure_running(self) -> None:
        """Start the listener in this process if it is not running."""

    def stop(self) -> None:
        """Stop listening and close the connection."""


#: ``live_until`` of a store whose copies need no listener (``invalidation="ttl"``).
ALWAYS = math.inf


class LocalStore:
    """Final key -> :class:`Entry`, bounded in bytes and entries; near and outage copies.

    When an insertion would pass either bound, entries are evicted from the
    oldest on, except that an entry hit since it was last passed over gets a
    second chance (CLOCK). Each eviction is counted (:attr:`evictions`,
    ``evicted_bytes``) and told on the ``memofill`` logger at INFO, at most once
    a minute. A value larger than a quarter of the byte budget is not kept at
    all (:attr:`too_large`): one huge value would otherwise push out every other.
    """

    def __init__(
        self,
        max_entries: int = MAX_LOCAL_ENTRIES,
        max_ttl_s: float = MAX_LOCAL_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = MAX_LOCAL_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_ttl_s = max_ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        #: Read it freely (the hit path does); change it through the methods.
        self.entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        #: What the entries cost, by :func:`entry_bytes`.
        self.bytes = 0
        #: Entries dropped to make room since the store was made.
        self.evictions = 0
        #: What those entries cost, by :func:`entry_bytes`.
        self.evicted_bytes = 0
        #: Values not kept because they alone were over a quarter of ``max_bytes``.
        self.too_large = 0
        #: Bumped to drop every near copy at once, since one of an earlier epoch is never served.
        self.epoch = 0
        #: Times every near copy was dropped for the listener (a lost, new or flushed
        #: connection), not for an invalidation.
        self.flushes = 0
        #: Times every entry was dropped because a dataset was invalidated.
        self.clears = 0
        #: The literal heads of the final keys of the datasets that bear tags, which
        #: tell the keys :meth:`drop_tagged` drops (a key of another dataset may share a
        #: head, and go too); every key until the instance's policies are known.
        self.tagged_heads: tuple[str, ...] = ("",)
        #: The clock time until which near copies may be served, as the listener's answered
        #: pings set it; 0.0 while it is not tracking, ``ALWAYS`` with no listener needed.
        self.live_until = ALWAYS
        #: The reads in flight for near copies, as key -> the reader's placeholder.
        self.pending: dict[str, object] = {}
        self.listener: Listening | None = None
        #: The keys whose invalidation means more than dropping a copy, and what to call then.
        self.watch: dict[str, Callable[[], object]] = {}
        self._told_evictions = 0
        self._told_at = -EVICTION_LOG_INTERVAL_S
        self._lock = threading.Lock()
        _live_stores.add(self)

    # -- outage copies ---------------------------------------------------------------------

    def put(self, key: str, value: Any, ttl_s: float) -> None:
        """Keep ``value`` (a value's stored bytes) for outages, ``ttl_s`` after its fetch began.

        ``ttl_s`` is the dataset's outage window (``ttl_s + stale_if_error_s``),
        counted from the fetch start in the value's header (see :func:`outage_left`),
        and at most ``max_ttl_s`` from now. It replaces any near copy of the key: a
        fill just wrote a new value, or a read found it; a value already past its
        window drops the key's copy and keeps nothing.
        """
        now = self._clock()
        left = min(outage_left(value, ttl_s), self.max_ttl_s)
        if left <= 0:
            with self._lock:
                self._drop(key)
            return
        entry = Entry(value, None, 0.0, -1, now + left, now + REFRESH_S, entry_bytes(key, value))
        with self._lock:
            self._insert(key, entry, now)

    def remember(self, key: str, value: Any, ttl_s: float) -> None:
        """:meth:`put` from the hit path: skipped while the kept copy is under a second old.

        Every hit would otherwise take the lock and reorder the map; a copy at
        most :data:`REFRESH_S` older than the last hit serves an outage as well.
        """
        entry = self.entries.get(key)
        if entry is None or entry.refresh_after <= self._clock():
            self.put(key, value, ttl_s)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value kept for outages, or ``default`` when there is none or it has expired."""
        entry = self.outage_entry(key)
        return default if entry is None else entry.value

    def outage_entry(self, key: str) -> Entry | None:
        """The entry the outage rule may serve for ``key``, or ``None``."""
        entry = self.entries.get(key)
        if entry is None or entry.outage_until <= self._clock():
            return None
        return entry

    def discard(self, key: str) -> None:
        """Forget ``key`` (after an invalidation)."""
        with self._lock:
            self._drop(key)

    # -- near copies -----------------------------------------------------------------------

    def reserve(self, key: str) -> tuple[object, int] | None:
        """Put down a placeholder before a read meant to make a near copy of ``key``.

        Returns ``(placeholder, epoch)`` to hand to :meth:`settle`, or ``None``
        while near copies cannot be made (the listener is not tracking yet: it
        is started here).
        """
        if not self._clock() < self.live_until:
            listener = self.listener
            if listener is not None:
                listener.ensure_running()
            return None
        placeholder = object()
        self.pending[key] = placeholder
        return placeholder, self.epoch

    def settle(  # noqa: PLR0917  # what the read found, in one call
        self,
        key: str,
        reservation: tuple[object, int],
        value: Any,
        owner: object,
        size: int,
        near_until: float,
        outage_s: float,
    ) -> None:
        """Keep what the read reserved by ``reservation`` found, unless it was invalidated.

        ``value`` was read from Redis; it is kept as a near copy until
        ``near_until`` (and for outages ``outage_s`` seconds from now, what is
        left of its window; 0 or less for none) only if
        its placeholder is still down and the epoch has not changed since: an
        invalidation that raced the read removed one or the other.
        """
        placeholder, epoch = reservation
        now = self._clock()
        outage_until = now + min(outage_s, self.max_ttl_s) if outage_s > 0 else 0.0
        entry = Entry(value, owner, near_until, epoch, outage_until, now + REFRESH_S, size)
        with self._lock:
            if self.pending.get(key) is not placeholder:
                return
            del self.pending[key]
            if epoch == self.epoch:
                self._insert(key, entry, now)

    def abandon(self, key: str, reservation: tuple[object, int]) -> None:
        """The reserved read made no near copy: lift its placeholder."""
        with self._lock:
            if self.pending.get(key) is reservation[0]:
                del self.pending[key]

    # -- what the listener reports ---------------------------------------------------------

    def invalidate(self, keys: Iterable[str]) -> None:
        """Redis says these keys were written: drop their near copies and placeholders.

        An outage copy of the key goes too: it is the value Redis no longer holds.
        """
        watched = []
        with self._lock:
            for key in keys:
                self.pending.pop(key, None)
                self._drop(key)
                if key in self.watch:
                    watched.append(self.watch[key])
        for call in watched:
            call()

    def flush(self) -> None:
        """Every near copy is suspect (a flush, a lost or new connection): drop them all at once.

        O(1): the epoch moves on, and copies of an older epoch are never served
        near; they still serve outages, which no listener vouched for anyway.
        """
        with self._lock:
            self.epoch += 1
            self.flushes += 1
            self.pending.clear()

    def drop_tagged(self) -> None:
        """A tag was invalidated: drop the copies, near and outage alike, and the reads in
        flight of every key of a dataset that bears tags (:attr:`tagged_heads`).

        A tag names no keys, so every such copy goes; the copies of datasets without
        tags stay. A scan of the store, under its lock.
        """
        heads = self.tagged_heads
        with self._lock:
            self.clears += 1
            for key in [key for key in self.pending if key.startswith(heads)]:
                del self.pending[key]
            for key in [key for key in self.entries if key.startswith(heads)]:
                self._drop(key)

    def clear(self) -> None:
        """Drop every entry, near and outage alike (a dataset was invalidated)."""
        with self._lock:
            self.epoch += 1
            self.clears += 1
            self.pending.clear()
            self.entries.clear()
            self.bytes = 0

    def tracking(self, live: bool) -> None:
        """The listener started (``True``) or stopped (``False``) tracking; copies flushed."""
        self.live_until = self.live_until if live else 0.0
        self.flush()

    def heard(self, until: float) -> None:
        """The listener heard a ping answered: copies may be served until ``until``."""
        self.live_until = max(self.live_until, until)

    def attach(self, listener: Listening | None, *, needed: bool = True) -> None:
        """Serve near copies as ``listener`` vouches for them, from its first answered ping.

        ``None`` with ``needed``: no near copy is served (none can be vouched
        for yet); ``None`` without: copies need no listener (``invalidation="ttl"``).
        """
        old, self.listener = self.listener, listener
        if old is not None:
            old.stop()
        self.live_until = ALWAYS if listener is None and not needed else 0.0
        self.flush()

    # -- bookkeeping -----------------------------------------------------------------------

    def _insert(self, key: str, entry: Entry, now: float) -> None:
        """Insert under the lock, evicting as the bounds say."""
        self._drop(key)
        if entry.size > self.max_bytes // 4:
            self.too_large += 1
            return
        self.entries[key] = entry
        self.bytes += entry.size
        entries = self.entries
        chances = len(entries)
        while len(entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest, victim = entries.popitem(last=False)
            if victim.visited and chances > 0 and oldest != key:
                victim.visited = False  # hit since it was last passed: once more to the back
                entries[oldest] = victim
                chances -= 1
                continue
            self.bytes -= victim.size
            self.evictions += 1
            self.evicted_bytes += victim.size
        if self.evictions > self._told_evictions and now - self._told_at >= (
            EVICTION_LOG_INTERVAL_S
        ):
            self._tell_evictions(now)

    def _drop(self, key: str) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size

    def _tell_evictions(self, now: float) -> None:
        logger.info(
            "local store full (%d entries, %d of %d bytes): %d older entries dropped since "
            "the last report; values kept near and for Redis outages are bounded by max_bytes",
            len(self.entries),
            self.bytes,
            self.max_bytes,
            self.evictions - self._told_evictions,
            extra={"evictions": self.evictions, "evicted_bytes": self.evicted_bytes},
        )
        self._told_evictions, self._told_at = self.evictions, now

    def serving_near(self) -> bool:
        """Whether near copies may be served now: the listener was heard, or none is needed."""
        return self._clock() < self.live_until

    def __len__(self) -> int:
        return len(self.entries)


def outage_left(value: Any, outage_s: float) -> float:
    """How much longer, in seconds, the outage rule may serve ``value``: ``outage_s`` past
    its fetch start.

    Stored bytes with a header are timed from its ``fetch_start_ms`` (wall-clock
    ms, as every process judges the value; a start in the future counts as now),
    so a copy a process read late, or keeps again on every hit, is served no
    longer than a fresh read of Redis would be. Anything else is timed from now.
    """
    if isinstance(value, bytes) and value[:2] == HEADED:
        header = read_header(value)
        if header is not None:
            return outage_s - max(0.0, wall_clock() - header.fetch_start_ms / 1000)
    return outage_s


def entry_bytes(key: str, value: Any) -> int:
    """What one kept entry of stored bytes costs against the byte budget."""
    size = len(value) if isinstance(value, (bytes, bytearray, str)) else 0
    return len(key) + size + ENTRY_OVERHEAD_BYTES


def decoded_bytes(raw: bytes, typed: bool = False) -> int:
    """An upper bound on what stored JSON bytes take in memory once decoded, whatever the shape.

    The bytes themselves (4 a byte unless all ASCII: a string decodes to up to 4
    bytes a character), plus :data:`DECODED_BYTES_PER_MARK` for each JSON mark,
    plus :data:`TYPED_OBJECT_BYTES` for each object with ``typed`` (decoded
    into classes rather than dicts). A mark inside a string is counted too: an
    overestimate, never an underestimate. One ``bytes.translate`` and one
    ``isascii``: about 30 µs for 56 kB, a tenth of decoding them.
    """
    marks = len(raw) - len(raw.translate(None, _MARKS))
    size = len(raw) if raw.isascii() else WIDE_TEXT_FACTOR * len(raw)
    size += DECODED_BYTES_PER_MARK * marks
    if typed:
        size += TYPED_OBJECT_BYTES * raw.count(b"{")
    return size


_live_stores: weakref.WeakSet[LocalStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child starts with unheld locks and no near copy it can trust.

    The parent's threads do not exist in the child, so a lock one of them held
    at the fork would never be released, and the parent's listener is not the
    child's: the child's first near read starts its own. Outage copies are plain
    data and still serve outages.
    """
    for store in list(_live_stores):
        store._lock = threading.Lock()
        store.pending = {}
        store.epoch += 1
        if store.listener is not None:
            store.live_until = 0.0


os.register_at_fork(after_in_child=_after_fork_in_child)


class Reader(Protocol):
    """What the serving rules read of a function (a :class:`~memofill.snapshot.Snapshot`)."""

    @property
    def near(self) -> LocalStore | None: ...
    @property
    def near_s(self) -> float: ...
    @property
    def near_copy(self) -> bool: ...
    @property
    def near_owner(self) -> object: ...
    @property
    def count_near(self) -> Callable[[], object]: ...
    @property
    def decode(self) -> Callable[[bytes], Any]: ...
    @property
    def ttl_s(self) -> float: ...
    @property
    def outage_s(self) -> float: ...
    @property
    def local_store(self) -> LocalStore: ...
    @property
    def marks(self) -> Marks: ...
    @property
    def dataset(self) -> Dataset: ...
    @property
    def values(self) -> Values: ...


def serve_near(reader: Reader, key: str, now: float) -> Any:
    """The near copy of ``key`` if the near rule serves it now, else :data:`NOT_A_HIT`.

    Lock-free: one dict lookup and the rule's comparisons (read within
    ``near_ms`` and before the value expires, no flush since, the listener
    heard within two heartbeats, decoded as this function decodes).
    """
    near = reader.near
    assert near is not None  # called only for functions whose dataset keeps near copies
    # The listener applies an invalidation before the answer to any later ping, and a flush
    # before anything after it: reading its word first, then the entry, a copy the listener
    # has just dropped can never be served on the strength of a later answer.
    live_until, epoch = near.live_until, near.epoch
    entry = near.entries.get(key)
    if (
        entry is None
        or not now < entry.near_until
        or entry.epoch != epoch
        or not now < live_until
        or entry.owner is not reader.near_owner
    ):
        return NOT_A_HIT
    entry.visited = True
    reader.count_near()
    value = entry.value
    if value is NEGATIVE:
        return None
    if not reader.near_copy:
        return value
    return reader.decode(value[HEADER_LEN:] if value[:2] == HEADED else value)


def keep_near(  # noqa: PLR0917  # what one reserved read found
    reader: Reader,
    key: str,
    reservation: tuple[object, int],
    raw: bytes,
    value: Any,
    ms_left: object,
    started: float,
) -> None:
    """Keep what a reserved read found: ``value``, decoded from ``raw`` (or :data:`NEGATIVE`).

    The copy is kept until ``started + near_ms``, or until the value expires
    in Redis (``ms_left``, the ``PTTL`` read with it), or until its header says
    it is no longer fresh, whichever is first (``started`` is before the read,
    so all three are conservative): whether a value is stale, and who
    refreshes it, is decided on reads of Redis, never on a copy. A negative
    marker is kept within the first two bounds, for near hits only.
    """
    near = reader.near
    assert near is not None  # called only for functions whose dataset keeps near copies
    until = started + reader.near_s
    if isinstance(ms_left, int) and ms_left >= 0:
        until = min(until, started + ms_left / 1000)
    size = entry_bytes(key, raw)
    if not reader.near_copy and value is not NEGATIVE and size <= near.max_bytes // 4:
        # Kept decoded: counted at what it takes in memory (one over a quarter of the
        # budget by its bytes alone is not kept anyway, so its bytes are not read).
        typed = reader.values.codec is not JSON
        size = len(key) + decoded_bytes(raw, typed) + ENTRY_OVERHEAD_BYTES
    if value is NEGATIVE:
        near.settle(key, reservation, NEGATIVE, reader.near_owner, size, until, 0.0)
        return
    header = read_header(raw)
    outage_s = reader.outage_s
    if header is not None:
        wall = wall_clock()
        until = min(until, started + header.soft_until_ms / 1000 - wall)
        outage_s -= max(0.0, wall - header.fetch_start_ms / 1000)  # as outage_left() says
    # Kept for outages too: the same entry, so the value is not kept twice.
    kept = raw if reader.near_copy else value
    near.settle(key, reservation, kept, reader.near_owner, size, until, outage_s)


def outage_copy(reader: Reader, key: str) -> Any:
    """The value the outage rule serves for ``key``, or ``None``.

    Stored bytes are decoded afresh, so no two callers hold the same object;
    a near copy kept decoded is the object near hits share, and only for
    functions that decode alike. A value fetched before a dataset invalidation
    is none (near copies go when the marks change; a fill that straddled the
    change keeps its bytes here after it).
    """
    entry = reader.local_store.outage_entry(key)
    if entry is None:
        return None
    if entry.owner is None:
        kept = entry.value
        if kept is NEGATIVE:
            return None
        marks = reader.marks
        if marks.top:  # kept by a fill that began before an invalidation: never served
            header = read_header(kept)
            stamp = None if header is None else header.stamp
            if marks.behind(stamp, reader.dataset.stale_s > 0) == EXPIRED:
                return None
        return decode_stored(reader.values.codec, kept)
    return entry.value if entry.owner is reader.values else None
