"""The serve-stale registry fields: their rules, their generated form, and the PX they set."""

from __future__ import annotations

import math

import attrs
import pytest

from memofill import CacheFill, Dataset, Memofill, validate
from memofill.codegen import render
from memofill.policy import dataset_from_data, dataset_to_data, load_policies
from memofill.testing import Harness

FILL = CacheFill(lease_ms=2_500, wait_ms=2_000, poll_min_ms=25, poll_max_ms=500)
STALE = Dataset(
    "news:{lang}",
    ttl_s=60,
    stale_s=30,
    stale_if_error_s=300,
    cache_fill=attrs.evolve(FILL, early_beta=1.0, refresh_retry_ms=5_000),
)


def found(dataset: Dataset) -> list[tuple[str, object, str]]:
    return [(p.field, p.value, p.rule) for p in validate([dataset])]


def test_a_dataset_with_every_stale_field_is_valid() -> None:
    assert validate([STALE]) == []


def test_the_defaults_keep_todays_behaviour() -> None:
    plain = Dataset("a", ttl_s=1, cache_fill=FILL)
    assert (plain.stale_s, plain.stale_if_error_s, plain.window_s) == (0, 0, 0)
    assert (FILL.early_beta, FILL.refresh_retry_ms) == (0, None)
    assert plain.refresh_retry_ms == 5_000  # left out, and no stale window to fit
    assert plain.fill_in_force == attrs.evolve(FILL, refresh_retry_ms=5_000)


@pytest.mark.parametrize(
    ("changes", "fill_changes", "expected"),
    [
        ({"stale_s": -1}, {}, [("stale_s", -1, "must be >= 0")]),
        ({"stale_s": math.nan}, {}, [("stale_s", math.nan, "must be finite")]),
        ({"stale_s": "30"}, {}, [("stale_s", "30", "must be a number of seconds")]),
        (
            {"stale_if_error_s": 10},
            {},
            [
                (
                    "stale_if_error_s",
                    10,
                    "must be 0 or >= stale_s (30): it extends the stale window, never shortens it",
                )
            ],
        ),
        (
            {},
            {"early_beta": -0.5},
            [("cache_fill.early_beta", -0.5, "must be a finite number >= 0 (0: no early refresh)")],
        ),
        (
            {},
            {"early_beta": math.inf},
            [
                (
                    "cache_fill.early_beta",
                    math.inf,
                    "must be a finite number >= 0 (0: no early refresh)",
                )
            ],
        ),
        (
            {},
            {"refresh_retry_ms": 0},
            [("cache_fill.refresh_retry_ms", 0, "must be > 0 and <= 3600000 (1 hour)")],
        ),
        (
            {},
            {"refresh_retry_ms": 1.5},
            [("cache_fill.refresh_retry_ms", 1.5, "must be an int (ms)")],
        ),
        (
            {},
            {"refresh_retry_ms": 30_001},
            [
                (
                    "cache_fill.refresh_retry_ms",
                    30_001,
                    "must be <= stale_s x 1000 (30000): a retry must fit in the window",
                )
            ],
        ),
    ],
)
def test_each_rule_alone(
    changes: dict[str, object], fill_changes: dict[str, object], expected: list[object]
) -> None:
    assert STALE.cache_fill is not None
    dataset = attrs.evolve(
        STALE, cache_fill=attrs.evolve(STALE.cache_fill, **fill_changes), **changes
    )
    problems = found(dataset)
    assert [(field, rule) for field, _, rule in problems] == [(f, r) for f, _, r in expected]  # type: ignore[misc]


def test_stale_windows_need_a_cache_fill() -> None:
    dataset = Dataset("a", ttl_s=60, stale_s=5, stale_if_error_s=10)
    rule = "must be 0 without cache_fill (the refresh takes the fill lock)"
    assert found(dataset) == [("stale_s", 5, rule), ("stale_if_error_s", 10, rule)]


def test_a_window_without_stale_s_needs_no_retry_rule() -> None:
    only_if_error = Dataset(
        "a", ttl_s=60, stale_if_error_s=10, cache_fill=attrs.evolve(FILL, refresh_retry_ms=60_000)
    )
    assert validate([only_if_error]) == []


def test_every_problem_is_listed_at_once() -> None:
    dataset = attrs.evolve(
        STALE,
        stale_s=10,
        stale_if_error_s=5,
        cache_fill=attrs.evolve(FILL, early_beta=-1, refresh_retry_ms=20_000),
    )
    fields = [field for field, _, _ in found(dataset)]
    assert fields == ["cache_fill.early_beta", "stale_if_error_s", "cache_fill.refresh_retry_ms"]


def test_the_generated_form_round_trips_and_omits_defaults() -> None:
    data = dataset_to_data(STALE)
    assert data["stale_s"] == 30
    assert data["stale_if_error_s"] == 300
    assert data["cache_fill"]["early_beta"] == 1.0
    assert data["cache_fill"]["refresh_retry_ms"] == 5_000  # given, so written as given
    assert dataset_from_data(STALE.key, data) == STALE
    derived = attrs.evolve(STALE, cache_fill=attrs.evolve(FILL, early_beta=1.0))
    assert "refresh_retry_ms" not in dataset_to_data(derived)["cache_fill"]  # left out: derived
    assert dataset_from_data(STALE.key, dataset_to_data(derived)) == derived
    plain = Dataset("a", ttl_s=1, cache_fill=FILL)
    assert set(dataset_to_data(plain)) == {"ttl_s", "negative_ttl_s", "cache_fill"}
    assert set(dataset_to_data(plain)["cache_fill"]) == {
        "lease_ms",
        "wait_ms",
        "poll_min_ms",
        "poll_max_ms",
    }


def test_the_generated_module_is_deterministic_and_loads_back() -> None:
    other = attrs.evolve(
        STALE, key="other:{lang}", cache_fill=attrs.evolve(FILL, refresh_retry_ms=1_000)
    )
    text = render([STALE, other], "registry.py")
    assert text == render([other, STALE], "registry.py")
    namespace: dict[str, object] = {}
    exec(compile(text, "gen.py", "exec"), namespace)
    loaded = load_policies(
        {key: dataset_from_data(key, data) for key, data in namespace["POLICIES"].items()}
    )  # type: ignore[attr-defined]
    assert loaded == {STALE.key: STALE, other.key: other}


def test_redis_keeps_a_value_for_ttl_plus_the_larger_window(memofill_harness: Harness) -> None:
    client = memofill_harness.client()
    cache = memofill_harness.adopt(Memofill(client, policies={STALE.key: STALE}))

    @cache.cached_dataset(STALE.key)
    def news(lang: str) -> list[str]:
        return [lang]

    assert news("en") == ["en"]
    assert 359_000 < client.pttl("news:en") <= 360_000
