"""What exporters read: histograms on lock-free tallies, event hooks, and the exported families.

Hits are never pushed anywhere: they stay on the lock-free tallies of
:class:`~memofill.outcomes.Counters`, and an exporter reads them when it is
scraped or collected. A pushed event costs 1 to 20 µs (an OpenTelemetry
``counter.add`` with attributes is the dear end), which is up to a quarter of a
Redis hit; a tally costs 60 ns. Misses and refreshes take milliseconds, so
they may do more: each one feeds the histograms here and calls the hooks
subscribed to :class:`~memofill.hooks.Events` with its record.

What is exported is one list, :data:`FAMILIES`, read by both exporters
(:mod:`memofill.contrib.prometheus`, :mod:`memofill.contrib.otel`), so neither
holds a list of its own. Its label values come from closed vocabularies: the
registry's dataset keys (templates, never a final Redis key), the
:class:`~memofill.outcomes.Outcome` enum with the counted-only names of
:data:`~memofill.outcomes.COUNTED_ONLY`, and :data:`REFRESH_OUTCOMES` and
:data:`REFRESH_TRIGGERS`. A feature with a gauge of its own adds a
:class:`Family` with :func:`register`.

Series grow with use, not with the registry: a dataset this process has
counted nothing for has no series (a registry of thousands of datasets, of
which each worker serves a few, would otherwise export tens of thousands of
zeros from every process). Once a dataset is used, its counters have a series
at zero for every outcome, so ``rate()`` sees the first of each. An exporter
may ask for those zeros for every registered dataset from the start
(:attr:`Family.registered`).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs

from memofill.errors import MemofillError
from memofill.hooks import Events, RefreshLike
from memofill.outcomes import COUNTED_ONLY, Counters, MissRecord, Outcome, Tally

if TYPE_CHECKING:
    from memofill.fallback import Breaker
    from memofill.near import LocalStore, NearCache
    from memofill.policy import Dataset

logger = logging.getLogger("memofill")

#: The ways a background refresh ends, a refresh record's ``outcome`` or counted only
#: (``refresh_busy``, another process holds the lock; ``refresh_dropped``, the pool was full).
REFRESH_OUTCOMES = tuple(o.value for o in Outcome if o.value.startswith("refresh_"))
#: What started a background refresh, a stale hit or an early (XFetch) draw on a fresh hit
#: (``fn.refresh()`` runs a fill, counted in ``memofill_calls_total``).
REFRESH_TRIGGERS = ("stale", "early")

#: Upper bounds of the duration buckets, in seconds: 1 ms to a minute.
DURATION_BOUNDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Upper bounds of the payload buckets, in bytes: 256 B to 64 MiB, by fours.
SIZE_BOUNDS = tuple(float(256 * 4**n) for n in range(10))
#: Upper bounds of the stale-age buckets, in seconds: 100 ms to a day.
AGE_BOUNDS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)

#: Histogram names (:attr:`Family.name`), the keys of :meth:`Metrics.histogram`.
FETCH_DURATION = "fetch.duration"
WAIT_DURATION = "wait.duration"
PAYLOAD_SIZE = "payload.size"
STALE_AGE = "stale.age"


def call_outcomes() -> tuple[str, ...]:
    """Every ``outcome`` of ``memofill_calls_total``: the counted-only names, then the misses'.

    Read from the vocabularies each time, so a member added to
    :class:`~memofill.outcomes.Outcome` or a name added to
    :data:`~memofill.outcomes.COUNTED_ONLY` is exported with no other change.
    Refresh outcomes are not calls: they have a family of their own.
    """
    misses = (outcome.value for outcome in Outcome if outcome.value not in REFRESH_OUTCOMES)
    return (*COUNTED_ONLY, *misses)


@attrs.frozen
class HistogramReading:
    """One histogram at one moment: the count in each bucket (not cumulative), sum and count."""

    bounds: tuple[float, ...]
    #: ``len(bounds) + 1`` counts; the last is over the highest bound.
    buckets: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.buckets)

    def plus(self, other: HistogramReading) -> HistogramReading:
        """This reading and ``other`` (same bounds) as one: what an aggregate exports."""
        buckets = tuple(a + b for a, b in zip(self.buckets, other.buckets, strict=True))
        return HistogramReading(self.bounds, buckets, self.sum + other.sum)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values at or under it)`` for every bound and ``inf``, as exported."""
        total, pairs = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs


