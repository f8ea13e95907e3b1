"""Hooks and scopes: what an application runs with every miss and refresh record, never a hit.

Rules:

- A hook or a scope is the application's code: one that raises is logged once, at
  ERROR with its traceback, and skipped from then on; it never fails a caller.
- Hooks and scopes are held in tuples replaced whole, so sending and entering read
  them without a lock; a hit reads neither.
- A fill's scope is entered in the caller's context, around the lock, the fetch and
  the write; a background refresh's where it runs, linked to the caller that
  handed it off (a tracer's span link), not nested in it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from memofill.outcomes import MissRecord

logger = logging.getLogger("memofill")


class RefreshLike(Protocol):
    """What :meth:`~memofill.metrics.Metrics.refreshed` reads of a background refresh's record."""

    @property
    def dataset(self) -> str: ...
    @property
    def trigger(self) -> str: ...
    #: One of :data:`REFRESH_OUTCOMES` (a ``str`` enum member will do).
    @property
    def outcome(self) -> str: ...
    @property
    def elapsed_ms(self) -> float: ...
    #: How long the refresh's fetch took; ``None`` when it did not fetch.
    @property
    def delta_ms(self) -> float | None: ...
    #: How old the value being replaced was when the refresh started; ``None`` if unknown.
    @property
    def stale_age_ms(self) -> float | None: ...


#: What a hook receives: a miss record, or a refresh record.
Record = MissRecord | RefreshLike
Hook = Callable[[Any], object]
Scope = contextlib.AbstractContextManager[object]
_NO_SCOPE = contextlib.nullcontext()


class Around(Protocol):
    """Scopes around the fills and refreshes this process runs (a tracer's spans, say).

    The work, and the record it ends with, run inside the scope, so a span
    made current there parents the spans of the fetch function and can be
    described by the record's hook.
    """

    def fill(self, dataset: str) -> Scope:
        """The scope of one fill (lock, fetch, write) of ``dataset``, in the caller's context."""

    def refresh(self, dataset: str, trigger: contextvars.Context | None) -> Scope:
        """The scope of one background refresh, where the refresh runs.

        ``trigger`` is ``contextvars.copy_context()`` as the caller that
        started the refresh had it (``None`` when there was none): what a
        tracer links the refresh to, rather than nesting it in that caller.
        """


class Events:
    """The hooks of one instance, each called with every miss and refresh record, never a hit.

    A hook runs in the caller's thread (or the fill's task) right after the
    record is logged, so it should be quick; one that raises is logged once, at
    ERROR with its traceback, and ignored from then on, never failing the caller.
    The same goes for the :class:`Around` scopes.
    """

    def __init__(self) -> None:
        #: The hooks in order; replaced whole, so sending reads it without a lock.
        self.hooks: tuple[Hook, ...] = ()
        #: The scopes around fills and refreshes, likewise (see :meth:`around`).
        self.arounds: tuple[Around, ...] = ()
        self._told: set[int] = set()
        self._lock = threading.Lock()

    def subscribe(self, hook: Hook) -> Callable[[], None]:
        """Call ``hook(record)`` for every miss and refresh; returns the function that stops it."""
        with self._lock:
            self.hooks = (*self.hooks, hook)

        def unsubscribe() -> None:
            with self._lock:
                self.hooks = tuple(h for h in self.hooks if h is not hook)

        return unsubscribe

    def around(self, around: Around) -> Callable[[], None]:
        """Run fills and refreshes inside ``around``'s scopes; returns the function that stops it.

        Callers that join another caller's fill, and hits, run in no scope.
        """
        with self._lock:
            self.arounds = (*self.arounds, around)

        def remove() -> None:
            with self._lock:
                self.arounds = tuple(a for a in self.arounds if a is not around)

        return remove

    def fill_scope(self, dataset: str) -> Scope:
        """Every :meth:`Around.fill` scope of one fill, entered in order; nothing if none."""
        arounds = self.arounds
        if not arounds:
            return _NO_SCOPE
        return _Scopes(self, [(a, functools.partial(a.fill, dataset)) for a in arounds])

    def refresh_scope(self, dataset: str, trigger: contextvars.Context | None = None) -> Scope:
        """Every :meth:`Around.refresh` scope of one background refresh; nothing if none.

        The refresh work enters it around the whole refresh, where the refresh
        runs, and records the refresh (:meth:`~memofill.metrics.Metrics.refreshed`) inside it.
        """
        arounds = self.arounds
        if not arounds:
            return _NO_SCOPE
        return _Scopes(self, [(a, functools.partial(a.refresh, dataset, trigger)) for a in arounds])

    def send(self, record: Record) -> None:
        """Call every hook with ``record``; a hook that raises is told once and skipped."""
        for hook in self.hooks:
            try:
                hook(record)
            except Exception:  # a hook's failure is its own, never the caller's
                self._tell(hook)

    def _tell(self, hook: object) -> None:
        with self._lock:
            if id(hook) in self._told:
                return
            self._told.add(id(hook))
        logger.exception(
            "memofill hook %r raised; the caller was served, and this hook's later failures "
            "are not logged",
            hook,
        )


class _Scopes:
    """Enters the scopes of one fill or refresh; one that fails is told once and skipped."""

    def __init__(self, events: Events, openers: list[tuple[Around, Callable[[], Scope]]]) -> None:
        self._events, self._openers = events, openers
        self._entered: list[tuple[Around, Scope]] = []

    def __enter__(self) -> None:
        for around, opener in self._openers:
            try:
                scope = opener()
                scope.__enter__()
            except Exception:  # a scope's failure is its own, never the caller's
                self._events._tell(around)
            else:
                self._entered.append((around, scope))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for around, scope in reversed(self._entered):
            try:
                scope.__exit__(kind, error, traceback)
            except Exception:  # as above; the work's own exception goes on either way
                self._events._tell(around)
