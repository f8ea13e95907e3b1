"""The metrics core: histograms on tallies, hooks on miss records (never hits), the families.

No exporter here (see test_exporters.py): what the core promises is that it
depends on neither exporter, that a hook sees every miss and no hit, that a
hook's failure never reaches the caller, and that the exported label values
come from closed vocabularies.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from memofill import Memofill, Outcome
from memofill.fallback import Breaker
from memofill.metrics import (
    DURATION_BOUNDS,
    FAMILIES,
    FETCH_DURATION,
    PAYLOAD_SIZE,
    REFRESH_OUTCOMES,
    STALE_AGE,
    WAIT_DURATION,
    Family,
    Histogram,
    call_outcomes,
    register,
)
from memofill.outcomes import COUNTED_ONLY, MissRecord
from tests.conftest import POLICIES
from tests.support.helpers import Refresh

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
EXPORTER_MODULES = ("prometheus_client", "opentelemetry")


@pytest.fixture
def mf(fake_client: redis.Redis) -> Memofill:
    return Memofill(fake_client, prefix="m:", policies=POLICIES)


# --- no dependency ---------------------------------------------------------------------------

#: Imports memofill after everything its dependencies import, and prints what memofill added.
#: redis-py 8 itself imports ``opentelemetry.sdk`` when the SDK is installed (its own opt-in
#: observability), so "after its dependencies" is what memofill answers for.
ADDED_BY_MEMOFILL = """
import sys
import attrs, cattrs, orjson, redis, redis.asyncio, wrapt
before = set(sys.modules)
import memofill
memofill.Memofill(policies={"k": memofill.Dataset("k", ttl_s=1)})
print(sorted(set(sys.modules) - before))
"""

#: With both exporters' packages unimportable, memofill imports and serves a call.
WITHOUT_EXPORTERS = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prometheus_client", "opentelemetry"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Refuse())
import fakeredis, memofill
cache = memofill.Memofill(fakeredis.FakeRedis(), policies={"k": memofill.Dataset("k", ttl_s=9)})
fetch = cache.cached_dataset("k")(lambda: {"v": 1})
assert fetch() == fetch() == {"v": 1}
assert cache.counters.snapshot() == {"k": {"hit": 1, "legacy": 1}}
try:
    import memofill.contrib.prometheus
except ImportError as exc:
    print("prometheus refused:", exc)
"""


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_import_memofill_imports_neither_exporter() -> None:
    added = eval(_python(ADDED_BY_MEMOFILL))
    assert [name for name in added if name.startswith(EXPORTER_MODULES)] == []
    assert "memofill.metrics" in added  # the core is there; the contrib modules are not
    assert not [name for name in added if name.startswith("memofill.contrib")]


def test_memofill_works_where_neither_exporter_can_be_imported() -> None:
    out = _python(WITHOUT_EXPORTERS)
    assert "prometheus refused: No module named 'prometheus_client" in out


