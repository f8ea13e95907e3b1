"""Serve stale while one caller refreshes, on fakeredis: the hit path's verdicts, the refresh's
outcomes, the hold after a failure, XFetch's rule, the header, and the plugin's helpers."""

from __future__ import annotations

import asyncio
import math
import random
import threading
from typing import Any

import attrs
import pytest

from memofill import CacheFill, Dataset, FillError, Memofill
from memofill.codec import HEADER_LEN, Header, decode_any, header_bytes, read_header
from memofill.freshness import (
    EARLY,
    EXPIRED,
    STALE,
    STALE_IF_ERROR,
    late_rule,
    verdict,
    xfetch_fires,
)
from memofill.keys import lock_key
from memofill.testing import Faults, Harness, Outcomes

FILL = CacheFill(lease_ms=2_000, wait_ms=1_000, poll_min_ms=5, poll_max_ms=50, refresh_retry_ms=300)
NEWS = Dataset("news:{lang}", ttl_s=60, stale_s=30, stale_if_error_s=120, cache_fill=FILL)
POLICIES = {NEWS.key: NEWS}


class Origin:
    def __init__(self) -> None:
        self.calls = 0
        self.failing = False
        self.gate: threading.Event | None = None

    def __call__(self, lang: str) -> dict[str, Any]:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.failing:
            raise RuntimeError("origin down")
        return {"lang": lang, "n": self.calls}


def cache_and_news(harness: Harness, origin: Origin, **options: Any) -> tuple[Memofill, Any]:
    cache = harness.adopt(Memofill(harness.client(), policies=POLICIES, **options))

    @cache.cached_dataset(NEWS.key)
    def news(lang: str) -> dict[str, Any]:
        return origin(lang)

    return cache, news


@pytest.fixture
def origin() -> Origin:
    return Origin()


@pytest.fixture
def outcomes(memofill_harness: Harness) -> Outcomes:
    return Outcomes(memofill_harness)


@pytest.fixture
def faults(memofill_harness: Harness) -> Faults:
    return Faults(memofill_harness)


# --- the rules, pure -------------------------------------------------------------------------


def test_verdicts_by_time_past_the_soft_deadline() -> None:
    header = Header(0, 10_000, 50, 0)
    assert verdict(9_999, header.soft_until_ms, 1_000, 5_000) == EARLY
    assert verdict(10_000, header.soft_until_ms, 1_000, 5_000) == STALE
    assert verdict(10_999, header.soft_until_ms, 1_000, 5_000) == STALE
    assert verdict(11_000, header.soft_until_ms, 1_000, 5_000) == STALE_IF_ERROR
    assert verdict(15_000, header.soft_until_ms, 1_000, 5_000) == EXPIRED
    assert verdict(10_000, header.soft_until_ms, 0, 0) == EXPIRED


def test_the_late_rule_reads_the_header_with_an_injected_clock() -> None:
    raw = header_bytes(Header(0, 10_000, 200, 0)) + b"{}"
    assert not late_rule(0.0, clock=lambda: 9.9)(raw)
    assert late_rule(0.0, clock=lambda: 10.0)(raw)
    # β = 1: with a draw of 0 (u = 1), nothing fires before the deadline...
    assert not late_rule(1.0, clock=lambda: 9.9, draw=lambda: 0.0)(raw)
    # ... and a draw near 1 (u near 0) always does.
    assert late_rule(1.0, clock=lambda: 9.0, draw=lambda: 1 - 2**-53)(raw)


def test_xfetch_seeded_simulation_refreshes_hot_keys_before_the_deadline() -> None:
    """Poisson reads at 100/s, δ = 0.2 s, β = 1: the rule itself, over 2,000 refresh cycles.

    A cycle is refreshed in time when its first trigger lands at least δ before the
    soft deadline; the triggers fired while that refresh runs are lock attempts.
    """
    rng = random.Random(13)
    rate, delta_ms, beta, ttl_ms = 100.0, 200.0, 1.0, 10_000.0
    in_time, attempts, cycles = 0, 0, 2_000
    for _ in range(cycles):
        now, soft, first = 0.0, ttl_ms, None
        while now < soft + delta_ms:
            now += rng.expovariate(rate) * 1000
            fired = now >= soft or xfetch_fires(now, soft, delta_ms, beta, 1.0 - rng.random())
            if first is None and fired:
                first = now
            if first is not None and fired and now < first + delta_ms:
                attempts += 1
            if first is not None and now >= first + delta_ms:
                break
        assert first is not None
        in_time += first + delta_ms <= soft
    assert in_time / cycles >= 0.99
    assert attempts / cycles <= 3.2
    assert abs(attempts / cycles - math.e) < 0.3  # e^(1/β) triggers per cycle