class Histogram:
    """Values counted into fixed buckets, each a lock-free :class:`~memofill.outcomes.Tally`.

    Only the sum takes a lock, for one addition; only misses and refreshes
    observe, and a read (a scrape) never blocks them for longer than that.
    """

    __slots__ = ("_buckets", "_lock", "_sum", "bounds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._buckets = tuple(Tally() for _ in range(len(bounds) + 1))
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose upper bound is at least ``value``."""
        self._buckets[bisect.bisect_left(self.bounds, value)].add()
        with self._lock:
            self._sum += value

    def read(self) -> HistogramReading:
        """The counts and the sum now."""
        buckets = tuple(tally.value for tally in self._buckets)
        with self._lock:
            total = self._sum
        return HistogramReading(self.bounds, buckets, total)

    def reset(self) -> None:
        """Count from zero again."""
        for tally in self._buckets:
            tally.reset()
        with self._lock:
            self._sum = 0.0

    def after_fork(self) -> None:
        """In a forked child: new locks (no parent thread holds them), and zero counts."""
        self._lock = threading.Lock()
        for tally in self._buckets:
            tally._lock = threading.Lock()
        self.reset()


#: The bounds of each histogram family.
_BOUNDS = {
    FETCH_DURATION: DURATION_BOUNDS,
    WAIT_DURATION: DURATION_BOUNDS,
    PAYLOAD_SIZE: SIZE_BOUNDS,
    STALE_AGE: AGE_BOUNDS,
}


def miss_observations(record: MissRecord) -> Iterator[tuple[str, tuple[str, ...], float]]:
    """``(histogram, labels, value)`` for what one miss record tells, in base units.

    The fetch's duration and the size of what it stored, when this caller ran
    the fetch (``fetch_ms`` is set); the wait, when it waited for another
    process. Both exporters and :class:`Metrics` read misses through this only.
    """
    outcome = record.outcome.value
    if record.fetch_ms is not None:
        yield FETCH_DURATION, (record.dataset, outcome), record.fetch_ms / 1000
        if record.payload_bytes:
            yield PAYLOAD_SIZE, (record.dataset,), float(record.payload_bytes)
    if record.waited_ms > 0:
        yield WAIT_DURATION, (record.dataset, outcome), record.waited_ms / 1000


def refresh_observations(record: RefreshLike) -> Iterator[tuple[str, tuple[str, ...], float]]:
    """:func:`miss_observations` for a refresh: its fetch's duration and the value's stale age.

    The duration of a fetch that returned (one that raised has none); the age
    of a value refreshed because it was stale (an early refresh's is negative:
    the time it had left).
    """
    outcome = _name(record.outcome)
    if record.delta_ms is not None and outcome in _FETCHED:
        yield FETCH_DURATION, (record.dataset, outcome), record.delta_ms / 1000
    if record.stale_age_ms is not None and record.stale_age_ms >= 0:
        yield STALE_AGE, (record.dataset,), record.stale_age_ms / 1000


#: The refresh outcomes whose record times a fetch that returned.
_FETCHED = frozenset({"refresh_fill", "refresh_negative"})


def _name(outcome: object) -> str:
    value = getattr(outcome, "value", outcome)
    return str(value)


class Metrics:
    """Histograms and refresh counts of one configuration, and its :class:`~memofill.hooks.Events`.

    Made fresh with the counters (an ``override()`` block starts from zero), but
    every configuration of an instance shares its ``events``: hooks are wiring,
    not counts.
    """

    def __init__(self, events: Events) -> None:
        self.events = events
        self._histograms: dict[tuple[str, tuple[str, ...]], Histogram] = {}
        self._refreshes: Counter[tuple[str, str, str]] = Counter()
        #: ``(dataset, "dataset" | "tags")`` -> calls that read a value behind those marks.
        self._behind: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        _live_metrics.add(self)

    def miss(self, record: MissRecord) -> None:
        """Observe one miss (called once per miss record, after it is logged), then the hooks."""
        for name, labels, value in miss_observations(record):
            self._histogram(name, labels).observe(value)
        if record.behind is not None:
            with self._lock:
                self._behind[record.dataset, record.behind] += 1
        if self.events.hooks:
            self.events.send(record)

    def refreshed(self, record: RefreshLike) -> None:
        """Count and observe one background refresh, then call the hooks.

        Called once per refresh record, after it is logged, inside the
        refresh's :meth:`~memofill.hooks.Events.refresh_scope` (where a tracer's span for it
        is open).
        """
        self.refresh_counted(record.dataset, record.trigger, _name(record.outcome))
        for name, labels, value in refresh_observations(record):
            self._histogram(name, labels).observe(value)
        if self.events.hooks:
            self.events.send(record)

    def refresh_counted(self, dataset: str, trigger: str, outcome: str) -> None:
        """Count a refresh that has no record (``refresh_busy``, ``refresh_dropped``)."""
        with self._lock:
            self._refreshes[dataset, trigger, outcome] += 1

    def _histogram(self, name: str, labels: tuple[str, ...]) -> Histogram:
        histogram = self._histograms.get((name, labels))
        if histogram is None:
            with self._lock:
                histogram = self._histograms.setdefault((name, labels), Histogram(_BOUNDS[name]))
        return histogram

    def histogram(self, name: str) -> list[tuple[tuple[str, ...], HistogramReading]]:
        """Every labelled histogram of family ``name`` observed so far, read now, by labels."""
        with self._lock:
            chosen = [(key[1], h) for key, h in self._histograms.items() if key[0] == name]
        return [(labels, histogram.read()) for labels, histogram in sorted(chosen)]

    def behind(self) -> dict[tuple[str, str], int]:
        """``{(dataset, marks): count}``: calls that read a value behind those marks."""
        with self._lock:
            return dict(self._behind)

    def refreshes(self) -> dict[tuple[str, str, str], int]:
        """``{(dataset, trigger, outcome): count}`` of every refresh counted so far."""
        with self._lock:
            return dict(self._refreshes)

    def reset(self) -> None:
        """Forget every observation (tests and benchmarks start from zero)."""
        with self._lock:
            histograms = list(self._histograms.values())
            self._refreshes.clear()
            self._behind.clear()
        for histogram in histograms:
            histogram.reset()


_live_metrics: weakref.WeakSet[Metrics] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child observes from zero, as its counters count from zero (see outcomes)."""
    for metrics in list(_live_metrics):
        metrics._lock = threading.Lock()
        metrics.events._lock = threading.Lock()
        for histogram in metrics._histograms.values():
            histogram.after_fork()
        metrics._refreshes.clear()
        metrics._behind.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the exported families ---------------------------------------------------------------------


