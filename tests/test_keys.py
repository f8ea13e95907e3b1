"""Key rendering: escaping that no argument can subvert, overlap detection, Cluster slots."""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import string
import uuid

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from redis.crc import key_slot

from memofill import KeyArgumentError
from memofill.keys import (
    MAX_FIELD_CHARS,
    FieldText,
    OverlapIndex,
    format_argument,
    lock_key,
    parse_template,
    prefix_problem,
    templates_overlap,
    wake_key,
)
from tests.support.strategies import canonical_kind, key_templates, key_values

FORBIDDEN = set(":/{}" + string.whitespace)
HEX_DIGEST = set(string.hexdigits.lower())
PLUS_ONE = datetime.timezone(datetime.timedelta(hours=1))


def plain(value: object) -> object:
    return value.value if isinstance(value, enum.Enum) else value


class Color(enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    LARGE = 3


@given(st.text(), st.text())
def test_escaping_is_injective(first: str, second: str) -> None:
    assume(first != second)
    assert format_argument("x", first) != format_argument("x", second)


@given(st.text() | st.integers())
def test_no_argument_renders_a_separator_brace_or_whitespace(value: str | int) -> None:
    rendered = format_argument("x", value)
    assert rendered.isascii(), "so no Unicode space or separator can slip through"
    assert not FORBIDDEN.intersection(rendered)
    assert "~" not in rendered or rendered.startswith("~h"), "only other types' texts hold '~'"


def test_escaping_examples() -> None:
    template = parse_template("market:quotes:{symbol}")
    assert template.render({"symbol": "EUR/USD"}) == "market:quotes:EUR%2FUSD"
    assert template.render({"symbol": "a:b {c}\n"}) == "market:quotes:a%3Ab%20%7Bc%7D%0A"
    assert format_argument("x", "100%") == "100%25"
    assert format_argument("x", "é") == "%C3%A9"
    assert format_argument("x", "~abc") == "%7Eabc", "'~' marks other types, so it is escaped"
    assert format_argument("x", "~n") == "%7En"
    assert format_argument("x", "\ud800") == "%ED%A0%80", "a lone surrogate is still one key"


def test_each_type_has_its_own_text_and_enums_use_their_value() -> None:
    assert format_argument("x", 42) == "42"
    assert format_argument("x", "42") == "%342", "a str never takes an int's text"
    assert format_argument("x", -7) == "-7"
    assert format_argument("x", "-7") == "%2D7"
    assert format_argument("x", "-") == "-"
    assert format_argument("x", "4a") == "4a"
    assert format_argument("x", Color.RED) == "red"
    assert format_argument("x", Size.LARGE) == "3"
    texts = {format_argument("x", v) for v in [None, "None", "", True, 1, "True", False, 0]}
    assert len(texts) == 8


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "~n"),
        (True, "~t"),
        (False, "~f"),
        (uuid.UUID(int=255), "~u000000000000000000000000000000ff"),
        (datetime.date(2024, 1, 31), "~d2024-01-31"),
        (datetime.datetime(2024, 1, 31, 9, 30), "~d2024-01-31T09.30.00"),
        (datetime.datetime(2024, 1, 31, 9, 30, 0, 5), "~d2024-01-31T09.30.00.000005"),
        (datetime.datetime(2024, 1, 31, 9, 30, tzinfo=PLUS_ONE), "~D2024-01-31T08.30.00Z"),
        (decimal.Decimal("1.50"), "~m1.5"),
        (decimal.Decimal("-0.00"), "~m0"),
        (decimal.Decimal("100"), "~m1E2"),
        (
            decimal.Decimal("1.2345678901234567890123456789012345"),
            "~m1.2345678901234567890123456789012345",
        ),
    ],
)
def test_tagged_texts(value: object, text: str) -> None:
    assert format_argument("x", value) == text


def test_equal_aware_datetimes_share_a_key_and_never_meet_a_naive_one() -> None:
    utc = datetime.datetime(2024, 1, 31, 8, 30, tzinfo=datetime.timezone.utc)
    paris = datetime.datetime(2024, 1, 31, 9, 30, tzinfo=PLUS_ONE)
    naive = datetime.datetime(2024, 1, 31, 8, 30)
    assert format_argument("x", utc) == format_argument("x", paris)
    assert format_argument("x", naive) != format_argument("x", utc)
    assert format_argument("x", datetime.date(2024, 1, 31)) != format_argument(
        "x", datetime.datetime(2024, 1, 31)
    )


