"""The exporters, for real: a Prometheus registry scraped over HTTP, OpenTelemetry's SDK.

The stampede runs against a private redis-server: four instances (each what a
worker process has: its own connections, fills in flight and counters), each
with a collector on a registry of its own served by ``start_http_server``, as
Prometheus would scrape four workers. Their numbers, summed, must say what the
stampede did: one ``leader_fill``, every other caller a follower or a join.
"""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import attrs
import fakeredis
import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from memofill import CacheFill, ConfigurationError, Dataset, Memofill
from memofill.codec import HEADER_LEN, Header, header_bytes, read_header
from memofill.contrib.otel import instrument
from memofill.contrib.prometheus import MemofillCollector, start_worker_server
from memofill.freshness import wall_clock
from memofill.metrics import (
    FAMILIES,
    REFRESH_OUTCOMES,
    REFRESH_TRIGGERS,
    Family,
    call_outcomes,
    register,
)
from tests.conftest import POLICIES
from tests.support.helpers import Refresh
from tests.support.redis_servers import RedisServer, bindable, free_port

HOT = Dataset(
    "hot:{name}",
    ttl_s=60,
    cache_fill=CacheFill(lease_ms=10_000, wait_ms=8_000, poll_min_ms=10, poll_max_ms=200),
)

#: Samples of one scrape: ``(name, labels as a sorted tuple of pairs) -> value``.
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Scrape:
    """``GET /metrics`` over HTTP, parsed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def calls(samples: Scrape, dataset: str) -> Counter[str]:
    """``memofill_calls_total`` of one dataset, by outcome, zeros left out."""
    counts: Counter[str] = Counter()
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "memofill_calls_total" and label["dataset"] == dataset and value:
            counts[label["outcome"]] += int(value)
    return counts


@pytest.fixture
def served(redis_server: RedisServer) -> Iterator[list[tuple[Memofill, int]]]:
    """Four instances on the real server, each exported on a port of its own."""
    clients, servers, out = [], [], []
    for _ in range(4):
        client = redis_server.client(max_connections=64)
        cache = Memofill(client, prefix="export:", policies={HOT.key: HOT, **POLICIES})
        registry, port = CollectorRegistry(), free_port()
        registry.register(MemofillCollector(cache))
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        clients.append(client)
        servers.append(server)
        out.append((cache, port))
    yield out
    for server in servers:
        server.shutdown()
        server.server_close()
    for client in clients:
        client.close()


@pytest.mark.redis_server
def test_a_scrape_over_http_reads_the_numbers_of_a_real_stampede(
    served: list[tuple[Memofill, int]], real_client: redis.Redis
) -> None:
    real_client.delete("export:hot:quote", "export:origin")
    callers_per_instance = 25
    barrier = threading.Barrier(len(served) * callers_per_instance)
    values: list[Any] = []
    fetches = []
    for cache, _ in served:

        @cache.cached_dataset(HOT.key)
        def fetch(name: str) -> dict[str, str]:
            real_client.incr("export:origin")
            threading.Event().wait(0.3)
            return {"name": name}

        fetches.append(fetch)

    def call(fetch: Any) -> None:
        barrier.wait(30)
        values.append(fetch("quote"))

    threads = [
        threading.Thread(target=call, args=(fetch,))
        for fetch in fetches
        for _ in range(callers_per_instance)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for fetch in fetches:
        fetch("quote")  # one hit each, after the stampede

    assert values == [{"name": "quote"}] * 100
    assert int(real_client.get("export:origin") or 0) == 1
    total: Counter[str] = Counter()
    scrapes = [scrape(port) for _, port in served]
    for samples in scrapes:
        total += calls(samples, HOT.key)
    assert total["leader_fill"] == 1
    assert total["hit"] == 4
    waiting = total["follower_hit"] + total["local_join"] + total["leader_recheck_hit"]
    assert waiting == 99
    assert set(total) <= {"leader_fill", "hit", "follower_hit", "local_join", "leader_recheck_hit"}
    # The leader's fetch took the 300 ms, and the followers' waits are in their histogram.
    fetched = sum(
        value
        for samples in scrapes
        for (name, labels), value in samples.items()
        if name == "memofill_fetch_duration_seconds_sum" and ("dataset", HOT.key) in labels
    )
    assert fetched >= 0.3
    waits = sum(
        value
        for samples in scrapes
        for (name, labels), value in samples.items()
        if name == "memofill_wait_duration_seconds_count" and ("outcome", "follower_hit") in labels
    )
    assert waits == total["follower_hit"]
    for samples in scrapes:
        assert samples["memofill_breaker_open", ()] == 0
        assert samples["memofill_breaker_trips_total", ()] == 0
        # No label anywhere carries a final Redis key.
        assert not [labels for _, labels in samples if any("export:" in v for _, v in labels)]


def test_series_grow_with_the_datasets_used_not_with_the_registry(
    fake_client: redis.Redis,
) -> None:
    """2,000 registered datasets, one used: one dataset's series, not 2,000's.

    Once used, a dataset has a series at zero for every outcome (``rate()`` sees
    the first of each); ``every_dataset=True`` shows every registered one from the start.
    """
    policies = {f"set{n}:{{id}}": Dataset(f"set{n}:{{id}}", ttl_s=60) for n in range(2_000)}
    cache = Memofill(fake_client, policies=policies)
    registry, port = CollectorRegistry(), free_port()
    registry.register(MemofillCollector(cache))
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        assert not {labels for name, labels in scrape(port) if labels}  # nothing used yet
        fetch = cache.cached_dataset("set7:{id}")(lambda id: {"id": id})
        fetch(1)
        fetch(1)
        samples = scrape(port)
    finally:
        server.shutdown()
        server.server_close()
    series = {labels for name, labels in samples if name == "memofill_calls_total"}
    assert series == {(("dataset", "set7:{id}"), ("outcome", o)) for o in call_outcomes()}
    assert calls(samples, "set7:{id}") == Counter(hit=1, legacy=1)
    named = {dict(labels).get("dataset") for _, labels in samples}
    assert named == {None, "set7:{id}"}  # no sample of the 1,999 datasets not used

    every = CollectorRegistry()
    every.register(MemofillCollector(cache, every_dataset=True))
    text = generate_latest(every).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "memofill_calls"]
    counted = {(s.labels["dataset"], s.labels["outcome"]): s.value for s in family.samples}
    assert len(counted) == len(policies) * len(call_outcomes())
    assert counted["set7:{id}", "hit"] == 1.0
    assert counted["set8:{id}", "hit"] == 0.0


def test_histograms_per_dataset_summed_over_datasets_or_off(fake_client: redis.Redis) -> None:
    cache = Memofill(fake_client, policies=POLICIES)
    for key in ("item:{name}", "fast:{name}"):
        cache.cached_dataset(key)(lambda name: {"name": name})("a")

    def histograms(**options: Any) -> dict[tuple[tuple[str, str], ...], float]:
        registry = CollectorRegistry()
        registry.register(MemofillCollector(cache, **options))
        text = generate_latest(registry).decode()
        return {
            tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text)
            if f.name == "memofill_fetch_duration_seconds"
            for s in f.samples
            if s.name.endswith("_count")
        }

    assert histograms() == {
        (("dataset", "fast:{name}"), ("outcome", "leader_fill")): 1.0,
        (("dataset", "item:{name}"), ("outcome", "leader_fill")): 1.0,
    }
    assert histograms(histograms="total") == {(("outcome", "leader_fill"),): 2.0}
    assert histograms(histograms="off") == {}
    with pytest.raises(ConfigurationError, match="histograms='some'"):
        MemofillCollector(cache, histograms="some")  # type: ignore[arg-type]


def test_a_registered_family_is_exported_by_both(fake_client: redis.Redis) -> None:
    family = Family(
        "near.invalidations",
        "counter",
        "{invalidation}",
        "Near-cache entries dropped, by reason",
        ("reason",),
        lambda cache: [(("key",), 3), (("flush",), 1)],
    )
    register(family)  # a feature registers its families when memofill is imported
    try:
        cache = Memofill(fake_client, policies=POLICIES)
        registry, reader = CollectorRegistry(), InMemoryMetricReader()
        registry.register(MemofillCollector(cache))
        instrument(cache, meter_provider=MeterProvider(metric_readers=[reader]))
        text = generate_latest(registry).decode()
        data = reader.get_metrics_data()
    finally:
        FAMILIES.remove(family)
    assert data is not None
    (points,) = [
        list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "memofill.near.invalidations"
    ]
    assert 'memofill_near_invalidations_total{reason="key"} 3.0' in text
    assert 'memofill_near_invalidations_total{reason="flush"} 1.0' in text
    assert {(p.attributes["memofill.reason"], p.value) for p in points} == {
        ("key", 3),
        ("flush", 1),
    }


def test_a_scrape_of_an_instance_without_policies_does_not_fail() -> None:
    cache = Memofill(policies="no_such_module.policies")  # loaded on first use: it fails
    registry = CollectorRegistry()
    registry.register(MemofillCollector(cache))
    text = generate_latest(registry).decode()
    assert "memofill_breaker_open 0.0" in text
    assert "memofill_calls_total{" not in text  # no dataset known, none counted


# --- OpenTelemetry ---------------------------------------------------------------------------


@attrs.frozen
class Telemetry:
    cache: Memofill
    reader: InMemoryMetricReader
    spans: InMemorySpanExporter
    tracer: trace.Tracer

    def metrics(self) -> dict[str, list[Any]]:
        """Instrument name -> its data points, as collected now."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            metric.name: list(metric.data.data_points)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }


