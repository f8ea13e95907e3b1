"""The registry rules: each one alone, many at once, and generated registries."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given

from memofill import CacheFill, Dataset, Problem, RegistryError, load_policies, validate
from memofill.policy import (
    MAX_LEASE_MS,
    MAX_TTL_S,
    dataset_from_data,
    dataset_to_data,
    ensure_valid,
)
from tests.support.strategies import registries, single_violations

FILL = CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=250)
BASE = Dataset("market:quotes:{symbol}", ttl_s=60, negative_ttl_s=120, cache_fill=FILL)
KEY = BASE.key


def broken(**changes: object) -> Dataset:
    """BASE with dataset fields (ttl_s=...) or fill fields (lease_ms=...) replaced."""
    fill_changes = {k: v for k, v in changes.items() if k.endswith("_ms")}
    dataset_changes = {k: v for k, v in changes.items() if not k.endswith("_ms")}
    return attrs.evolve(BASE, cache_fill=attrs.evolve(FILL, **fill_changes), **dataset_changes)


def found(datasets: list[object]) -> list[tuple[str, str, object, str]]:
    return [(p.key, p.field, p.value, p.rule) for p in validate(datasets)]


def test_the_spec_registry_is_valid() -> None:
    assert validate([BASE, Dataset("weather:alerts:v2", ttl_s=300)]) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"lease_ms": 0},
            [
                ("cache_fill.lease_ms", 0, "must be > 0"),
                ("cache_fill.wait_ms", 3000, "must be < lease_ms (0)"),
            ],
            id="lease_ms>0 (wait_ms<lease_ms follows)",
        ),
        pytest.param(
            {"wait_ms": 5_000},
            [("cache_fill.wait_ms", 5000, "must be < lease_ms (5000)")],
            id="wait_ms<lease_ms",
        ),
        pytest.param(
            {"poll_min_ms": 0},
            [("cache_fill.poll_min_ms", 0, "must be > 0")],
            id="poll_min_ms>0",
        ),
        pytest.param(
            {"poll_max_ms": 9},
            [("cache_fill.poll_max_ms", 9, "must be >= poll_min_ms (10)")],
            id="poll_max_ms>=poll_min_ms",
        ),
        pytest.param(
            {"poll_max_ms": 3_000},
            [("cache_fill.poll_max_ms", 3000, "must be < wait_ms (3000)")],
            id="poll_max_ms<wait_ms",
        ),
        pytest.param({"ttl_s": 0}, [("ttl_s", 0, "must be > 0")], id="ttl_s>0"),
        pytest.param({"ttl_s": -0.5}, [("ttl_s", -0.5, "must be > 0")], id="ttl_s>0 float"),
        pytest.param(
            {"negative_ttl_s": -1}, [("negative_ttl_s", -1, "must be >= 0")], id="negative_ttl_s>=0"
        ),
        pytest.param(
            {"ttl_s": "60"}, [("ttl_s", "60", "must be a number of seconds")], id="str for ttl_s"
        ),
        pytest.param(
            {"ttl_s": True}, [("ttl_s", True, "must be a number of seconds")], id="bool for ttl_s"
        ),
        pytest.param(
            {"lease_ms": "5000"},
            [("cache_fill.lease_ms", "5000", "must be an int (ms)")],
            id="str for lease_ms",
        ),
        pytest.param(
            {"wait_ms": True},
            [("cache_fill.wait_ms", True, "must be an int (ms)")],
            id="bool for wait_ms",
        ),
        pytest.param(
            {"poll_min_ms": 10.0},
            [("cache_fill.poll_min_ms", 10.0, "must be an int (ms)")],
            id="float for poll_min_ms",
        ),
        pytest.param(
            {"ttl_s": 1e16}, [("ttl_s", 1e16, f"must be <= {MAX_TTL_S} (10 years)")], id="ttl_s max"
        ),
        pytest.param(
            {"ttl_s": 0.0004},
            [("ttl_s", 0.0004, "must be >= 0.001 (Redis expires in whole ms)")],
            id="ttl_s under 1 ms",
        ),
        pytest.param(
            {"negative_ttl_s": 0.0004},
            [("negative_ttl_s", 0.0004, "must be 0 or >= 0.001 (Redis expires in whole ms)")],
            id="negative_ttl_s under 1 ms",
        ),
        pytest.param(
            {"negative_ttl_s": 10**19},
            [("negative_ttl_s", 10**19, f"must be <= {MAX_TTL_S} (10 years)")],
            id="negative_ttl_s max",
        ),
        pytest.param(
            {"lease_ms": 10**19},
            [("cache_fill.lease_ms", 10**19, "must be <= 3600000 (1 hour)")],
            id="lease_ms max",
        ),
        pytest.param(
            {"lease_ms": 10**19, "wait_ms": 10**18, "poll_min_ms": 10**17, "poll_max_ms": 10**17},
            [
                ("cache_fill.lease_ms", 10**19, "must be <= 3600000 (1 hour)"),
                ("cache_fill.wait_ms", 10**18, "must be <= 3600000 (1 hour)"),
                ("cache_fill.poll_min_ms", 10**17, "must be <= 3600000 (1 hour)"),
                ("cache_fill.poll_max_ms", 10**17, "must be <= 3600000 (1 hour)"),
            ],
            id="every ms field max",
        ),
        pytest.param(
            {"error_ttl_s": -1}, [("error_ttl_s", -1, "must be >= 0")], id="error_ttl_s>=0"
        ),
        pytest.param(
            {"error_ttl_s": "5"},
            [("error_ttl_s", "5", "must be a number of seconds")],
            id="str for error_ttl_s",
        ),
        pytest.param(
            {"error_ttl_s": float("nan")},
            [("error_ttl_s", float("nan"), "must be finite")],
            id="error_ttl_s finite",
        ),
        pytest.param(
            {"error_ttl_s": 31},
            [("error_ttl_s", 31, "must be <= 30 (errors are remembered at most 30 s)")],
            id="error_ttl_s<=30",
        ),
        pytest.param(
            {"ttl_s": 10**400, "negative_ttl_s": -(10**400)},
            [
                ("ttl_s", 10**400, f"must be <= {MAX_TTL_S} (10 years)"),
                ("negative_ttl_s", -(10**400), "must be >= 0"),
            ],
            id="ints too large for a float",
        ),
        pytest.param(
            {"ttl_s": 5, "error_ttl_s": 6},
            [("error_ttl_s", 6, "must be <= 5 (ttl_s)")],
            id="error_ttl_s<=ttl_s",
        ),
    ],
)
def test_each_rule_alone(changes: dict[str, object], expected: list[tuple[object, ...]]) -> None:
    # repr, so that a nan value compares equal to itself
    assert repr(found([broken(**changes)])) == repr([(KEY, *problem) for problem in expected])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_ttls_must_be_finite(value: float) -> None:
    rules = [p.rule for p in validate([broken(ttl_s=value, negative_ttl_s=value)])]
    assert rules == ["must be finite", "must be finite"]


@pytest.mark.parametrize(
    "changes",
    [
        {"negative_ttl_s": 0},
        {"wait_ms": 4_999},
        {"poll_max_ms": 10},
        {"poll_max_ms": 2_999},
        {"ttl_s": 0.001},
        {"ttl_s": MAX_TTL_S, "negative_ttl_s": MAX_TTL_S},
        {"negative_ttl_s": 0.001},
        {"error_ttl_s": 30},
        {"error_ttl_s": 0.001},
        {"ttl_s": 5, "error_ttl_s": 5},
        {"lease_ms": MAX_LEASE_MS, "wait_ms": MAX_LEASE_MS - 1, "poll_max_ms": MAX_LEASE_MS - 2},
    ],
    ids=str,
)
def test_boundaries_that_are_allowed(changes: dict[str, object]) -> None:
    assert validate([broken(**changes)]) == []


def test_error_ttl_s_needs_a_cache_fill() -> None:
    legacy = Dataset("weather:alerts:v2", ttl_s=300, error_ttl_s=5)
    assert found([legacy]) == [
        (
            legacy.key,
            "error_ttl_s",
            5,
            "must be 0 without cache_fill (only a coordinated fill remembers errors)",
        )
    ]


def test_every_bound_broken_at_once_is_listed_together() -> None:
    fill = CacheFill(lease_ms=10**19, wait_ms=5_000_000, poll_min_ms=10, poll_max_ms=250)
    registry: list[object] = [
        Dataset("a:{x}", ttl_s=1e16, negative_ttl_s=1e16, error_ttl_s=40, cache_fill=fill),
        Dataset("b:{x}", ttl_s=5, error_ttl_s=6, cache_fill=FILL),
    ]
    assert [(p.key, p.field) for p in validate(registry)] == [
        ("a:{x}", "ttl_s"),
        ("a:{x}", "negative_ttl_s"),
        ("a:{x}", "error_ttl_s"),
        ("a:{x}", "cache_fill.lease_ms"),
        ("a:{x}", "cache_fill.wait_ms"),
        ("b:{x}", "error_ttl_s"),
    ]


def test_error_ttl_s_round_trips_through_the_generated_form() -> None:
    dataset = attrs.evolve(BASE, error_ttl_s=2.5)
    assert dataset_to_data(dataset)["error_ttl_s"] == 2.5
    assert dataset_from_data(dataset.key, dataset_to_data(dataset)) == dataset
    assert "error_ttl_s" not in dataset_to_data(BASE)  # unchanged generated files
    assert dataset_from_data(KEY, dataset_to_data(BASE)) == BASE


def test_a_short_stale_window_gets_a_refresh_retry_that_fits_it() -> None:
    """refresh_retry_ms left out fits the window the user chose; one given is still checked."""
    short = Dataset("news:{lang}", ttl_s=60, stale_s=1, cache_fill=FILL)
    assert validate([short]) == []
    assert FILL.refresh_retry_ms is None
    assert short.refresh_retry_ms == 1_000
    assert short.fill_in_force == attrs.evolve(FILL, refresh_retry_ms=1_000)
    assert short.cache_fill is FILL  # what the user wrote, as written
    # Derived again from the new window, never carried over from the old one.
    assert attrs.evolve(short, stale_s=0.25).refresh_retry_ms == 250
    assert attrs.evolve(short, stale_s=60).refresh_retry_ms == 5_000
    assert attrs.evolve(short, stale_s=0).refresh_retry_ms == 5_000
    assert attrs.evolve(short, stale_s=0.0015).refresh_retry_ms == 1  # whole ms, within it
    # Only stale_s bounds the retry: stale_if_error_s alone leaves the default.
    assert Dataset("a", ttl_s=1, stale_if_error_s=1, cache_fill=FILL).refresh_retry_ms == 5_000
    # A value given is the user's, and refused with the rule when it does not fit.
    given = attrs.evolve(short, cache_fill=attrs.evolve(FILL, refresh_retry_ms=5_000))
    assert given.refresh_retry_ms == 5_000
    assert found([given]) == [
        (
            "news:{lang}",
            "cache_fill.refresh_retry_ms",
            5_000,
            "must be <= stale_s x 1000 (1000): a retry must fit in the window",
        )
    ]
    fits = attrs.evolve(short, cache_fill=attrs.evolve(FILL, refresh_retry_ms=400))
    assert (validate([fits]), fits.refresh_retry_ms) == ([], 400)
    assert load_policies([short]) == {short.key: short}


def test_a_derived_refresh_retry_round_trips_through_the_generated_form() -> None:
    short = Dataset("news:{lang}", ttl_s=60, stale_s=1, cache_fill=FILL)
    data = dataset_to_data(short)
    assert "refresh_retry_ms" not in data["cache_fill"]  # derived on load, from the window
    loaded = dataset_from_data(short.key, data)
    assert (loaded, loaded.refresh_retry_ms) == (short, 1_000)


def test_cache_fill_must_be_a_cache_fill() -> None:
    data = attrs.asdict(FILL)
    assert found([attrs.evolve(BASE, cache_fill=data)]) == [
        (KEY, "cache_fill", data, "must be a CacheFill or None")
    ]


def test_items_that_are_not_datasets_are_named_by_position() -> None:
    assert found([BASE, "news:digest:v1"]) == [
        ("DATASETS[1]", "item", "news:digest:v1", "must be a memofill.Dataset")
    ]


def test_keys_are_unique() -> None:
    assert found([BASE, attrs.evolve(BASE, ttl_s=5)]) == [(KEY, "key", KEY, "is declared twice")]


def test_keys_that_can_render_to_the_same_redis_key_are_refused() -> None:
    assert found([BASE, Dataset("market:quotes:EURUSD", ttl_s=5)]) == [
        (
            "market:quotes:EURUSD",
            "key",
            "market:quotes:EURUSD",
            "can render the same Redis key as 'market:quotes:{symbol}'",
        )
    ]


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("a:{x", "'{' at 2 is never closed"),
        ("a:x}", "'}' at 3 closes no field"),
        ("a:{x{y}", "'{' at 4 opens a field inside a field"),
        ("a:{}", "a field has an empty name"),
        ("a:{x}:{x}", "field {x} appears twice"),
        ("a:{x:>4}", "field {x:>4} has a format spec or conversion; fields are plain names"),
        ("a:{x!r}", "field {x!r} has a format spec or conversion; fields are plain names"),
        ("a:{1x}", "field {1x} is not a valid parameter name"),
        ("a:{x}{y}", "fields {x} and {y} must be separated by ':' or '/'"),
        ("a:{x}-{y}", "fields {x} and {y} must be separated by ':' or '/'"),
        ("a b", "character ' ' at 1 is not allowed (use A-Z a-z 0-9 _ . - : /)"),
        ("a:é", "character 'é' at 2 is not allowed (use A-Z a-z 0-9 _ . - : /)"),
        ("a#lock", "character '#' at 1 is not allowed (use A-Z a-z 0-9 _ . - : /)"),
        ("", "must not be empty"),
    ],
)
def test_malformed_key_templates(key: str, rule: str) -> None:
    assert found([Dataset(key, ttl_s=1)]) == [(key, "key", key, rule)]


def test_a_key_that_is_not_a_str() -> None:
    assert found([Dataset(42, ttl_s=1)]) == [("42", "key", 42, "must be a str, not int")]  # type: ignore[arg-type]


def test_four_violations_in_four_datasets_are_reported_together() -> None:
    registry: list[object] = [
        Dataset("a:v1", ttl_s=0),
        Dataset("b:{id}", ttl_s=5, negative_ttl_s=-3),
        BASE,
        Dataset("c:v1", ttl_s=5, cache_fill=attrs.evolve(FILL, poll_max_ms=3_000)),
        Dataset("d:{x}{y}", ttl_s=5),
    ]
    expected = [
        Problem("a:v1", "ttl_s", 0, "must be > 0"),
        Problem("b:{id}", "negative_ttl_s", -3, "must be >= 0"),
        Problem("c:v1", "cache_fill.poll_max_ms", 3000, "must be < wait_ms (3000)"),
        Problem(
            "d:{x}{y}", "key", "d:{x}{y}", "fields {x} and {y} must be separated by ':' or '/'"
        ),
    ]
    with pytest.raises(RegistryError) as caught:
        ensure_valid(registry, "registry.py")
    assert list(caught.value.problems) == expected
    message = str(caught.value)
    assert message.splitlines()[0] == "registry.py is invalid (4 problems):"
    assert message.splitlines()[1:] == [
        "  a:v1: ttl_s=0: must be > 0",
        "  b:{id}: negative_ttl_s=-3: must be >= 0",
        "  c:v1: cache_fill.poll_max_ms=3000: must be < wait_ms (3000)",
        "  d:{x}{y}: key='d:{x}{y}': fields {x} and {y} must be separated by ':' or '/'",
    ]


@given(registries())
def test_every_valid_registry_passes(registry: list[Dataset]) -> None:
    assert validate(registry) == []
    assert load_policies({d.key: d for d in registry}) == {d.key: d for d in registry}


@given(single_violations())
def test_every_single_violation_is_reported_with_its_key_and_field(
    case: tuple[list[object], str, str],
) -> None:
    registry, key, field = case
    problems = validate(registry)
    assert (key, field) in [(p.key, p.field) for p in problems]
    assert {p.key for p in problems} == {key}, "a problem was blamed on another dataset"


def test_load_policies_refuses_a_mapping_whose_key_differs_from_the_dataset() -> None:
    with pytest.raises(RegistryError) as caught:
        load_policies({"other:key": BASE})
    assert caught.value.problems == (
        Problem("other:key", "key", KEY, "mapping key differs from Dataset.key"),
    )


def test_load_policies_lists_every_problem_of_a_mapping() -> None:
    bad_ttl = Dataset("b:v1", ttl_s=0)
    bad_fill = Dataset("c:v1", ttl_s=5, cache_fill=CacheFill(5_000, 6_000, 10, 250))
    with pytest.raises(RegistryError) as caught:
        load_policies({"other:key": BASE, "b:v1": bad_ttl, "c:v1": bad_fill})
    problems = caught.value.problems
    assert Problem("other:key", "key", KEY, "mapping key differs from Dataset.key") in problems
    assert {(p.key, p.field) for p in problems} >= {
        ("other:key", "key"),
        ("b:v1", "ttl_s"),
        ("c:v1", "cache_fill.wait_ms"),
    }
