"""memofill's metrics for Prometheus: a collector read at scrape time (``memofill[prometheus]``).

::

    from prometheus_client import REGISTRY
    from memofill.contrib.prometheus import MemofillCollector

    REGISTRY.register(MemofillCollector())   # the default instance; or MemofillCollector(cache)

Nothing is recorded per call: the collector reads memofill's own tallies when
Prometheus scrapes, so a hit costs what it cost without it. Every family of
:data:`memofill.metrics.FAMILIES` is exported, named by Prometheus conventions
(``memofill_calls_total``, ``memofill_fetch_duration_seconds``...), with labels
from closed sets: the registry's dataset keys (never a final Redis key) and the
outcome vocabulary.

Series grow with use: a dataset has series once this process has counted a
call of it, then one at zero for every outcome, so ``rate()`` and
``increase()`` see the first of each. ``every_dataset=True`` exports those
zeros for every registered dataset from the first scrape (a few dozen series
each). ``histograms="total"`` sums the histograms over datasets (one per
outcome), ``"off"`` exports none; ``"dataset"``, the default, keeps one per
dataset and outcome.

One collector per instance and registry: two instances on one registry would
export the same series twice (``prometheus_client`` refuses that when the
second is registered).

Counts are per process, and ``prometheus_client``'s multiprocess mode sums only
its own metric types, not collectors: a server with several workers has each
serve its own port, Prometheus scraping them all (:func:`start_worker_server`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from memofill.errors import ConfigurationError
from memofill.instance import Memofill, default_instance
from memofill.metrics import FAMILIES, Family, HistogramReading

__all__ = ["MemofillCollector", "start_worker_server"]

Histograms = Literal["dataset", "total", "off"]


class MemofillCollector(Collector):
    """Exports one memofill instance's counts, histograms and gauges when scraped.

    ``cache`` defaults to the module-level instance (the one
    :func:`memofill.configure` sets up). It is read through its configuration
    in force at each scrape, so a collector registered at start-up follows
    later ``configure()`` calls. ``every_dataset`` and ``histograms``: see the
    module's docstring.
    """

    def __init__(
        self,
        cache: Memofill | None = None,
        *,
        every_dataset: bool = False,
        histograms: Histograms = "dataset",
    ) -> None:
        if histograms not in ("dataset", "total", "off"):
            raise ConfigurationError(
                f"histograms={histograms!r}: choose 'dataset', 'total' or 'off'"
            )
        self._cache = default_instance() if cache is None else cache
        self._every_dataset = every_dataset
        self._histograms = histograms

    def _families(self) -> Iterator[Family]:
        for family in FAMILIES:
            if family.kind != "histogram" or self._histograms != "off":
                yield family

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what the registry checks for duplicates."""
        for family in self._families():
            yield _empty(family, self._labels(family))

    def collect(self) -> Iterator[Metric]:
        """Every family, read now."""
        for family in self._families():
            yield self._read(family)

    def _labels(self, family: Family) -> list[str]:
        summed = family.kind == "histogram" and self._histograms == "total"
        return [label for label in family.labels if not (summed and label == "dataset")]

    def _read(self, family: Family) -> Metric:
        name, labels = family.prometheus_name, self._labels(family)
        samples: Iterable[tuple[tuple[str, ...], Any]] = family.read(self._cache)
        if family.kind == "histogram":
            if len(labels) < len(family.labels):
                samples = _summed(samples, family.labels.index("dataset"))
            histogram = HistogramMetricFamily(name, family.help, labels=labels)
            reading: HistogramReading
            for values, reading in samples:
                buckets = [(_le(bound), count) for bound, count in reading.cumulative()]
                histogram.add_metric(list(values), buckets, reading.sum)
            return histogram
        if self._every_dataset and family.registered is not None:
            samples = {**dict(family.registered(self._cache)), **dict(samples)}.items()
        kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
        metric = kind(name, family.help, labels=labels)
        for values, value in sorted(samples):
            metric.add_metric(list(values), float(value))
        return metric


def _summed(
    samples: Iterable[tuple[tuple[str, ...], HistogramReading]], dropped: int
) -> list[tuple[tuple[str, ...], HistogramReading]]:
    """The readings summed over the label at ``dropped`` (the dataset): one per other labels."""
    totals: dict[tuple[str, ...], HistogramReading] = {}
    for values, reading in samples:
        rest = values[:dropped] + values[dropped + 1 :]
        seen = totals.get(rest)
        totals[rest] = reading if seen is None else seen.plus(reading)
    return sorted(totals.items(), key=lambda item: item[0])


def _le(bound: float) -> str:
    """A bucket bound as ``prometheus_client`` writes its own (``1.0``, ``+Inf``)."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


def _empty(family: Family, labels: list[str]) -> Metric:
    name = family.prometheus_name
    if family.kind == "counter":
        return CounterMetricFamily(name, family.help, labels=labels)
    if family.kind == "gauge":
        return GaugeMetricFamily(name, family.help, labels=labels)
    return HistogramMetricFamily(name, family.help, labels=labels)


def start_worker_server(
    first_port: int, workers: int, *, addr: str = "0.0.0.0", registry: Collector = REGISTRY
) -> int:
    """Serve ``registry`` on the first free port of ``first_port`` .. ``first_port + workers - 1``.

    For a server with several worker processes (``uvicorn --workers``,
    gunicorn): each calls this once at start-up (a FastAPI lifespan, gunicorn's
    ``post_worker_init``) and gets a port of its own, which a worker that
    replaces a dead one takes over; Prometheus scrapes every port of the range.
    Returns the port. Raises :class:`~memofill.errors.ConfigurationError` when
    every port is taken (more workers than ports, or another service on them).
    """
    if workers < 1:
        raise ConfigurationError(f"workers={workers!r}: must be at least 1")
    for port in range(first_port, first_port + workers):
        try:
            start_http_server(port, addr=addr, registry=registry)
        except OSError:  # taken by another worker (or anything else)
            continue
        return port
    raise ConfigurationError(
        f"no free port for this worker's metrics in {first_port}..{first_port + workers - 1} on "
        f"{addr}: give the range as many ports as there are workers"
    )