@pytest.fixture
def telemetry(fake_client: redis.Redis) -> Telemetry:
    cache = Memofill(fake_client, prefix="t:", policies=POLICIES)
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    instrument(
        cache,
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracer_provider,
    )
    return Telemetry(cache, reader, spans, tracer_provider.get_tracer("app"))


def test_otel_observes_the_tallies_and_records_the_miss_histograms(telemetry: Telemetry) -> None:
    fetch = telemetry.cache.cached_dataset("item:{name}")(lambda name: {"name": name})
    fetch("a")
    fetch("a")
    fetch("a")
    metrics = telemetry.metrics()
    observed = {f"memofill.{f.name}" for f in FAMILIES if f.kind != "histogram"}
    # No refresh yet, no dataset keeps near copies, nothing invalidated: no point for those.
    quiet = {"memofill.refreshes", "memofill.near.serving", "memofill.behind_marks"}
    assert observed - quiet <= set(metrics)
    counted = {
        (p.attributes["memofill.dataset"], p.attributes["memofill.outcome"]): p.value
        for p in metrics["memofill.calls"]
    }
    assert len(counted) == len(call_outcomes())  # the dataset used: every outcome, zeros too
    assert counted["item:{name}", "hit"] == 2
    assert counted["item:{name}", "leader_fill"] == 1
    (fetched,) = metrics["memofill.fetch.duration"]
    assert dict(fetched.attributes) == {
        "memofill.dataset": "item:{name}",
        "memofill.outcome": "leader_fill",
    }
    assert fetched.count == 1
    assert list(fetched.explicit_bounds) == list(
        next(f.bounds for f in FAMILIES if f.name == "fetch.duration")
    )
    (size,) = metrics["memofill.payload.size"]
    assert size.sum == len(b'{"name":"a"}')
    assert [p.value for p in metrics["memofill.breaker.open"]] == [0]


