"""What metrics add to a miss: the fetch's timing, the histograms, the hooks, an exporter's push.

A miss takes milliseconds (Redis round trips and the origin), so its extra
cost is measured on what the metrics add, not on whole misses, whose noise
would swamp a few microseconds: in a fresh process, each row times the miss
path's bookkeeping for one miss record, call by call, interleaved in rounds
with the bare row (the record built and logged, as before metrics existed).
Each row's extra is its median minus the bare row's median.

Only memofill's public API is used: the instance's ``metrics`` and ``events``,
the miss record's class as a hook receives it, and a copy of the two clock
reads the miss path wraps around the origin (it has no public handle).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from bench.common import interleaved, median

#: The rows: what runs per miss on top of the bare record.
ROWS = ("bare", "core", "core + hook", "core + OpenTelemetry")
#: The extra per miss that the core (timing, histograms, one hook) must stay under, in µs.
TARGET_US = 20.0


def _miss_record_class(memofill_class: Any, policies: dict[str, Any]) -> Any:
    """The class of memofill's miss records, as its hooks receive them.

    memofill exports no name for it: a hook on an instance without Redis sees
    the record of one real miss, whose type is the class the miss path builds.
    """
    cache = memofill_class(policies=policies)
    seen: list[Any] = []
    cache.events.subscribe(seen.append)
    logger = logging.getLogger("memofill")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the once-per-process warning that no client is configured
    try:
        cache.cached_dataset("item:{name}")(lambda name: {"n": 1})("probe")
    finally:
        logger.setLevel(level)
    if len(seen) != 1:
        raise RuntimeError(f"one miss gave {len(seen)} records to a hook, not one")
    return type(seen[0])


def _timed(miss: Any, origin: Callable[[], Any]) -> Callable[[], Any]:
    """The origin's call, its time kept on ``miss``: what memofill's miss path wraps around it.

    A copy (memofill has no public handle on its own): two monotonic reads in a
    ``try``/``finally``, as in the miss path, so the row times the same work.
    """

    def fetch() -> Any:
        started = time.monotonic()
        try:
            return origin()
        finally:
            miss.fetch_ms = (time.monotonic() - started) * 1000

    return fetch


def _rows() -> dict[str, Callable[[], Any]]:
    """In the child: each row's per-miss work, ready to call."""
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )

    from memofill import Dataset, Memofill, Outcome  # noqa: PLC0415
    from memofill.contrib.otel import instrument  # noqa: PLC0415

    policies = {"item:{name}": Dataset("item:{name}", ttl_s=60)}
    MissRecord = _miss_record_class(Memofill, policies)
    logging.getLogger("memofill").setLevel(logging.WARNING)  # INFO records not created
    caches = {row: Memofill(policies=policies) for row in ROWS}
    caches["core + hook"].events.subscribe(lambda record: None)
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    instrument(
        caches["core + OpenTelemetry"],
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
        tracer_provider=tracer_provider,
    )

    class Miss:
        fetch_ms: float | None = None

    def origin() -> dict[str, int]:
        return {"n": 1}

    def row(name: str) -> Callable[[], Any]:
        metrics = caches[name].metrics
        miss = Miss()
        fetch = _timed(miss, origin)

        def bare() -> None:
            origin()
            MissRecord(
                outcome=Outcome.LEADER_FILL,
                dataset="item:{name}",
                redis_key="bench:item:a",
                elapsed_ms=3.2,
                payload_bytes=420,
            ).emit()

        def measured() -> None:
            with metrics.events.fill_scope("item:{name}"):
                fetch()
                record = MissRecord(
                    outcome=Outcome.LEADER_FILL,
                    dataset="item:{name}",
                    redis_key="bench:item:a",
                    elapsed_ms=3.2,
                    payload_bytes=420,
                    fetch_ms=miss.fetch_ms,
                )
                record.emit()
                metrics.miss(record)

        return bare if name == "bare" else measured

    return {name: row(name) for name in ROWS}


def _measure(*, rounds: int, per_round: int, seed: int) -> dict[str, list[int]]:
    rows = _rows()
    for call in rows.values():
        for _ in range(per_round):
            call()
    return interleaved(rows, rounds=rounds, per_round=per_round, seed=seed)


def measure(*, iterations: int, rounds: int = 50, seed: int = 1) -> dict[str, Any]:
    """Median µs per miss of each row, and its extra over the bare row."""
    from bench.common import in_child  # noqa: PLC0415

    per_round = max(1, iterations // rounds)
    samples = in_child(_measure, rounds=rounds, per_round=per_round, seed=seed)
    medians = {name: median(sorted(values)) / 1000 for name, values in samples.items()}
    return {
        "iterations": per_round * rounds,
        "rows": {
            name: {"median_us": medians[name], "extra_us": medians[name] - medians["bare"]}
            for name in ROWS
        },
    }


def render(data: dict[str, Any]) -> list[str]:
    """The report's section."""
    lines = [
        "",
        "## What metrics add to a miss",
        "",
        f"{data['iterations']:,} timed calls per row, interleaved. *bare*: the miss record built "
        "and logged (INFO off), as without metrics; *core*: plus the fetch's timing, the "
        "scopes around the fill (none) and the histograms; *+ hook*: one no-op hook; "
        "*+ OpenTelemetry*: `instrument()` on the SDK (a `memofill.fill` span to a batch "
        "processor, two histograms recorded). Prometheus adds nothing per miss: it reads at "
        "scrape time.",
        "",
        "| row | median µs | extra µs per miss |",
        "|---|---:|---:|",
    ]
    for name, row in data["rows"].items():
        lines.append(f"| {name} | {row['median_us']:.2f} | {row['extra_us']:.2f} |")
    return [*lines, ""]
