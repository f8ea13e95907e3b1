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
outcome vocabulary. ``memofill_calls_total`` has a series at zero for every
dataset and outcome from the first scrape, so ``rate()`` and ``increase()``
see the first event.

One collector per instance and registry: two instances on one registry would
export the same series twice (``prometheus_client`` refuses that when the
second is registered).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from memofill.instance import Memofill, default_instance
from memofill.metrics import FAMILIES, Family, HistogramReading

__all__ = ["MemofillCollector"]


class MemofillCollector(Collector):
    """Exports one memofill instance's counts, histograms and gauges when scraped.

    ``cache`` defaults to the module-level instance (the one
    :func:`memofill.configure` sets up). It is read through its configuration
    in force at each scrape, so a collector registered at start-up follows
    later ``configure()`` calls.
    """

    def __init__(self, cache: Memofill | None = None) -> None:
        self._cache = default_instance() if cache is None else cache

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what the registry checks for duplicates."""
        for family in FAMILIES:
            yield _empty(family)

    def collect(self) -> Iterator[Metric]:
        """Every family, read now."""
        for family in FAMILIES:
            yield _read(family, self._cache)


def _read(family: Family, cache: Memofill) -> Metric:
    name, labels = family.prometheus_name, list(family.labels)
    if family.kind == "histogram":
        histogram = HistogramMetricFamily(name, family.help, labels=labels)
        reading: HistogramReading
        for values, reading in family.read(cache):
            buckets = [(_le(bound), count) for bound, count in reading.cumulative()]
            histogram.add_metric(list(values), buckets, reading.sum)
        return histogram
    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    metric = kind(name, family.help, labels=labels)
    for values, value in family.read(cache):
        metric.add_metric(list(values), float(value))
    return metric


def _le(bound: float) -> str:
    """A bucket bound as ``prometheus_client`` writes its own (``1.0``, ``+Inf``)."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


def _empty(family: Family) -> Metric:
    name, labels = family.prometheus_name, list(family.labels)
    if family.kind == "counter":
        return CounterMetricFamily(name, family.help, labels=labels)
    if family.kind == "gauge":
        return GaugeMetricFamily(name, family.help, labels=labels)
    return HistogramMetricFamily(name, family.help, labels=labels)