class Source(Protocol):
    """What the exported families read of an instance (a :class:`memofill.Memofill`)."""

    @property
    def policies(self) -> dict[str, Dataset]: ...
    @property
    def counters(self) -> Counters: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def breaker(self) -> Breaker: ...
    @property
    def local_store(self) -> LocalStore: ...
    @property
    def near(self) -> NearCache | None: ...


#: The samples of a family, ``(label values, value)`` each; a histogram's value is its reading.
Samples = Iterable[tuple[tuple[str, ...], Any]]


@attrs.frozen
class Family:
    """One exported metric, named once for both exporters.

    ``name`` is dotted (``"breaker.trips"``): OpenTelemetry exports
    ``memofill.breaker.trips``, Prometheus ``memofill_breaker_trips_total``
    (the unit's suffix, ``_seconds`` or ``_bytes``, and ``_total`` for a counter
    added). ``read(cache)`` returns the samples now, from the instance's
    current configuration; it must be cheap and must not raise.
    """

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    #: The unit in UCUM as OpenTelemetry wants it (``s``, ``By``, ``1``, or ``{call}``).
    unit: str
    help: str
    #: Label names; each sample gives one value per name, from a closed set.
    labels: tuple[str, ...]
    read: Callable[[Source], Samples]
    #: A histogram's bucket bounds (what OpenTelemetry is advised to use too).
    bounds: tuple[float, ...] = ()
    #: The samples at zero of every registered dataset, which ``read`` gives only once a
    #: dataset is used; an exporter asked to show every dataset from the start adds them.
    registered: Callable[[Source], Samples] | None = None

    @property
    def prometheus_name(self) -> str:
        """The name by Prometheus conventions, without the ``_total`` a counter's samples get."""
        name = "memofill_" + self.name.replace(".", "_")
        suffix = {"s": "_seconds", "By": "_bytes"}.get(self.unit, "")
        return name if name.endswith(suffix) else name + suffix

    @property
    def otel_name(self) -> str:
        """The OpenTelemetry instrument name."""
        return "memofill." + self.name