# --- the header ----------------------------------------------------------------------------


def test_the_header_is_fixed_width_text_and_round_trips() -> None:
    header = Header(1_764_547_200_123, 1_764_547_260_123, 187, 3)
    raw = header_bytes(header)
    assert len(raw) == HEADER_LEN
    assert raw.decode("ascii").isprintable() is False  # the type byte, 0x01
    assert raw[1:].decode("ascii").isalnum()
    assert read_header(raw + b"[1]") == header
    assert decode_any(raw + b"[1]") == [1]
    assert read_header(b"[1]") is None
    assert read_header(b"\x011" + b"z" * 40) is None


def test_a_headerless_value_reads_as_fresh_until_redis_expires_it(
    memofill_harness: Harness, origin: Origin
) -> None:
    cache, news = cache_and_news(memofill_harness, origin)
    memofill_harness.plain_client().set("news:en", b'{"lang":"en","n":0}', px=60_000)
    assert news.call_with_outcome("en").outcome == "hit"
    assert origin.calls == 0
    assert cache.refreshes.in_flight() == 0  # no refresh was handed off


def test_a_fill_writes_the_header_and_px_covers_the_windows(
    memofill_harness: Harness, origin: Origin
) -> None:
    _, news = cache_and_news(memofill_harness, origin)
    news("en")
    raw = memofill_harness.plain_client().get("news:en")
    header = read_header(raw)
    assert header is not None
    assert header.soft_until_ms - header.fetch_start_ms == 60_000
    assert memofill_harness.plain_client().pttl("news:en") > 170_000


# --- stale hits and refreshes ----------------------------------------------------------------


def test_a_stale_read_is_served_at_once_and_refreshed_once(
    memofill_harness: Harness, origin: Origin, faults: Faults, outcomes: Outcomes
) -> None:
    cache, news = cache_and_news(memofill_harness, origin)
    news("en")
    faults.make_stale(news, "en")
    origin.gate = threading.Event()
    results = [news.call_with_outcome("en") for _ in range(5)]
    assert {r.outcome for r in results} == {"stale_hit"}
    assert {r.value["n"] for r in results} == {1}
    origin.gate.set()
    (record,) = outcomes.wait_for_refreshes()
    assert (record.outcome, record.trigger) == ("refresh_fill", "stale")
    assert record.stale_age_ms >= 0
    assert origin.calls == 2
    assert news.call_with_outcome("en").outcome == "hit"
    assert news("en")["n"] == 2
    counts = cache.counters.snapshot()[NEWS.key]
    assert counts["stale_hit"] == 5
    assert counts["hit"] == 2  # stale hits are never hits
    assert counts["refresh_fill"] == 1


def test_a_refresh_that_finds_the_lock_held_sets_the_busy_memo(
    memofill_harness: Harness, origin: Origin, faults: Faults, outcomes: Outcomes
) -> None:
    cache, news = cache_and_news(memofill_harness, origin)
    news("en")
    faults.make_stale(news, "en")
    client = memofill_harness.plain_client()
    client.set(lock_key("news:en"), b"another-process", px=2_000)
    attempts = []
    original = cache._sync.acquire  # type: ignore[union-attr]

    def counted(*args: Any) -> Any:
        attempts.append(args)
        return original(*args)

    cache._sync.acquire = counted  # type: ignore[union-attr]
    for _ in range(20):
        assert news.call_with_outcome("en").outcome == "stale_hit"
        outcomes.wait_for_refreshes()
    assert len(attempts) == 1  # the busy memo kept the other 19 from asking
    assert cache.counters.snapshot()[NEWS.key]["refresh_busy"] == 1
    assert origin.calls == 1