def test_a_miss_is_a_span_under_the_callers_span(telemetry: Telemetry) -> None:
    class Boom(Exception):
        pass

    def failing(name: str) -> str:
        raise Boom

    fetch = telemetry.cache.cached_dataset("item:{name}")(lambda name: name)
    broken = telemetry.cache.cached_dataset("fast:{name}")(failing)
    with telemetry.tracer.start_as_current_span("GET /items") as request:
        fetch("a")
        fetch("a")  # a hit: no span
        with pytest.raises(Boom):
            broken("b")
    fills = [s for s in telemetry.spans.get_finished_spans() if s.name == "memofill.fill"]
    assert len(fills) == 2
    for span in fills:
        assert span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id
        assert "memofill.redis_key" not in span.attributes  # only when asked for
        assert span.end_time is not None
        assert span.start_time is not None
        assert span.start_time <= span.end_time
    filled, failed = fills
    assert filled.attributes["memofill.outcome"] == "leader_fill"
    assert filled.attributes["memofill.dataset"] == "item:{name}"
    assert filled.status.status_code is trace.StatusCode.UNSET
    assert failed.attributes["memofill.outcome"] == "fetch_error"
    assert failed.attributes["error.type"] == "Boom"
    assert failed.status.status_code is trace.StatusCode.ERROR