def datasets(cache: Source) -> list[str]:
    """The registry's dataset keys; none when the policies do not load (a scrape never fails)."""
    try:
        return sorted(cache.policies)
    except MemofillError:
        return []


def _calls(cache: Source) -> Samples:
    """Every dataset counted so far, with every outcome (zero where none was counted)."""
    counts = cache.counters.snapshot()
    names = call_outcomes()
    for dataset in sorted(counts):
        seen = counts[dataset]
        for name in names:
            yield (dataset, name), seen.get(name, 0)


def _calls_registered(cache: Source) -> Samples:
    names = call_outcomes()
    return [((dataset, name), 0) for dataset in datasets(cache) for name in names]


def _refreshes(cache: Source) -> Samples:
    """Every refresh counted, and zero for each one a used dataset with ``stale_s`` may have."""
    used = set(cache.counters.snapshot())
    counts = dict(_refresh_zeros([d for d in _refreshed_datasets(cache) if d in used]))
    counts.update(cache.metrics.refreshes())
    return sorted(((key, count) for key, count in counts.items()))


def _behind(cache: Source) -> Samples:
    return sorted(cache.metrics.behind().items())


def _refreshes_registered(cache: Source) -> Samples:
    return _refresh_zeros(_refreshed_datasets(cache))


def _refresh_zeros(datasets: list[str]) -> list[tuple[tuple[str, str, str], int]]:
    triples = (
        (dataset, trigger, outcome)
        for dataset in datasets
        for trigger in REFRESH_TRIGGERS
        for outcome in REFRESH_OUTCOMES
    )
    return [(triple, 0) for triple in triples]


def _refreshed_datasets(cache: Source) -> list[str]:
    """The registry's datasets that serve stale values, so refresh; none if it does not load."""
    try:
        policies = cache.policies
    except MemofillError:
        return []
    return [key for key, dataset in policies.items() if dataset.stale_s > 0]


def _histogram(name: str) -> Callable[[Source], Samples]:
    def read(cache: Source) -> Samples:
        return cache.metrics.histogram(name)

    return read


def _near_serving(cache: Source) -> Samples:
    """Whether near copies are served now; no sample where no dataset keeps them."""
    try:
        near_datasets = any(dataset.near_ms > 0 for dataset in cache.policies.values())
    except MemofillError:
        near_datasets = False
    if cache.near is None or not near_datasets:
        return []
    return [((), float(cache.local_store.serving_near()))]


def unlabelled(read: Callable[[Source], float]) -> Callable[[Source], Samples]:
    """A family's ``read`` from a function of the instance giving its one value."""

    def samples(cache: Source) -> Samples:
        return [((), read(cache))]

    return samples