def test_a_failed_refresh_holds_the_lock_and_keeps_serving_stale(
    memofill_harness: Harness, origin: Origin, faults: Faults, outcomes: Outcomes
) -> None:
    _, news = cache_and_news(memofill_harness, origin)
    news("en")
    faults.make_stale(news, "en")
    origin.failing = True
    assert news.call_with_outcome("en").outcome == "stale_hit"
    (record,) = outcomes.wait_for_refreshes()
    assert (record.outcome, record.error, record.levelname) == (
        "refresh_error",
        "RuntimeError",
        "WARNING",
    )
    client = memofill_harness.plain_client()
    assert 0 < client.pttl(lock_key("news:en")) <= 300  # held for refresh_retry_ms, not deleted
    other, other_news = cache_and_news(memofill_harness, origin)  # another process
    for _ in range(10):
        assert other_news.call_with_outcome("en").outcome == "stale_hit"
    outcomes.wait_for_refreshes()
    assert origin.calls == 2  # the fill, and the one failed refresh
    assert other.counters.snapshot()[NEWS.key]["refresh_busy"] == 1


def test_a_failed_refresh_holds_the_lock_for_the_retry_that_fits_a_short_window(
    memofill_harness: Harness, origin: Origin, faults: Faults, outcomes: Outcomes
) -> None:
    """No refresh_retry_ms given, stale_s=1: the lock is held 1 s (not 5 s) after a failure."""
    short = Dataset(
        "short:{lang}", ttl_s=60, stale_s=1, cache_fill=attrs.evolve(FILL, refresh_retry_ms=None)
    )
    cache = memofill_harness.adopt(Memofill(memofill_harness.client(), policies={short.key: short}))

    @cache.cached_dataset(short.key)
    def news(lang: str) -> dict[str, Any]:
        return origin(lang)

    news("en")
    faults.make_stale(news, "en")
    origin.failing = True
    assert news.call_with_outcome("en").outcome == "stale_hit"
    (record,) = outcomes.wait_for_refreshes()
    assert record.outcome == "refresh_error"
    held_ms = memofill_harness.plain_client().pttl(lock_key("short:en"))
    assert 300 < held_ms <= 1_000


def test_past_stale_s_a_failed_fill_serves_the_stale_value(
    memofill_harness: Harness, origin: Origin, faults: Faults
) -> None:
    _, news = cache_and_news(memofill_harness, origin)
    news("en")
    faults.make_stale(news, "en", by_s=40)
    origin.failing = True
    result = news.call_with_outcome("en")
    assert (result.outcome, result.value["n"]) == ("stale_on_error", 1)
    # The fleet backs off: the next callers get the stale value without calling the origin.
    for _ in range(5):
        assert news.call_with_outcome("en").outcome == "stale_on_error"
    assert origin.calls == 2
    faults.make_stale(news, "en", by_s=200)  # past every window
    with pytest.raises(FillError):
        news("en")
    assert origin.calls == 2


def test_past_stale_s_a_fill_that_works_replaces_the_value(
    memofill_harness: Harness, origin: Origin, faults: Faults
) -> None:
    _, news = cache_and_news(memofill_harness, origin)
    news("en")
    faults.make_stale(news, "en", by_s=40)
    result = news.call_with_outcome("en")
    assert (result.outcome, result.value["n"]) == ("leader_fill", 2)


def test_a_full_pool_drops_refreshes_and_counts_them(
    memofill_harness: Harness, origin: Origin, faults: Faults, outcomes: Outcomes
) -> None:
    cache, news = cache_and_news(memofill_harness, origin, refresh_workers=1)
    langs = [f"l{i}" for i in range(6)]
    for lang in langs:
        news(lang)
        faults.make_stale(news, lang)
    origin.gate = threading.Event()
    for lang in langs:
        assert news.call_with_outcome(lang).outcome == "stale_hit"
    origin.gate.set()
    outcomes.wait_for_refreshes()
    counts = cache.counters.snapshot()[NEWS.key]
    assert counts["refresh_dropped"] == 3  # one running, two queued
    assert counts["refresh_fill"] == 3
    assert cache.metrics.refreshes() == {
        (NEWS.key, "stale", "refresh_dropped"): 3,
        (NEWS.key, "stale", "refresh_fill"): 3,
    }


