"""Hypothesis strategies for registries (valid ones, and ones that break exactly one rule),
and for the values a key field takes."""

from __future__ import annotations

import datetime
import enum
import string

import attrs
from hypothesis import strategies as st

from memofill import CacheFill, Dataset
from memofill.keys import ARGUMENT_CHARS
from memofill.policy import MAX_ERROR_TTL_S, MAX_LEASE_MS, MAX_TTL_S, MIN_DURATION_S

#: Field names a key template may use.
field_names = st.builds(
    str.__add__,
    st.sampled_from(string.ascii_letters + "_"),
    st.text(alphabet=string.ascii_letters + string.digits + "_", max_size=8),
)
#: Literal text inside one segment of a key (no separators, no braces).
literal_text = st.text(alphabet=sorted(ARGUMENT_CHARS), max_size=5)


@st.composite
def key_templates(draw: st.DrawFn, head: str = "k") -> str:
    """A well-formed key template starting with the literal segment ``head``.

    Each further segment holds at most one field, so fields are always split by
    a separator, as the rules demand.
    """
    names = draw(st.lists(field_names, max_size=3, unique=True))
    parts = [head]
    for name in names:
        separator = draw(st.sampled_from(":/"))
        parts.append(f"{separator}{draw(literal_text)}{{{name}}}{draw(literal_text)}")
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from(":/")) + draw(literal_text))
    return "".join(parts)


@st.composite
def cache_fills(draw: st.DrawFn) -> CacheFill:
    """A fill policy keeping ``0 < poll_min <= poll_max < wait < lease``."""
    poll_min = draw(st.integers(1, 1_000))
    poll_max = draw(st.integers(poll_min, poll_min + 5_000))
    wait = draw(st.integers(poll_max + 1, poll_max + 60_000))
    lease = draw(st.integers(wait + 1, wait + 600_000))
    return CacheFill(lease_ms=lease, wait_ms=wait, poll_min_ms=poll_min, poll_max_ms=poll_max)


finite = {"allow_nan": False, "allow_infinity": False}
positive_seconds = st.integers(1, 10**7) | st.floats(
    min_value=MIN_DURATION_S, max_value=MAX_TTL_S, **finite
)
non_negative_seconds = st.sampled_from([0, 0.0]) | positive_seconds


@st.composite
def datasets(draw: st.DrawFn, head: str = "k") -> Dataset:
    """A valid dataset whose key starts with the literal segment ``head``."""
    ttl = draw(positive_seconds)
    fill = draw(st.none() | cache_fills())
    longest_error = min(MAX_ERROR_TTL_S, ttl)
    error_ttl = st.just(0)
    if fill is not None and longest_error >= MIN_DURATION_S:
        error_ttl |= st.floats(min_value=MIN_DURATION_S, max_value=longest_error, **finite)
    return Dataset(
        key=draw(key_templates(head)),
        ttl_s=ttl,
        negative_ttl_s=draw(non_negative_seconds),
        cache_fill=fill,
        error_ttl_s=draw(error_ttl),
    )


@st.composite
def registries(draw: st.DrawFn, min_size: int = 0) -> list[Dataset]:
    """A valid registry: every key starts with its own literal head, so no two overlap."""
    size = draw(st.integers(min_size, 5))
    return [draw(datasets(head=f"ds{index}")) for index in range(size)]


MALFORMED_KEYS = [
    "a:{x",
    "a:x}",
    "a:{}",
    "a:{x}:{x}",
    "a:{x:>4}",
    "a:{x}{y}",
    "a b",
    "",
]


