"""memofill's metrics and spans for OpenTelemetry (``memofill[otel]``: the API only).

::

    from memofill.contrib.otel import instrument

    instrument()          # the default instance, the global MeterProvider and TracerProvider

Until the application installs the OpenTelemetry SDK, every instrument and
span here is the API's no-op. What is recorded:

* **Observable instruments** over memofill's own tallies for the counters and
  gauges of :data:`memofill.metrics.FAMILIES` (``memofill.calls``,
  ``memofill.breaker.open``...): read when the SDK collects, never pushed per
  call, so a hit costs what it cost without them.
* **Histograms** (``memofill.fetch.duration``, ``memofill.wait.duration``,
  ``memofill.payload.size``, ``memofill.stale.age``), recorded from the miss
  and refresh records: the API has no observable histogram, and a miss takes
  milliseconds, so the push costs it little. Their buckets are advised to be
  memofill's (the Prometheus exporter's).
* A span ``memofill.fill`` per miss, a child of the caller's current span.
  A fill this process runs has its span current while it runs (lock, fetch,
  write), so the spans the fetch function makes are its children; a caller
  that joined another's fill gets a span from its miss to its answer. Each
  has ``memofill.dataset``, ``memofill.outcome``, ``memofill.wait.duration``,
  ``memofill.polls``, ``memofill.payload.size``, ``memofill.fetch.duration``;
  its status is an error when the fetch raised. The final Redis key (which may
  hold personal data) only with ``record_redis_key=True``.
* A span ``memofill.refresh`` per background refresh, in a trace of its own
  and **linked** to the span of the caller that started it, not nested in it:
  a refresh must not stretch the request that merely noticed the stale value.
  It is current while the refresh runs (the refresh work enters
  :meth:`memofill.hooks.Events.refresh_scope`), so the fetch's spans are its
  children.

Attributes carry the same closed label sets as the Prometheus exporter,
prefixed ``memofill.``.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.trace import Link, Status, StatusCode, Tracer

from memofill.hooks import RefreshLike
from memofill.instance import Memofill, default_instance
from memofill.metrics import (
    FAMILIES,
    Family,
    miss_observations,
    refresh_observations,
)
from memofill.outcomes import MissRecord, Outcome

__all__ = ["Instrumentation", "instrument"]

#: Outcomes whose span is an error: the caller (or the refresh) got the fetch's exception.
ERROR_OUTCOMES = frozenset({Outcome.FETCH_ERROR.value, "refresh_error"})


def _version() -> str:
    try:
        return metadata.version("memofill")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "0"


def _attributes(family: Family, labels: Iterable[str]) -> dict[str, str]:
    return {f"memofill.{name}": value for name, value in zip(family.labels, labels, strict=True)}


class Instrumentation:
    """One instance's instruments and hook; :meth:`uninstrument` stops them."""

    def __init__(
        self, cache: Memofill, meter: Meter, tracer: Tracer, *, record_redis_key: bool
    ) -> None:
        self.cache, self._tracer, self._record_key = cache, tracer, record_redis_key
        self._active = True
        self._histograms: dict[str, tuple[Family, Histogram]] = {}
        for family in FAMILIES:
            if family.kind == "histogram":
                histogram = meter.create_histogram(
                    family.otel_name,
                    unit=family.unit,
                    description=family.help,
                    explicit_bucket_boundaries_advisory=list(family.bounds),
                )
                self._histograms[family.name] = (family, histogram)
            elif family.kind == "counter":
                meter.create_observable_counter(
                    family.otel_name, [self._observer(family)], family.unit, family.help
                )
            else:
                meter.create_observable_gauge(
                    family.otel_name, [self._observer(family)], family.unit, family.help
                )
        #: The span of the fill or refresh running in this context (by its name), until its
        #: record describes it.
        self._open: contextvars.ContextVar[tuple[str, trace.Span] | None] = contextvars.ContextVar(
            "memofill_open_span", default=None
        )
        self._stops = (cache.events.subscribe(self._on_record), cache.events.around(self))

    def uninstrument(self) -> None:
        """Stop recording: no more spans or histogram values; observers report nothing."""
        self._active = False
        for stop in self._stops:
            stop()

    def fill(self, dataset: str) -> contextlib.AbstractContextManager[object]:
        """The ``memofill.fill`` span of a fill this process runs, under the caller's span."""
        span = self._tracer.start_span("memofill.fill", attributes={"memofill.dataset": dataset})
        return self._current("memofill.fill", span)

    def refresh(
        self, dataset: str, trigger: contextvars.Context | None
    ) -> contextlib.AbstractContextManager[object]:
        """The ``memofill.refresh`` span: a trace of its own, linked to the triggering caller."""
        caller = None
        if trigger is not None:
            caller = trigger.copy().run(trace.get_current_span).get_span_context()
        span = self._tracer.start_span(
            "memofill.refresh",
            context=otel_context.Context(),  # no parent: linked, not nested
            links=[Link(caller)] if caller is not None and caller.is_valid else [],
            attributes={"memofill.dataset": dataset},
        )
        return self._current("memofill.refresh", span)

    @contextlib.contextmanager
    def _current(self, name: str, span: trace.Span) -> Iterator[None]:
        """``span`` current while the work runs: the spans of its fetch are its children."""
        token = otel_context.attach(trace.set_span_in_context(span))
        opened = self._open.set((name, span))
        try:
            yield
        except BaseException as exc:  # a cancellation: the work ended without a record
            span.set_attribute("error.type", type(exc).__name__)
            raise
        finally:
            self._open.reset(opened)
            otel_context.detach(token)
            span.end()

    def _observer(self, family: Family) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            if not self._active:
                return []
            return [
                Observation(float(value), _attributes(family, labels))
                for labels, value in family.read(self.cache)
            ]

        return observe

    def _on_record(self, record: MissRecord | RefreshLike) -> None:
        """The hook: one span and the histogram values of one miss or refresh record."""
        end = time.time_ns()
        if isinstance(record, MissRecord):
            observations = miss_observations(record)
            self._fill_span(record, end)
        else:
            observations = refresh_observations(record)
            self._refresh_span(record, end)
        for name, labels, value in observations:
            family, histogram = self._histograms[name]
            histogram.record(value, _attributes(family, labels))

    def _fill_span(self, record: MissRecord, end: int) -> None:
        """Describe the open fill's span with its record; a joiner's miss gets a span of its own."""
        attributes: dict[str, Any] = {
            "memofill.dataset": record.dataset,
            "memofill.outcome": record.outcome.value,
            "memofill.wait.duration": record.waited_ms / 1000,
            "memofill.polls": record.polls,
            "memofill.payload.size": record.payload_bytes,
        }
        if record.fetch_ms is not None:
            attributes["memofill.fetch.duration"] = record.fetch_ms / 1000
        if self._record_key:
            attributes["memofill.redis_key"] = record.redis_key
        self._span(record, "memofill.fill", attributes, record.outcome.value, end)

    def _span(
        self,
        record: MissRecord | RefreshLike,
        name: str,
        attributes: dict[str, Any],
        outcome: str,
        end: int,
    ) -> None:
        """Describe the span its scope opened (which ends it), or make one ending now."""
        error = getattr(record, "error", None)
        opened = self._open.get()
        # A join's record is never its scope's own: it comes from a caller that ran no fill
        # (if in a scope, an outer one: a fetch that calls another cached function).
        if opened is not None and opened[0] == name and outcome != Outcome.LOCAL_JOIN.value:
            self._open.set(None)
            span = opened[1]
            span.set_attributes(attributes)
            self._describe(span, outcome, error)
            return
        start = end - round(record.elapsed_ms * 1e6)
        # A refresh is never nested in whatever span is current where it was recorded.
        parent = otel_context.Context() if name == "memofill.refresh" else None
        span = self._tracer.start_span(name, parent, start_time=start, attributes=attributes)
        self._describe(span, outcome, error)
        span.end(end_time=end)

    def _refresh_span(self, record: RefreshLike, end: int) -> None:
        """Describe the open refresh's span; a refresh recorded outside its scope gets one."""
        outcome = str(getattr(record.outcome, "value", record.outcome))
        attributes: dict[str, Any] = {
            "memofill.dataset": record.dataset,
            "memofill.outcome": outcome,
            "memofill.trigger": record.trigger,
        }
        if record.delta_ms is not None:
            attributes["memofill.fetch.duration"] = record.delta_ms / 1000
        if record.stale_age_ms is not None:
            attributes["memofill.stale.age"] = record.stale_age_ms / 1000
        self._span(record, "memofill.refresh", attributes, outcome, end)

    @staticmethod
    def _describe(span: trace.Span, outcome: str, error: str | None) -> None:
        if error is not None:
            span.set_attribute("error.type", error)
        if outcome in ERROR_OUTCOMES:
            span.set_status(Status(StatusCode.ERROR, error))


def instrument(
    cache: Memofill | None = None,
    *,
    meter_provider: otel_metrics.MeterProvider | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    record_redis_key: bool = False,
) -> Instrumentation:
    """Record ``cache``'s metrics and spans (default: the module-level instance).

    The providers default to the global ones. Call it once per instance: a
    second call records everything twice.
    """
    cache = default_instance() if cache is None else cache
    meter = otel_metrics.get_meter("memofill", _version(), meter_provider=meter_provider)
    tracer = trace.get_tracer("memofill", _version(), tracer_provider=tracer_provider)
    return Instrumentation(cache, meter, tracer, record_redis_key=record_redis_key)