#: Every exported family, in exposition order. Exporters read only this list.
FAMILIES: list[Family] = [
    Family(
        "calls",
        "counter",
        "{call}",
        "Calls of cached functions by outcome: hits and the like, and how each miss ended",
        ("dataset", "outcome"),
        _calls,
        registered=_calls_registered,
    ),
    Family(
        FETCH_DURATION,
        "histogram",
        "s",
        "How long the origin took, by the outcome of the miss or refresh that called it",
        ("dataset", "outcome"),
        _histogram(FETCH_DURATION),
        DURATION_BOUNDS,
    ),
    Family(
        WAIT_DURATION,
        "histogram",
        "s",
        "How long callers waited for another process's fill, by how the wait ended",
        ("dataset", "outcome"),
        _histogram(WAIT_DURATION),
        DURATION_BOUNDS,
    ),
    Family(
        PAYLOAD_SIZE,
        "histogram",
        "By",
        "Size of the values fetched and stored",
        ("dataset",),
        _histogram(PAYLOAD_SIZE),
        SIZE_BOUNDS,
    ),
    Family(
        "refreshes",
        "counter",
        "{refresh}",
        "Background refreshes by trigger and outcome",
        ("dataset", "trigger", "outcome"),
        _refreshes,
        registered=_refreshes_registered,
    ),
    Family(
        "behind_marks",
        "counter",
        "{call}",
        "Calls whose value was behind its dataset's or its tags' marks (invalidated), by which",
        ("dataset", "marks"),
        _behind,
    ),
    Family(
        STALE_AGE,
        "histogram",
        "s",
        "How old a stale value was when its refresh started",
        ("dataset",),
        _histogram(STALE_AGE),
        AGE_BOUNDS,
    ),
    Family(
        "breaker.open",
        "gauge",
        "1",
        "1 while calls skip Redis after it failed to answer, else 0",
        (),
        unlabelled(lambda cache: float(cache.breaker.is_open)),
    ),
    Family(
        "breaker.trips",
        "counter",
        "{trip}",
        "Times the breaker opened",
        (),
        unlabelled(lambda cache: cache.breaker.trips.value),
    ),
    Family(
        "local_store.entries",
        "gauge",
        "{entry}",
        "Values kept in this process: near copies and copies served while Redis is unreachable",
        (),
        unlabelled(lambda cache: len(cache.local_store)),
    ),
    Family(
        "local_store.size",
        "gauge",
        "By",
        "What the values kept in this process cost against their byte budget",
        (),
        unlabelled(lambda cache: cache.local_store.bytes),
    ),
    Family(
        "local_store.evictions",
        "counter",
        "{entry}",
        "Values dropped from the local store to keep it within its entry and byte limits",
        (),
        unlabelled(lambda cache: cache.local_store.evictions),
    ),
    Family(
        "near.serving",
        "gauge",
        "1",
        "1 while near copies may be served (the invalidation listener is heard), else 0",
        (),
        _near_serving,
    ),
    Family(
        "near.flushes",
        "counter",
        "{flush}",
        "Times every near copy was dropped at once for the listener (a lost, new or flushed "
        "connection); invalidations are counted apart",
        (),
        unlabelled(lambda cache: cache.local_store.flushes),
    ),
    Family(
        "local_store.clears",
        "counter",
        "{clear}",
        "Times every value kept in this process was dropped because a dataset was invalidated",
        (),
        unlabelled(lambda cache: cache.local_store.clears),
    ),
]


def register(family: Family) -> None:
    """Export ``family`` too (a feature's own gauges); its name must be new.

    Register when the feature's module is imported: the OpenTelemetry exporter
    makes its instruments when ``instrument()`` is called.

    For example, a count of the refreshes waiting for a worker::

        register(Family("refreshes.in_flight", "gauge", "{refresh}", "Refreshes in flight",
                        (), unlabelled(lambda cache: cache.refreshes.in_flight())))
    """
    if any(known.name == family.name for known in FAMILIES):
        raise ValueError(f"a metric family {family.name!r} is already registered")
    FAMILIES.append(family)