@st.composite
def fill_violations(draw: st.DrawFn, fill: CacheFill) -> tuple[CacheFill, str]:
    """``fill`` with one of its rules broken, and the field that breaks it."""
    step = draw(st.integers(0, 1_000))
    lease, wait, poll_min = fill.lease_ms, fill.wait_ms, fill.poll_min_ms
    choices = {
        "lease_ms": [-step, draw(st.booleans()), float(lease), str(lease), 10**19],
        "wait_ms": [lease + step, float(wait), MAX_LEASE_MS + 1 + step],
        "poll_min_ms": [-step, str(poll_min), MAX_LEASE_MS + 1 + step],
        "poll_max_ms": [poll_min - 1 - step, wait + step, True],
    }
    field = draw(st.sampled_from(sorted(choices)))
    value = draw(st.sampled_from(choices[field]))
    return attrs.evolve(fill, **{field: value}), f"cache_fill.{field}"


@st.composite
def single_violations(draw: st.DrawFn) -> tuple[list[object], str, str]:
    """A registry that breaks exactly one rule, the key it is reported under, and the field."""
    registry: list[object] = list(draw(registries(min_size=1)))
    index = draw(st.integers(0, len(registry) - 1))
    dataset = registry[index]
    assert isinstance(dataset, Dataset)
    kinds = ["ttl_s", "negative_ttl_s", "error_ttl_s", "key", "type", "duplicate"]
    if dataset.cache_fill is not None:
        kinds.append("cache_fill")
    kind = draw(st.sampled_from(kinds))
    field = kind
    too_long = st.sampled_from([MAX_TTL_S + 1, 1e16, 10**20])
    if kind == "ttl_s":
        nonsense = st.sampled_from([float("nan"), 0.0004]) | too_long
        broken = attrs.evolve(dataset, ttl_s=draw(st.integers(-100, 0) | nonsense))
    elif kind == "negative_ttl_s":
        nonsense = st.sampled_from([float("inf"), 1e-5]) | too_long
        broken = attrs.evolve(dataset, negative_ttl_s=draw(st.integers(-100, -1) | nonsense))
    elif kind == "error_ttl_s":
        longest = min(MAX_ERROR_TTL_S, dataset.ttl_s)
        nonsense = st.sampled_from([-1, 1e-4, longest + 0.5, float("nan")])
        broken = attrs.evolve(dataset, error_ttl_s=draw(nonsense))
    elif kind == "key":
        broken = attrs.evolve(dataset, key=draw(st.sampled_from(MALFORMED_KEYS)))
    elif kind == "type":
        field = draw(st.sampled_from(["ttl_s", "negative_ttl_s"]))
        broken = attrs.evolve(dataset, **{field: draw(st.sampled_from(["60", True, None]))})
    elif kind == "duplicate":
        broken, field = dataset, "key"
        registry.append(dataset)
    else:
        assert dataset.cache_fill is not None
        fill, field = draw(fill_violations(dataset.cache_fill))
        broken = attrs.evolve(dataset, cache_fill=fill)
    registry[index] = broken
    return registry, broken.key, field


class Shade(enum.Enum):
    """An enum of each kind of value, for key texts."""

    RED = "red"
    NINE = 9
    NONE = None


_offsets = st.sampled_from(
    [
        datetime.timezone.utc,
        datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
        datetime.timezone(datetime.timedelta(hours=-8)),
    ]
)
_years = {"min_value": datetime.datetime(2, 1, 1), "max_value": datetime.datetime(9998, 12, 31)}
#: Every kind of value a key field takes, with the edges of each (digit strings, huge ints...).
key_values = st.one_of(
    st.text(max_size=20),
    st.text(alphabet="-0123456789", max_size=6),
    st.text(min_size=190, max_size=220),
    st.integers(),
    st.integers(min_value=10**198),
    st.booleans(),
    st.none(),
    st.uuids(),
    st.dates(),
    st.datetimes(**_years),
    st.datetimes(**_years, timezones=_offsets),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.sampled_from(Shade),
)


def canonical_kind(value: object) -> str:
    """The kind of value a key text stands for: an enum member stands for its value."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, datetime.datetime):
        return "naive datetime" if value.utcoffset() is None else "aware datetime"
    return type(value).__name__