def test_the_fetchs_own_spans_are_children_of_the_fill(telemetry: Telemetry) -> None:
    app_tracer = telemetry.tracer

    def fetch(name: str) -> str:
        with app_tracer.start_as_current_span("GET upstream"):
            return name

    cached = telemetry.cache.cached_dataset("item:{name}")(fetch)
    with app_tracer.start_as_current_span("GET /items") as request:
        assert cached("a") == "a"
    spans = {span.name: span for span in telemetry.spans.get_finished_spans()}
    fill, upstream = spans["memofill.fill"], spans["GET upstream"]
    assert fill.parent is not None
    assert fill.parent.span_id == request.get_span_context().span_id
    assert upstream.parent is not None
    assert upstream.parent.span_id == fill.context.span_id
    assert fill.attributes["memofill.outcome"] == "leader_fill"
    assert fill.attributes["memofill.fetch.duration"] > 0


async def test_an_asyncio_fill_parents_the_fetchs_spans_too() -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    cache = Memofill(fakeredis.FakeAsyncRedis(), prefix="t:", policies=POLICIES)
    instrument(cache, meter_provider=MeterProvider(), tracer_provider=tracer_provider)
    app_tracer = tracer_provider.get_tracer("app")

    @cache.cached_dataset("item:{name}")
    async def fetch(name: str) -> str:
        with app_tracer.start_as_current_span("GET upstream"):
            await asyncio.sleep(0.01)
            return name

    with app_tracer.start_as_current_span("GET /items") as request:
        assert await asyncio.gather(fetch("a"), fetch("a")) == ["a", "a"]
    finished = spans.get_finished_spans()
    (upstream,) = [span for span in finished if span.name == "GET upstream"]
    fills = {
        span.attributes["memofill.outcome"]: span
        for span in finished
        if span.name == "memofill.fill"
    }
    assert set(fills) == {"leader_fill", "local_join"}
    assert upstream.parent is not None
    assert upstream.parent.span_id == fills["leader_fill"].context.span_id
    for span in fills.values():
        assert span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id


def test_callers_joined_to_one_fill_each_get_a_span(telemetry: Telemetry) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(name: str) -> str:
        started.set()
        release.wait(5)
        return name

    cached = telemetry.cache.cached_dataset("item:{name}")(slow)
    leader = threading.Thread(target=cached, args=("a",))
    leader.start()
    started.wait(5)
    joiner = threading.Thread(target=cached, args=("a",))
    joiner.start()
    threading.Timer(0.1, release.set).start()
    leader.join(10)
    joiner.join(10)
    outcomes = sorted(
        span.attributes["memofill.outcome"]
        for span in telemetry.spans.get_finished_spans()
        if span.name == "memofill.fill"
    )
    assert outcomes == ["leader_fill", "local_join"]


def test_a_fetch_that_joins_another_cached_call_describes_only_its_own_span(
    telemetry: Telemetry,
) -> None:
    started, release = threading.Event(), threading.Event()

    def slow_inner(name: str) -> str:
        started.set()
        release.wait(5)
        return name

    inner = telemetry.cache.cached_dataset("fast:{name}")(slow_inner)
    outer = telemetry.cache.cached_dataset("item:{name}")(lambda name: inner(name) + "!")
    other = threading.Thread(target=inner, args=("a",))
    other.start()
    started.wait(5)
    threading.Timer(0.1, release.set).start()
    assert outer("a") == "a!"  # its fetch joins the other thread's fill of fast:a
    other.join(10)
    fills = {
        (span.attributes["memofill.dataset"], span.attributes["memofill.outcome"]): span
        for span in telemetry.spans.get_finished_spans()
        if span.name == "memofill.fill"
    }
    assert set(fills) == {
        ("fast:{name}", "leader_fill"),
        ("fast:{name}", "local_join"),
        ("item:{name}", "leader_fill"),
    }
    joined, outer_fill = fills["fast:{name}", "local_join"], fills["item:{name}", "leader_fill"]
    assert joined.parent is not None
    assert joined.parent.span_id == outer_fill.context.span_id