def test_an_int_subclass_cannot_take_another_ints_key() -> None:
    class Sneaky(int):
        def __str__(self) -> str:
            return "7"

        __repr__ = __str__

    assert format_argument("x", Sneaky(5)) == "5"
    assert FieldText("x")(Sneaky(5)) == "5"


def test_an_int_past_the_str_conversion_limit_is_digested() -> None:
    huge = 10**5000
    for value in (huge, -huge, huge + 1):
        text = format_argument("x", value)
        assert text.startswith("~h")
        assert len(text) == 66
        assert set(text[2:]) <= HEX_DIGEST
    assert format_argument("x", huge) != format_argument("x", huge + 1)
    assert format_argument("x", huge) != format_argument("x", -huge)
    assert FieldText("x")(huge) == format_argument("x", huge)


def test_a_non_finite_decimal_is_refused() -> None:
    for value in ("NaN", "Infinity", "-Infinity", "sNaN"):
        with pytest.raises(KeyArgumentError, match="finite Decimal"):
            format_argument("x", decimal.Decimal(value))


def test_an_aware_datetime_out_of_range_in_utc_is_refused() -> None:
    early = datetime.datetime.min.replace(tzinfo=PLUS_ONE)
    with pytest.raises(KeyArgumentError, match="out of range in UTC"):
        format_argument("x", early)


@given(key_values, key_values)
def test_values_of_different_types_never_share_a_text(first: object, second: object) -> None:
    assume(canonical_kind(first) != canonical_kind(second))
    assert format_argument("x", first) != format_argument("x", second)


@given(key_values, key_values)
def test_a_text_names_one_value(first: object, second: object) -> None:
    """Equal values share their text; different values of one type never do."""
    same = canonical_kind(first) == canonical_kind(second) and plain(first) == plain(second)
    assert (format_argument("x", first) == format_argument("x", second)) is same


@given(key_values)
def test_no_key_value_renders_a_separator_brace_or_whitespace(value: object) -> None:
    rendered = format_argument("x", value)
    assert rendered.isascii()
    assert not FORBIDDEN.intersection(rendered)
    assert len(rendered) <= MAX_FIELD_CHARS


def test_long_values_are_hashed() -> None:
    assert format_argument("x", "a" * MAX_FIELD_CHARS) == "a" * MAX_FIELD_CHARS
    hashed = format_argument("x", "a" * (MAX_FIELD_CHARS + 1))
    assert hashed[:2] == "~h"
    assert len(hashed) == 66
    assert set(hashed[2:]) <= HEX_DIGEST
    # 34 two-byte characters escape to 204 characters: the escaped length decides.
    assert format_argument("x", "é" * 34).startswith("~h")
    assert format_argument("x", "é" * 33) == "%C3%A9" * 33
    assert format_argument("x", "a" * 500) != format_argument("x", "a" * 501)
    assert format_argument("x", 10**199 - 1) == "9" * 199
    assert format_argument("x", 10**199).startswith("~h")


def test_a_long_argument_is_digested_from_its_bytes_without_escaping() -> None:
    """The digest is of the raw UTF-8: equal to one computed without the escape table."""
    value = "é/" * 500_000
    raw = value.encode("utf-8")
    assert format_argument("x", value) == "~h" + hashlib.sha256(b"s" + raw).hexdigest()


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (1.5, "float"),
        (float("nan"), "float"),
        (object(), "object"),
        (b"ab", "bytes"),
        ([1], "list"),
    ],
)
def test_values_that_cannot_name_a_key_are_refused(value: object, type_name: str) -> None:
    with pytest.raises(KeyArgumentError) as caught:
        parse_template("market:quotes:{symbol}").render({"symbol": value})
    message = str(caught.value)
    assert message.startswith("key field {symbol} takes a str or int (or bool, None,")
    assert f"not {type_name}: convert it before the call" in message
    assert "ignore=" in message


class Floaty(enum.Enum):
    HALF = 0.5


def test_an_enum_whose_value_has_no_text_is_refused() -> None:
    with pytest.raises(KeyArgumentError, match="not float"):
        format_argument("x", Floaty.HALF)


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("a:{x}", "a:b", True),
        ("a:{x}", "a:{y}", True),
        ("a:{x}", "a:", True),  # x="" renders "a:"
        ("a:{x}.json", "a:b.json", True),
        ("n:ab{x}", "n:{y}b", True),  # both render "n:abb"
        ("v{x}", "{y}1", True),
        ("a:{x}", "b:{y}", False),
        ("a:{x}:c", "a:b", False),  # arguments hold no separator
        ("a/{x}", "a:{x}", False),
        ("a:{x}.json", "a:b.xml", False),
        ("n:{x}v1", "n:{y}v2", False),
        ("x{a}", "y{b}", False),
        ("news:digest:v1", "news:digest:v2", False),
    ],
)
def test_templates_overlap(first: str, second: str, overlap: bool) -> None:
    a, b = parse_template(first), parse_template(second)
    assert templates_overlap(a, b) is overlap
    assert templates_overlap(b, a) is overlap