def test_inline_mode_refreshes_in_the_caller(
    memofill_harness: Harness, origin: Origin, faults: Faults
) -> None:
    cache, news = cache_and_news(memofill_harness, origin, refresh="inline")
    news("en")
    faults.make_stale(news, "en")
    result = news.call_with_outcome("en")
    assert (result.outcome, result.value["n"]) == ("stale_hit", 2)
    assert cache.refreshes.in_flight() == 0
    assert news.call_with_outcome("en").outcome == "hit"


def test_early_refresh_with_beta_refreshes_a_fresh_value(
    memofill_harness: Harness, origin: Origin, outcomes: Outcomes
) -> None:
    early = Dataset(
        "early:{lang}", ttl_s=60, cache_fill=CacheFill(2_000, 1_000, 5, 50, early_beta=50.0)
    )
    cache = memofill_harness.adopt(Memofill(memofill_harness.client(), policies=[early]))
    news = cache.cached_dataset(early.key)(lambda lang: {"n": origin(lang)["n"]})
    news("en")
    # δ is about 0 here. Set to the most the header holds (49 days), the draw fires unless
    # -ln(1 - u) < 60 s / (β·δ), about one read in 3.6 million: the test does not hang on luck.
    client = memofill_harness.plain_client()
    raw = client.get("early:en")
    header = read_header(raw)
    assert header is not None
    client.set(
        "early:en",
        header_bytes(header._replace(delta_ms=16**8 - 1)) + raw[HEADER_LEN:],
        keepttl=True,
    )
    result = news.call_with_outcome("en")
    assert result.outcome == "hit"
    (record,) = outcomes.wait_for_refreshes()
    assert (record.outcome, record.trigger) == ("refresh_fill", "early")
    assert record.stale_age_ms < 0


def test_configure_refuses_unknown_refresh_modes() -> None:
    from memofill import ConfigurationError  # noqa: PLC0415

    with pytest.raises(ConfigurationError, match="refresh='later'"):
        Memofill(refresh="later")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="refresh_workers=0"):
        Memofill(refresh_workers=0)
    cache = Memofill(refresh="inline", refresh_workers=2)
    cache.configure(refresh="background")
    assert (cache.refreshes.mode, cache.refreshes.workers) == ("background", 2)


async def test_an_asyncio_stale_read_hands_the_refresh_to_a_task(
    memofill_harness: Harness, faults: Faults
) -> None:
    calls = []
    cache = memofill_harness.adopt(
        Memofill(async_client=memofill_harness.async_client(), policies=POLICIES)
    )

    @cache.cached_dataset(NEWS.key)
    async def news(lang: str) -> dict[str, Any]:
        calls.append(lang)
        await asyncio.sleep(0.05)
        return {"n": len(calls)}

    await news("en")
    faults.make_stale(news, "en")
    assert (await news.call_with_outcome("en")).outcome == "stale_hit"
    assert len(cache.refreshes.tasks) == 1
    await asyncio.gather(*cache.refreshes.tasks)
    assert (await news.call_with_outcome("en")).value == {"n": 2}


def test_bytes_that_only_look_like_a_header_are_a_miss_and_are_refilled(
    memofill_harness: Harness, origin: Origin
) -> None:
    _, news = cache_and_news(memofill_harness, origin)
    memofill_harness.plain_client().set("news:en", b"\x011" + b"zz" * 30, px=60_000)
    assert news.call_with_outcome("en").outcome == "leader_fill"
    assert news.call_with_outcome("en").outcome == "hit"


@pytest.mark.memofill(policies=POLICIES)
def test_the_plugin_fixtures_make_a_value_stale_and_wait_for_its_refresh(
    memofill_cache: Memofill, memofill_faults: Faults, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset(NEWS.key)
    def news(lang: str) -> list[str]:
        return [lang]

    news("en")
    key = memofill_faults.make_stale(news, "en")
    assert key == "news:en"
    assert news.call_with_outcome("en").outcome == "stale_hit"
    (record,) = memofill_outcomes.wait_for_refreshes()
    assert record.outcome == "refresh_fill"
    memofill_outcomes.assert_outcomes(NEWS.key, leader_fill=1, stale_hit=1, refresh_fill=1)
    with pytest.raises(LookupError, match="call the function first"):
        memofill_faults.make_stale(news, "fr")