def test_a_scope_that_raises_is_told_once_and_the_fill_runs(
    telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def fill(self, dataset: str) -> Any:
            raise RuntimeError("scope bug")

        def refresh(self, dataset: str, trigger: contextvars.Context | None) -> Any:
            raise RuntimeError("scope bug")

    telemetry.cache.events.around(Broken())
    fetch = telemetry.cache.cached_dataset("item:{name}")(lambda name: name)
    assert [fetch(name) for name in "abc"] == ["a", "b", "c"]
    assert len([r for r in caplog.records if "hook" in r.getMessage()]) == 1
    fills = [s for s in telemetry.spans.get_finished_spans() if s.name == "memofill.fill"]
    assert len(fills) == 3  # the exporter's own scope still ran


def test_a_refresh_is_a_span_linked_to_the_caller_that_started_it(telemetry: Telemetry) -> None:
    app_tracer = telemetry.tracer
    with app_tracer.start_as_current_span("GET /items") as request:
        trigger = contextvars.copy_context()  # the stale hit starts a refresh
    # Later, in the background, with another span current:
    with (
        app_tracer.start_as_current_span("unrelated"),
        telemetry.cache.events.refresh_scope("item:{name}", trigger),
    ):
        with app_tracer.start_as_current_span("GET upstream"):
            pass  # the refresh's fetch
        record = Refresh("item:{name}", "stale", "refresh_fill", 40.0, 35.0, 61_000.0)
        telemetry.cache.metrics.refreshed(record)
    spans = {span.name: span for span in telemetry.spans.get_finished_spans()}
    refresh = spans["memofill.refresh"]
    assert refresh.parent is None  # a trace of its own, not nested in the request
    (link,) = refresh.links
    assert link.context.span_id == request.get_span_context().span_id
    upstream = spans["GET upstream"]
    assert upstream.parent is not None
    assert upstream.parent.span_id == refresh.context.span_id
    assert refresh.attributes["memofill.trigger"] == "stale"
    assert refresh.attributes["memofill.outcome"] == "refresh_fill"
    assert refresh.attributes["memofill.stale.age"] == 61.0
    metrics = telemetry.metrics()
    (counted,) = metrics["memofill.refreshes"]
    assert dict(counted.attributes) == {
        "memofill.dataset": "item:{name}",
        "memofill.trigger": "stale",
        "memofill.outcome": "refresh_fill",
    }
    assert counted.value == 1
    (age,) = metrics["memofill.stale.age"]
    assert age.sum == 61.0


def test_a_refresh_recorded_outside_its_scope_is_a_span_of_its_own(telemetry: Telemetry) -> None:
    with telemetry.tracer.start_as_current_span("unrelated"):
        record = Refresh("item:{name}", "early", "refresh_error", 40.0, 35.0, None)
        telemetry.cache.metrics.refreshed(record)
    (refresh,) = [s for s in telemetry.spans.get_finished_spans() if s.name == "memofill.refresh"]
    assert refresh.parent is None
    assert refresh.status.status_code is trace.StatusCode.ERROR


def test_uninstrument_stops_spans_and_observations(telemetry: Telemetry) -> None:
    fetch = telemetry.cache.cached_dataset("item:{name}")(lambda name: name)
    handle = instrument(telemetry.cache, meter_provider=MeterProvider(), tracer_provider=None)
    handle.uninstrument()
    fetch("a")
    assert len(telemetry.spans.get_finished_spans()) == 1  # the first instrumentation's only


# --- a real refresh, end to end --------------------------------------------------------------

STALE = Dataset(
    "news:{lang}",
    ttl_s=60,
    stale_s=30,
    cache_fill=CacheFill(lease_ms=2_000, wait_ms=1_000, poll_min_ms=5, poll_max_ms=50),
)


def age(client: redis.Redis, key: str) -> None:
    """Move the stored value's soft deadline a second into the past (what make_stale does)."""
    raw = client.get(key)
    assert isinstance(raw, bytes)
    header = read_header(raw)
    assert header is not None
    soft_until_ms = round((wall_clock() - 1) * 1000)
    aged = Header(soft_until_ms - 60_000, soft_until_ms, header.delta_ms, header.stamp)
    client.set(key, header_bytes(aged) + raw[HEADER_LEN:], keepttl=True)


def wait_for_refreshes(cache: Memofill) -> None:
    deadline = time.monotonic() + 10
    while cache.refreshes.in_flight():
        assert time.monotonic() < deadline, "a refresh was still in flight after 10 s"
        time.sleep(0.005)


def test_a_stale_hit_and_its_background_refresh_are_counted_spanned_and_linked(
    fake_client: redis.Redis,
) -> None:
    cache = Memofill(fake_client, prefix="t:", policies={STALE.key: STALE})
    reader, spans = InMemoryMetricReader(), InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    instrument(
        cache,
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracer_provider,
    )
    registry = CollectorRegistry()
    registry.register(MemofillCollector(cache))
    news = cache.cached_dataset(STALE.key)(lambda lang: {"lang": lang})
    before = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }
    refreshes = {k: v for k, v in before.items() if k[0] == "memofill_refreshes_total"}
    assert refreshes == {}  # no series before the dataset is used

    news("en")
    age(fake_client, news.redis_key("en"))
    app_tracer = tracer_provider.get_tracer("app")
    with app_tracer.start_as_current_span("GET /news") as request:
        assert news.call_with_outcome("en").outcome == "stale_hit"
    wait_for_refreshes(cache)

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }
    assert calls(samples, STALE.key) == {"leader_fill": 1, "stale_hit": 1}
    labels = (("dataset", STALE.key), ("outcome", "refresh_fill"), ("trigger", "stale"))
    assert samples["memofill_refreshes_total", labels] == 1
    refreshes = {k: v for k, v in samples.items() if k[0] == "memofill_refreshes_total"}
    assert len(refreshes) == len(REFRESH_TRIGGERS) * len(REFRESH_OUTCOMES)  # used: zeros too
    assert samples["memofill_stale_age_seconds_count", (("dataset", STALE.key),)] == 1
    fetched = (("dataset", STALE.key), ("outcome", "refresh_fill"))
    assert samples["memofill_fetch_duration_seconds_count", fetched] == 1

    refresh = next(s for s in spans.get_finished_spans() if s.name == "memofill.refresh")
    assert refresh.parent is None  # a trace of its own, not nested in the request
    (link,) = refresh.links
    assert link.context.span_id == request.get_span_context().span_id
    assert refresh.attributes is not None
    assert refresh.attributes["memofill.outcome"] == "refresh_fill"
    assert refresh.attributes["memofill.trigger"] == "stale"