@given(key_templates(), key_templates(), st.data())
def test_templates_that_do_not_overlap_never_render_the_same_key(
    first: str, second: str, data: st.DataObject
) -> None:
    a, b = parse_template(first), parse_template(second)
    assume(not templates_overlap(a, b))
    words = st.text(alphabet="ab:/", max_size=3)
    key_a = a.render({name: data.draw(words) for name in a.fields})
    key_b = b.render({name: data.draw(words) for name in b.fields})
    assert key_a != key_b


@given(key_templates(), st.data())
def test_a_template_overlaps_every_key_it_renders(source: str, data: st.DataObject) -> None:
    template = parse_template(source)
    words = st.text(alphabet="ab", max_size=3)
    rendered = template.render({name: data.draw(words) for name in template.fields})
    assert templates_overlap(template, parse_template(rendered))


#: Segments from a small pool, so that random templates overlap often.
_SEGMENTS = ["a", "ab", "b", "", "{f}", "a{f}", "{f}b", "a{f}b", "ab{f}"]


@st.composite
def small_templates(draw: st.DrawFn) -> str:
    """A well-formed template of one to three segments drawn from :data:`_SEGMENTS`."""
    count = draw(st.integers(1, 3))
    pieces = []
    for index in range(count):
        pool = _SEGMENTS if index else [s for s in _SEGMENTS if s]  # a key is never empty
        segment = draw(st.sampled_from(pool)).replace("{f}", f"{{f{index}}}")
        separator = draw(st.sampled_from(":/")) if index else ""
        pieces.append(separator + segment)
    return "".join(pieces)


@given(st.lists(small_templates(), max_size=12, unique=True))
def test_the_overlap_index_finds_exactly_the_pairs_templates_overlap_finds(
    sources: list[str],
) -> None:
    """The index must report every overlapping pair the pairwise check reports, and no other."""
    index = OverlapIndex()
    templates = [parse_template(source) for source in sources]
    for position, template in enumerate(templates):
        expected = [
            other.source for other in templates[:position] if templates_overlap(template, other)
        ]
        assert index.add(template) == expected


def test_the_overlap_index_compares_field_segments_with_literal_ones() -> None:
    index = OverlapIndex()
    for source in ["u:1:x", "u:2:x", "v:{id}:x", "u:{id}:y", "u:a{id}:x"]:
        assert index.add(parse_template(source)) == []
    assert index.add(parse_template("u:{n}:x")) == ["u:1:x", "u:2:x", "u:a{id}:x"]
    assert index.add(parse_template("{t}:1:x")) == ["u:1:x", "v:{id}:x", "u:{n}:x"]
    assert index.add(parse_template("u/{n}:x")) == []


def test_crc16_is_the_cluster_one() -> None:
    # The reference value from the Redis Cluster specification.
    assert key_slot(b"123456789") == 12739


@pytest.mark.parametrize("prefix", ["", "prod:", "{tenant-7}:", "app:{t}:", "{x}"])
@pytest.mark.parametrize("symbol", ["EURUSD", "a/b:c", "x" * 300])
def test_lock_and_wake_keys_share_the_data_keys_slot(prefix: str, symbol: str) -> None:
    assert prefix_problem(prefix) is None
    final = prefix + parse_template("market:quotes:{symbol}").render({"symbol": symbol})
    slot = key_slot(final.encode())
    for derived in (lock_key(final), wake_key(final)):
        assert derived != final
        assert key_slot(derived.encode()) == slot


def test_lock_keys_differ_between_prefixes_and_from_wake_keys() -> None:
    assert lock_key("prod:news:digest:v1") != lock_key("staging:news:digest:v1")
    assert lock_key("prod:news:digest:v1") != wake_key("prod:news:digest:v1")


@pytest.mark.parametrize("prefix", ["{", "}", "{}", "a}{b", "{a}{b}", "}{a}"])
def test_prefixes_whose_braces_would_move_the_slot_are_refused(prefix: str) -> None:
    assert prefix_problem(prefix) is not None


@pytest.mark.parametrize("prefix", ["#", "app#", "{x}#lock", "a#wake:"])
def test_prefixes_with_the_lock_suffix_character_are_refused(prefix: str) -> None:
    problem = prefix_problem(prefix)
    assert problem is not None
    assert "'#'" in problem
