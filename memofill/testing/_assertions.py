"""What a test's caches did, and assertions whose failures show all of it."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from memofill.decorator import CachedDataset, CallResult
from memofill.outcomes import COUNTED_ONLY, HIT, Outcome
from memofill.testing._harness import Harness

#: Every name the counters can report: each :class:`~memofill.Outcome`, and the names counted
#: only (the kinds of hit, ``near_hit`` and ``disabled`` among them). Read from memofill's own
#: vocabulary, so that an outcome added there is assertable here with no other change.
COUNTED_NAMES = frozenset(COUNTED_ONLY) | {outcome.value for outcome in Outcome}


def _format(counts: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{name}={n}" for name, n in sorted(counts.items()) if n) or "nothing"


def _check_names(expected: dict[str, int]) -> None:
    unknown = set(expected) - COUNTED_NAMES
    if unknown:
        raise TypeError(f"unknown outcome names {sorted(unknown)}; known: {sorted(COUNTED_NAMES)}")


def _cached(function: Any) -> CachedDataset[..., Any]:
    """The :class:`~memofill.CachedDataset` behind ``function``, or behind a method of it."""
    parent = getattr(function, "_self_parent", None)  # wrapt's bound form of a method
    target = function if parent is None else parent
    if not isinstance(target, CachedDataset):
        raise TypeError(f"{function!r} is not a function decorated with cached_dataset")
    return target


def _counted(original: Callable[..., Any], calls: OriginCalls) -> Callable[..., Any]:
    """``original``, each call recorded in ``calls`` first (a coroutine function stays one)."""
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def counted_async(*args: Any, **kwargs: Any) -> Any:
            calls.record(args, kwargs)
            return await original(*args, **kwargs)

        return counted_async

    @functools.wraps(original)
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.record(args, kwargs)
        return original(*args, **kwargs)

    return counted


class OriginCalls:
    """The calls that ran a cached function's own body (reached the upstream), as they happen.

    Made by :meth:`Outcomes.origin_calls`. ``calls`` holds each call's
    ``(args, kwargs)``, ``self`` included for a method.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """How many times the body ran."""
        return len(self.calls)

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count one call (the wrapper :meth:`Outcomes.origin_calls` installs calls this)."""
        with self._lock:
            self.calls.append((args, kwargs))

    def __repr__(self) -> str:
        return f"OriginCalls(count={self.count})"


class Outcomes:
    """What this test's caches did; the ``memofill_outcomes`` fixture.

    Counts are the sums of the counters of every cache the ``memofill_*``
    fixtures made (or :meth:`Harness.adopt` took) in this test: each
    :class:`~memofill.Outcome`, and each name counted only (``hit``,
    ``stale_hit``, ``near_hit``, ``fallback_hit``, ``disabled``). Records are
    the ``memofill`` logger's miss records during the test. A failed assertion
    lists every outcome seen, per dataset, and the dataset's miss records: it
    says what happened instead.
    """

    def __init__(self, harness: Harness) -> None:
        self._harness = harness

    def seen(self) -> dict[str, Counter[str]]:
        """``{dataset: Counter(name -> count)}`` for every dataset touched so far."""
        seen: dict[str, Counter[str]] = {}
        for cache in self._harness.caches:
            for dataset, counts in cache.counters.snapshot().items():
                seen.setdefault(dataset, Counter()).update(counts)
        return seen

    def counts(self, dataset: str) -> Counter[str]:
        """How often each outcome and each kind of hit happened for ``dataset``."""
        return self.seen().get(dataset, Counter())

    def records(self, dataset: str | None = None) -> list[logging.LogRecord]:
        """The miss records logged (``record.outcome``, ``record.redis_key``...), oldest first.

        As the log has them: one per fill (``record.joined`` says how many callers
        shared it), and a repeated warning summed up (``record.repeated``). The
        counts (:meth:`counts`) have every caller.
        """
        records = self._harness.records
        return [r for r in records if dataset is None or getattr(r, "dataset", None) == dataset]

    def assert_outcomes(self, dataset: str, /, **expected: int) -> None:
        """Assert exactly these counts for ``dataset``: every name not given must be zero.

        ``assert_outcomes("news:digest:v1", leader_fill=1, local_join=3)`` also
        fails if there was a hit; a misspelt name raises :class:`TypeError`.
        """
        __tracebackhide__ = True
        _check_names(expected)
        seen = self.counts(dataset)
        if +seen != +Counter(expected):
            raise AssertionError(self._explain(dataset, expected, "seen", seen))

    @contextlib.contextmanager
    def expect(self, dataset: str, /, **expected: int) -> Iterator[None]:
        """Assert that the block adds exactly these counts for ``dataset``.

        It is a plain ``with`` block, so it wraps an ``await`` as well:
        ``with memofill_outcomes.expect(key, hit=1): await fetch()``.
        """
        __tracebackhide__ = True
        _check_names(expected)
        before = self.counts(dataset)
        yield
        added = self.counts(dataset)
        added.subtract(before)
        if +added != +Counter(expected):
            raise AssertionError(self._explain(dataset, expected, "the block added", added))

    def assert_hit(self, function: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Call a cached function, assert that this call was a hit, and return its value.

        For a coroutine function it returns an awaitable:
        ``value = await memofill_outcomes.assert_hit(fetch_quotes, "ACME")``.
        """
        __tracebackhide__ = True
        cached = _cached(function)
        result = function.call_with_outcome(*args, **kwargs)
        if inspect.isawaitable(result):

            async def checked() -> Any:
                __tracebackhide__ = True
                return self._check_hit(cached, args, kwargs, await result)

            return checked()
        return self._check_hit(cached, args, kwargs, result)

    def wait_for_refreshes(self, timeout_s: float = 5.0) -> list[logging.LogRecord]:
        """Wait until no refresh handed to a worker thread is in flight; return the refresh records.

        A stale read returns at once and hands its refresh to a worker; call this
        before asserting what the refresh did. (An asyncio test awaits the tasks
        in ``cache.refreshes.tasks`` instead, or uses ``refresh="inline"``.)
        Fails the test if a refresh is still running after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while any(cache.refreshes.in_flight() for cache in self._harness.caches):
            if time.monotonic() > deadline:
                raise AssertionError(f"a refresh was still in flight after {timeout_s} s")
            time.sleep(0.005)
        return [record for record in self._harness.records if hasattr(record, "trigger")]

    def origin_calls(self, function: Any) -> OriginCalls:
        """Count the calls that run ``function``'s own body, from now until the test ends.

        ``function`` is the decorated function, or a method taken from its class.
        Its body is wrapped for this test only: a hit or a follower that got the
        value from Redis does not count, a leader's fetch does.
        """
        cached = _cached(function)
        original = cached.__wrapped__
        calls = OriginCalls()
        cached.__wrapped__ = _counted(original, calls)
        self._harness.cleanup.callback(setattr, cached, "__wrapped__", original)
        return calls

    def batch_calls(self, function: Any) -> OriginCalls:
        """Count the calls of ``function``'s batch (``@fn.batch``), from now until the test ends.

        Each call's ``args`` is ``(items,)``, the items one ``many()`` gave it
        (``(self, items)`` for a method): ``assert batch.calls == [((["ACME",
        "INIT"],), {})]`` says one upstream call fetched those two keys.
        """
        cached = _cached(function)
        original = cached._self_batch
        if original is None:
            raise TypeError(f"{cached.__name__} has no batch function: register one with .batch")
        calls = OriginCalls()
        cached._self_batch = _counted(original, calls)
        self._harness.cleanup.callback(setattr, cached, "_self_batch", original)
        return calls

    def _explain(
        self, dataset: str, expected: dict[str, int], what: str, seen: Counter[str]
    ) -> str:
        width = max(len("expected"), len(what)) + 1
        lines = [
            f"outcomes of dataset {dataset!r} differ",
            f"  {'expected:':<{width}} {_format(expected)}",
            f"  {what + ':':<{width}} {_format(seen)}",
        ]
        return "\n".join(lines + self._everything(dataset))

    def _everything(self, dataset: str) -> list[str]:
        lines = ["every outcome seen in this test, per dataset:"]
        seen = self.seen()
        lines.extend(f"  {name}: {_format(counts)}" for name, counts in sorted(seen.items()))
        if not seen:
            lines.append("  nothing: no call went through a cache of a memofill_* fixture")
        records = self.records(dataset)
        if records:
            lines.append(f"miss records of {dataset!r}, oldest first:")
            lines.extend(f"  {record.getMessage()}" for record in records[-20:])
        return lines

    def _check_hit(
        self,
        cached: CachedDataset[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: CallResult[Any],
    ) -> Any:
        __tracebackhide__ = True
        if result.outcome != HIT:
            shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            lines = [f"{cached.__name__}({shown}) was {result.outcome}, not a hit"]
            raise AssertionError("\n".join(lines + self._everything(cached.dataset.key)))
        return result.value