def _serve_worker(first_port: int, workers: int, ports: Any, done: Any) -> None:
    """One worker process: take a port of the range for its metrics, then stay up."""
    try:
        ports.put(start_worker_server(first_port, workers, addr="127.0.0.1"))
    except ConfigurationError as exc:
        ports.put(str(exc))
    done.wait(30)


def test_each_worker_process_serves_its_metrics_on_a_port_of_its_own() -> None:
    """Three worker processes take the three ports of the range; a fourth is told none is left."""
    first = next(
        port
        for port in iter(free_port, None)
        if port + 2 <= 65_535 and all(bindable(port + n) for n in range(3))
    )
    context = multiprocessing.get_context("spawn")
    ports, done = context.Queue(), context.Event()
    workers = [
        context.Process(target=_serve_worker, args=(first, 3, ports, done)) for _ in range(4)
    ]
    try:
        taken = []
        for worker in workers:  # one after another: each finds the ports the others hold
            worker.start()
            taken.append(ports.get(timeout=30))
        assert sorted(taken[:3]) == [first, first + 1, first + 2]
        assert taken[3] == (
            f"no free port for this worker's metrics in {first}..{first + 2} on 127.0.0.1: "
            "give the range as many ports as there are workers"
        )
        for port in taken[:3]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
                assert reply.status == 200
    finally:
        done.set()
        for worker in workers:
            worker.join(30)
