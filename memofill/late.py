"""A read whose header says it is not a plain fresh hit: stale, due early, or behind a mark.

Rules:

- Only bytes with a header are judged here, and only for a dataset with a stale
  window, an early refresh or a mark (a plain dataset's hit never comes here).
- What a header's times mean is :mod:`memofill.freshness`'s to say; what a mark
  rejects is :mod:`memofill.generations`'s. This module acts on the verdict: serve
  now (``hit`` or ``stale_hit``) and hand a refresh off, or give the miss path the
  bytes it may serve if its fill fails (``stale_if_error``), or nothing.
- A refresh is handed off at most once per key and process at a time, and never
  while another process holds the key's lock (:class:`~memofill.refreshing.Refreshes`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

from memofill.codec import (
    CORRUPT,
    FETCH_START,
    HEADED,
    HEADER_LEN,
    SOFT_UNTIL,
    STAMP,
    VIEW_FROM_BYTES,
    Header,
    decode_special,
    is_marker,
    read_header,
)
from memofill.commands import Commands
from memofill.freshness import EARLY, EXPIRED, STALE, STALE_IF_ERROR, verdict, wall_clock
from memofill.generations import amended
from memofill.misses import Refresh, fetcher
from memofill.outcomes import HIT, STALE_HIT, CallResult, Outcome
from memofill.snapshot import Snapshot
from memofill.steps import Result


def sort_read(snapshot: Snapshot, key: str, raw: bytes) -> tuple[bytes | None, LateRead | None]:
    """What bytes that were not a plain hit are, where they may be stale or behind a mark.

    A value with a header: a :class:`LateRead` (stale, due early, or fetched
    before a dataset invalidation). A marker with a header is never stale: a
    miss (``None``) once a mark is at or after its stamp, else left to the miss
    path, which serves it. Without a header, once the dataset was invalidated: a
    marker is left to the miss path too (it carries no stamp); a value is older
    than any invalidation, and a miss.
    """
    if is_marker(raw):
        return (None, None) if marker_behind(snapshot, raw) else (raw, None)
    if raw[:2] == HEADED:
        return raw, LateRead(snapshot, key, raw)
    if snapshot.marks.explicit and decode_special(raw) is CORRUPT:
        return None, None
    return raw, None


def marker_behind(snapshot: Snapshot, raw: bytes) -> bool:
    """Whether a marker is behind its dataset's (or its tags') marks: stamped at or before
    one, soft or hard (a cached ``None`` or failure is never served stale). A marker
    without a header carries no stamp, and is never behind."""
    if raw[:2] != HEADED:
        return False
    try:
        return int(raw[STAMP], 16) <= snapshot.marks.top
    except ValueError:  # foreign bytes that only look like a header
        return True


class LateRead:
    """A read whose header says it is not a plain fresh hit: stale, due early, or invalidated.

    A value below its dataset's hard mark (or a soft one, without ``stale_s``) is
    expired whatever its clock says; below a soft mark only, it is stale.

    ``result`` is what the caller gets at once (a hit, or a ``stale_hit``), when
    the value may be served; else ``stale`` holds the bytes a miss serves if its
    fill fails (within ``stale_if_error_s``), or ``None`` (a plain miss).
    """

    def __init__(self, snapshot: Snapshot, key: str, raw: bytes) -> None:
        self.snapshot, self.key, self.raw = snapshot, key, raw
        dataset = snapshot.dataset
        self.now_ms = wall_clock() * 1000
        # The two header fields every late read needs (read_header's four cost a stale hit
        # a microsecond); the rest only if this read hands a refresh off.
        try:
            soft_until_ms, fetch_start_ms = int(raw[SOFT_UNTIL], 16), int(raw[FETCH_START], 16)
        except ValueError:
            soft_until_ms = fetch_start_ms = -1
        self.soft_until_ms, self.fetch_start_ms = soft_until_ms, fetch_start_ms
        if soft_until_ms < 0 or len(raw) < HEADER_LEN:
            kind = EXPIRED  # foreign bytes that only look like a header: a miss refills them
        else:
            stale_ms, if_error_ms = dataset.stale_s * 1000, dataset.stale_if_error_s * 1000
            kind = verdict(self.now_ms, soft_until_ms, stale_ms, if_error_ms)
            if snapshot.marks.top:  # its stamp is read only once the marks were
                kind = amended(kind, snapshot.marks, raw, stale_ms > 0)
        self.trigger = "early" if kind == EARLY else "stale"
        self.result: CallResult[Any] | None = None
        if kind in (EARLY, STALE):
            # Markers carry no header: these bytes are a value, read as a fresh hit reads one.
            body = raw[HEADER_LEN:] if len(raw) < VIEW_FROM_BYTES else snapshot.view(raw)
            try:
                value = snapshot.decode(body)
            except Exception:  # corrupt bytes, or another schema: a miss overwrites them
                pass
            else:
                name = HIT if kind == EARLY else STALE_HIT
                snapshot.counters.add(snapshot.key, name)
                self.result = CallResult(value, name, False)
        self.stale = raw if kind == STALE_IF_ERROR else None
        #: The refresh this read hands off, once :meth:`hand_off` made one.
        self.job: Refresh | None = None

    def hand_off(self, commands: Commands | None, wrapped: Any, args: Any, kwargs: Any) -> bool:
        """Make the refresh to run (:attr:`job`), unless one is in flight here or another
        process holds the lock; whether there is one."""
        refreshes = self.snapshot.refreshes
        if commands is None or not refreshes.claim(self.key, self.fetch_start_ms):
            return False
        header = read_header(self.raw)
        if header is None:  # fields past the two read are not hex: refreshed as a fill would
            header = Header(self.fetch_start_ms, self.soft_until_ms, 0, 0)
        stale_age_ms = self.now_ms - self.soft_until_ms
        fetch = fetcher(self.snapshot, wrapped, args, kwargs)
        # What a tracer links the refresh to; copied only when one is listening.
        caller = contextvars.copy_context() if self.snapshot.metrics.events.arounds else None
        self.job = Refresh(
            self.snapshot, self.key, commands, fetch, self.trigger, header, stale_age_ms, caller
        )
        return True

    def run_sync(self) -> CallResult[Any]:
        """Serve now and run the refresh handed off: inline, or on the pool (counted if dropped)."""
        job = self.job
        assert job is not None  # only a served read hands a refresh off
        [served] = serve_all_sync([self], lambda: [job.run_sync()])
        return served

    async def run_async(self) -> CallResult[Any]:
        """:meth:`run_sync` for asyncio callers: inline, or as a task of its own."""
        job = self.job
        assert job is not None  # only a served read hands a refresh off

        async def run() -> list[Result]:
            return [await job.run_async()]

        [served] = await serve_all_async([self], run)
        return served

    def dropped(self) -> None:
        """The pool had no room for this read's refresh: counted, and left to the next read."""
        snapshot, job = self.snapshot, self.job
        assert job is not None  # only a served read hands a refresh off
        snapshot.counters.add(snapshot.key, Outcome.REFRESH_DROPPED.value)
        snapshot.metrics.refresh_counted(snapshot.key, job.trigger, Outcome.REFRESH_DROPPED.value)

    def served(self) -> CallResult[Any]:
        """What the caller gets while the refresh runs elsewhere: the value read."""
        assert self.result is not None  # only a served read hands a refresh off
        return self.result

    def after_inline(self, result: Result) -> CallResult[Any]:
        """What the caller that refreshed inline returns: the new value, when there is one."""
        served = self.served()
        if result.outcome is Outcome.REFRESH_FILL:
            return CallResult(result.value, served.outcome, False)
        return served


def serve_all_sync(lates: list[LateRead], run: Callable[[], list[Result]]) -> list[CallResult[Any]]:
    """Serve each of one caller's late reads now, and run their refreshes (``run``, which
    runs them all): inline, or as one job on the pool, dropped whole when it has no room."""
    refreshes = lates[0].snapshot.refreshes
    if refreshes.inline:
        return [late.after_inline(result) for late, result in zip(lates, run(), strict=True)]
    if not refreshes.submit([late.key for late in lates], run):
        for late in lates:
            late.dropped()
    return [late.served() for late in lates]


async def serve_all_async(
    lates: list[LateRead], run: Callable[[], Coroutine[Any, Any, list[Result]]]
) -> list[CallResult[Any]]:
    """:func:`serve_all_sync` for asyncio callers: inline, or as one task of its own."""
    refreshes = lates[0].snapshot.refreshes
    if refreshes.inline:
        ran = await run()
        return [late.after_inline(result) for late, result in zip(lates, ran, strict=True)]
    refreshes.spawn(run())
    return [late.served() for late in lates]