def test_a_plain_install_pulls_neither_exporter() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plain = " ".join(project["dependencies"]).lower()
    assert "prometheus" not in plain
    assert "opentelemetry" not in plain
    extras = project["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["prometheus"]] == ["prometheus-client"]
    assert [r.split(">")[0] for r in extras["otel"]] == ["opentelemetry-api"]  # never the SDK
    # And the installed distribution: no requirement without an extra marker names either.
    unmarked = [r for r in metadata.requires("memofill") or [] if "extra ==" not in r]
    assert unmarked
    assert not [r for r in unmarked if r.lower().startswith(("prometheus", "opentelemetry"))]


# --- histograms ------------------------------------------------------------------------------


def test_a_histogram_counts_each_value_in_the_first_bucket_at_or_over_it() -> None:
    histogram = Histogram((1.0, 10.0))
    for value in (0.5, 1.0, 1.5, 10.0, 11.0, 99.0):
        histogram.observe(value)
    reading = histogram.read()
    assert reading.buckets == (2, 2, 2)
    assert reading.count == 6
    assert reading.sum == pytest.approx(123.0)
    assert reading.cumulative() == [(1.0, 2), (10.0, 4), (float("inf"), 6)]
    histogram.reset()
    assert histogram.read().buckets == (0, 0, 0)


def test_concurrent_observations_are_all_counted() -> None:
    histogram = Histogram(DURATION_BOUNDS)

    def observe() -> None:
        for n in range(2000):
            histogram.observe(n / 1000)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reading = histogram.read()
    assert reading.count == 8000
    assert reading.sum == pytest.approx(4 * sum(n / 1000 for n in range(2000)))


def test_a_leader_fill_observes_fetch_duration_and_payload(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: {"name": name})
    fetch("a")
    fetch("a")  # a hit observes nothing
    ((labels, fetched),) = mf.metrics.histogram(FETCH_DURATION)
    assert labels == ("item:{name}", "leader_fill")
    assert fetched.count == 1
    ((labels, size),) = mf.metrics.histogram(PAYLOAD_SIZE)
    assert labels == ("item:{name}",)
    assert size.sum == len(b'{"name":"a"}')
    assert mf.metrics.histogram(WAIT_DURATION) == []


def test_the_fetch_is_timed_as_the_origin_alone(mf: Memofill, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="memofill")

    def slow(name: str) -> str:
        threading.Event().wait(0.05)
        return name

    mf.cached_dataset("item:{name}")(slow)("a")
    (record,) = [r for r in caplog.records if hasattr(r, "outcome")]
    assert record.fetch_ms >= 50
    assert record.elapsed_ms >= record.fetch_ms


async def test_a_coroutine_fetch_is_timed_until_it_is_done() -> None:
    seen: list[Any] = []
    async_mf = Memofill(fakeredis.FakeAsyncRedis(), prefix="m:", policies=POLICIES)
    async_mf.events.subscribe(seen.append)

    @async_mf.cached_dataset("item:{name}")
    async def fetch(name: str) -> str:
        await asyncio.sleep(0.05)
        return name

    assert await fetch("a") == "a"
    (record,) = seen
    assert record.outcome is Outcome.LEADER_FILL
    assert record.fetch_ms >= 50


def test_a_follower_observes_its_wait_and_no_fetch(fake_client: redis.Redis) -> None:
    leader = Memofill(fake_client, prefix="m:", policies=POLICIES)
    follower = Memofill(fake_client, prefix="m:", policies=POLICIES)
    started, release = threading.Event(), threading.Event()

    def slow(name: str) -> str:
        started.set()
        release.wait(5)
        return name

    lead = threading.Thread(target=leader.cached_dataset("item:{name}")(slow), args=("a",))
    lead.start()
    started.wait(5)
    seen: list[Any] = []
    follower.events.subscribe(seen.append)
    threading.Timer(0.05, release.set).start()
    assert follower.cached_dataset("item:{name}")(slow)("a") == "a"
    lead.join()
    (record,) = seen
    assert (record.outcome, record.fetch_ms) == (Outcome.FOLLOWER_HIT, None)
    ((labels, waited),) = follower.metrics.histogram(WAIT_DURATION)
    assert labels == ("item:{name}", "follower_hit")
    assert waited.count == 1
    assert waited.sum > 0
    assert follower.metrics.histogram(FETCH_DURATION) == []


# --- hooks -----------------------------------------------------------------------------------


def test_a_hook_gets_every_miss_record_and_no_hit(mf: Memofill) -> None:
    seen: list[Any] = []
    stop = mf.events.subscribe(seen.append)
    fetch = mf.cached_dataset("item:{name}")(lambda name: name)
    for name in ("a", "a", "a", "b", "c"):
        fetch(name)
    assert [(r.outcome, r.redis_key) for r in seen] == [
        (Outcome.LEADER_FILL, "m:item:a"),
        (Outcome.LEADER_FILL, "m:item:b"),
        (Outcome.LEADER_FILL, "m:item:c"),
    ]
    assert all(isinstance(r, MissRecord) for r in seen)
    stop()
    fetch("d")
    assert len(seen) == 3


def test_a_hook_that_raises_is_logged_once_and_the_caller_is_served(
    mf: Memofill, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def broken(record: MissRecord) -> None:
        raise RuntimeError("hook bug")

    mf.events.subscribe(broken)
    mf.events.subscribe(lambda record: calls.append(record.redis_key))
    fetch = mf.cached_dataset("item:{name}")(lambda name: name)
    assert [fetch(name) for name in ("a", "b", "c")] == ["a", "b", "c"]
    told = [r for r in caplog.records if "hook" in r.getMessage()]
    assert len(told) == 1
    assert told[0].levelno == logging.ERROR
    assert told[0].exc_info is not None
    assert calls == ["m:item:a", "m:item:b", "m:item:c"]  # the next hook still runs


def test_an_override_block_keeps_the_hooks_and_starts_the_histograms_from_zero(
    mf: Memofill, fake_client: redis.Redis
) -> None:
    seen: list[Any] = []
    mf.events.subscribe(seen.append)
    fetch = mf.cached_dataset("item:{name}")(lambda name: name)
    fetch("a")
    with mf.override(fake_client, prefix="o:"):
        assert mf.metrics.histogram(FETCH_DURATION) == []
        fetch("a")
        assert len(mf.metrics.histogram(FETCH_DURATION)) == 1
    assert len(seen) == 2
    ((_, outer),) = mf.metrics.histogram(FETCH_DURATION)
    assert outer.count == 1


def test_a_refresh_is_counted_observed_and_sent_inside_its_scopes(mf: Memofill) -> None:
    request = contextvars.ContextVar("request", default="none")
    log: list[Any] = []

    class Tracer:
        def fill(self, dataset: str) -> Any:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def refresh(self, dataset: str, trigger: contextvars.Context | None) -> Iterator[None]:
            assert trigger is not None
            log.append(("open", dataset, trigger.get(request)))
            yield
            log.append(("close", dataset))

    mf.events.around(Tracer())
    mf.events.subscribe(lambda record: log.append(("record", record.outcome)))
    request.set("GET /quotes")
    trigger = contextvars.copy_context()  # taken by the caller that saw the stale value
    request.set("none")
    record = Refresh("item:{name}", "stale", "refresh_fill", 30.0, 25.0, 4_000.0)
    with mf.events.refresh_scope(record.dataset, trigger):
        mf.metrics.refreshed(record)
    mf.metrics.refresh_counted("item:{name}", "stale", "refresh_busy")

    assert log == [
        ("open", "item:{name}", "GET /quotes"),
        ("record", "refresh_fill"),
        ("close", "item:{name}"),
    ]
    assert mf.metrics.refreshes() == {
        ("item:{name}", "stale", "refresh_fill"): 1,
        ("item:{name}", "stale", "refresh_busy"): 1,
    }
    ((labels, fetched),) = mf.metrics.histogram(FETCH_DURATION)
    assert (labels, fetched.sum) == (("item:{name}", "refresh_fill"), 0.025)
    ((labels, age),) = mf.metrics.histogram(STALE_AGE)
    assert (labels, age.sum) == (("item:{name}",), 4.0)


# --- the exported vocabulary -------------------------------------------------------------------


def test_call_outcomes_are_the_counted_names_and_every_miss_outcome() -> None:
    names = call_outcomes()
    assert names[: len(COUNTED_ONLY)] == COUNTED_ONLY
    assert set(names[len(COUNTED_ONLY) :]) == {o.value for o in Outcome} - set(REFRESH_OUTCOMES)
    assert len(set(names)) == len(names)


def test_the_breaker_counts_its_trips() -> None:
    breaker = Breaker(cooldown_s=5.0)
    breaker.failed(timed_out=False)
    for _ in range(3):
        breaker.failed(timed_out=True)
    assert breaker.trips.value == 2


def test_family_names_follow_each_exporters_conventions() -> None:
    by_name = {family.name: family for family in FAMILIES}
    assert by_name["calls"].prometheus_name == "memofill_calls"  # + _total on its samples
    assert by_name[FETCH_DURATION].prometheus_name == "memofill_fetch_duration_seconds"
    assert by_name[PAYLOAD_SIZE].prometheus_name == "memofill_payload_size_bytes"
    assert by_name["local_store.size"].prometheus_name == "memofill_local_store_size_bytes"
    assert by_name["breaker.open"].otel_name == "memofill.breaker.open"
    with pytest.raises(ValueError, match="already registered"):
        register(Family("calls", "gauge", "1", "again", (), lambda cache: []))
