"""Typed values round-trip: what a hit returns is of the type the fill returned.

Unit tests on fakeredis: each kind of return annotation, ``codec=``, schema
changes, unstorable values (warned once, failing plugin tests), aliasing of
values kept for outages or shared by joined callers, and non-finite floats.
The same across two processes on a real Redis is in ``test_real_redis.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import uuid
import zlib
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, NamedTuple, Optional, TypedDict

import attrs
import fakeredis
import orjson
import pydantic
import pytest

import memofill
from memofill import ConfigurationError, Memofill
from memofill.testing import stored_payload
from memofill.values import JSON, TypedCodec, codec_for
from tests.conftest import POLICIES

pytest_plugins = ["pytester"]


@dataclasses.dataclass
class Quote:
    symbol: str
    price: float = 1.5
    roles: list[str] = dataclasses.field(default_factory=list)


@attrs.define
class Trade:
    symbol: str
    at: datetime.datetime
    amount: Decimal


class Model(pydantic.BaseModel):
    symbol: str
    bid: float
    when: datetime.date


class Point(NamedTuple):
    x: int
    y: int


class Row(TypedDict):
    id: uuid.UUID
    quote: Quote


WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
ID = uuid.UUID("12345678-1234-5678-1234-567812345678")

#: (annotation, value) pairs: every value must come back ``==`` and of the same type.
CASES: list[tuple[Any, Any]] = [
    (Quote, Quote("ACME", 2.5, ["user"])),
    (Trade, Trade("ACME", WHEN, Decimal("10.10"))),
    (Model, Model(symbol="ACME", bid=1.25, when=datetime.date(2026, 1, 2))),
    (Point, Point(1, 2)),
    (Row, Row(id=ID, quote=Quote("X"))),
    (datetime.datetime, WHEN),
    (datetime.date, datetime.date(2026, 1, 2)),
    (uuid.UUID, ID),
    (Decimal, Decimal("3.14159265358979323846")),
    (tuple[int, str], (1, "a")),
    (set[int], {1, 2, 3}),
    (frozenset[str], frozenset({"a", "b"})),
    (list[Quote], [Quote("A"), Quote("B")]),
    (dict[str, Quote], {"a": Quote("A")}),
    (list[Model], [Model(symbol="A", bid=1.0, when=datetime.date(2026, 1, 1))]),
    (Optional[Quote], Quote("O")),  # noqa: UP045  # the spelling under test
    (Quote | None, Quote("U")),
]


@pytest.fixture
def raw() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture
def mf(raw: fakeredis.FakeRedis) -> Memofill:
    return Memofill(raw, prefix="t:", policies=POLICIES)


def _returning(annotation: Any, value: Any) -> Any:
    def fetch(name: str) -> Any:
        return value

    fetch.__annotations__["return"] = annotation
    return fetch


# Ids from the annotations alone: a set's repr changes order between xdist workers.
@pytest.mark.parametrize(("annotation", "value"), CASES, ids=[repr(a) for a, _ in CASES])
def test_a_hit_returns_the_type_the_fill_returned(
    mf: Memofill, annotation: Any, value: Any
) -> None:
    fetch = mf.cached_dataset("item:{name}")(_returning(annotation, value))
    filled = fetch.call_with_outcome("a")
    assert filled.outcome == "leader_fill"
    # Another process's view: a fresh instance on the same Redis, nothing kept locally.
    other = Memofill(mf._sync.client, prefix="t:", policies=POLICIES)  # type: ignore[union-attr]
    again = other.cached_dataset("item:{name}")(_returning(annotation, "never called"))
    hit = again.call_with_outcome("a")
    assert hit.outcome == "hit"
    assert hit.value == value
    assert type(hit.value) is type(value)


def test_none_of_an_optional_type_is_a_negative_hit(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(_returning(Optional[Quote], None))  # noqa: UP045
    assert fetch.call_with_outcome("a").outcome == "negative"
    assert fetch.call_with_outcome("a").value is None


@pytest.mark.parametrize(
    "annotation", [Any, object, dict, list, dict[str, Any], list[dict[str, int]], int | str]
)
def test_plain_json_annotations_keep_orjson_alone(annotation: Any) -> None:
    assert codec_for(annotation) is JSON
    assert JSON.decode is orjson.loads  # the hit path calls orjson directly


def test_unannotated_functions_keep_orjson_alone(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: {"name": name})
    assert fetch._self_snapshot().decode is orjson.loads


def test_pydantic_is_imported_only_for_an_annotation_that_needs_it() -> None:
    assert "TypeAdapter" not in repr(codec_for(Quote).decode)
    assert "validate_json" in repr(codec_for(Model).decode)


def test_a_forward_reference_is_resolved_on_first_use(mf: Memofill, raw: Any) -> None:
    def fetch(name: str) -> Later:
        return Later(name)

    cached = mf.cached_dataset("item:{name}")(fetch)
    assert cached._self_snapshot().values.resolved is None  # Later did not exist yet

    @dataclasses.dataclass
    class Later:
        name: str

    fetch.__globals__["Later"] = Later
    try:
        assert cached("a") == Later("a")
        hit = cached.call_with_outcome("a")
        assert (hit.outcome, type(hit.value)) == ("hit", Later)
        assert cached._self_snapshot().decode == cached._self_snapshot().values.codec.decode
    finally:
        del fetch.__globals__["Later"]


def test_a_forward_reference_resolves_across_reconfiguring(mf: Memofill) -> None:
    def fetch(name: str) -> Later2:
        return Later2(name)

    cached = mf.cached_dataset("item:{name}")(fetch)
    mf.configure(prefix="p:")  # a new snapshot, built while the annotation is unresolved

    @dataclasses.dataclass
    class Later2:
        name: str

    fetch.__globals__["Later2"] = Later2
    try:
        assert cached("a") == Later2("a")
        hit = cached.call_with_outcome("a")  # resolves, and swaps in a snapshot that decodes
        assert (hit.outcome, hit.value) == ("hit", Later2("a"))
        snapshot = cached._self_snapshot()
        assert snapshot.decode == snapshot.values.codec.decode
        assert (snapshot.prefix, cached.redis_key("a")) == ("p:", "p:item:a")  # the config kept
        mf.configure(prefix="q:")  # built from the resolved codec: no resolving step again
        assert cached._self_snapshot().decode == snapshot.values.codec.decode
        assert cached.call_with_outcome("a").outcome == "leader_fill"  # under q:, a new key
        assert cached.call_with_outcome("a") == memofill.CallResult(Later2("a"), "hit", False)
    finally:
        del fetch.__globals__["Later2"]


def test_bytes_of_another_schema_are_a_miss_the_fill_overwrites(
    mf: Memofill, raw: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    raw.set("t:item:a", b'{"old_field": 1}')  # written before a deploy changed the type
    fetch = mf.cached_dataset("item:{name}")(_returning(Quote, Quote("new")))
    with caplog.at_level(logging.WARNING, "memofill"):
        result = fetch.call_with_outcome("a")
    assert (result.outcome, result.value) == ("leader_fill", Quote("new"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot decode" in warnings[0].getMessage()
    assert fetch.call_with_outcome("a").outcome == "hit"


class ZlibJson:
    """A codec= of the documented protocol: JSON, compressed."""

    def encode(self, value: Any) -> bytes:
        return zlib.compress(orjson.dumps(value))

    def decode(self, data: bytes) -> Any:
        return orjson.loads(zlib.decompress(data))


def test_a_codec_of_ones_own_is_used_for_fills_hits_and_markers(
    mf: Memofill, raw: fakeredis.FakeRedis
) -> None:
    fetch = mf.cached_dataset("item:{name}", codec=ZlibJson())(
        lambda name: None if name == "none" else {"name": name}
    )
    assert fetch("a") == {"name": "a"}
    assert orjson.loads(zlib.decompress(stored_payload(raw.get("t:item:a")))) == {"name": "a"}
    assert fetch.call_with_outcome("a").outcome == "hit"
    assert fetch.call_with_outcome("none").outcome == "negative"
    assert fetch.call_with_outcome("none").outcome == "hit"


def test_a_codec_without_the_protocol_is_refused(mf: Memofill) -> None:
    with pytest.raises(TypeError, match=r"encode\(value\) -> bytes"):
        mf.cached_dataset("item:{name}", codec=zlib)  # type: ignore[arg-type]


# --- values that cannot be stored -------------------------------------------------------------


class Opaque:
    pass


# --- return annotations that cannot be stored -------------------------------------------------


@dataclasses.dataclass
class Holds:
    opaque: Optional[Opaque]  # noqa: UP045  # cattrs meets Opaque only on a first read


@dataclasses.dataclass
class Left:
    n: int


@dataclasses.dataclass
class Right:
    n: int


@pytest.mark.parametrize(
    ("annotation", "shown", "why"),
    [
        (Opaque, "tests.test_values.Opaque", "memofill has no rule for tests.test_values.Opaque"),
        (list[Opaque], "list[tests.test_values.Opaque]", "no rule for tests.test_values.Opaque"),
        (complex, "complex", "memofill has no rule for complex"),
        # Structured lazily by cattrs: refused at decoration all the same, not on a first read.
        (Optional[Opaque], repr(Optional[Opaque]), "no rule for tests.test_values.Opaque"),  # noqa: UP045
        (set[Opaque], "set[tests.test_values.Opaque]", "no rule for tests.test_values.Opaque"),
        (Holds, "tests.test_values.Holds", "no rule for tests.test_values.Opaque"),
        # Look-alike classes cattrs cannot tell apart: memofill's own advice, whatever
        # cattrs says of them (its wording changes between releases).
        (Left | Right, "tests.test_values.Left | tests.test_values.Right", "codec="),
        (Left | Right | None, "Left | tests.test_values.Right | None", "codec="),
        (
            tuple[Model, Opaque],
            "tuple[tests.test_values.Model, tests.test_values.Opaque]",
            "pydantic",
        ),
    ],
    ids=[
        "class",
        "list",
        "complex",
        "optional",
        "set",
        "field",
        "union",
        "optional-union",
        "pydantic",
    ],
)
def test_an_unsupported_return_annotation_is_one_line_that_says_what_to_do(
    mf: Memofill, annotation: Any, shown: str, why: str
) -> None:
    def fetch(name: str) -> Any:
        return name

    fetch.__annotations__["return"] = annotation
    with pytest.raises(ConfigurationError) as refused:
        mf.cached_dataset("item:{name}")(fetch)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        "cached_dataset cannot store the values of tests.test_values."
        "test_an_unsupported_return_annotation_is_one_line_that_says_what_to_do.<locals>.fetch: "
        "its return annotation "
    )
    assert shown in message
    assert why in message
    assert "supported: JSON data" in message
    assert "dataclasses, attrs classes, pydantic models" in message
    assert "pass codec= to cached_dataset" in message
    assert "Register a structure hook" not in message  # cattrs' advice: its converter is ours
    # With codec= the same function is decorated, and its values stored that way.
    assert mf.cached_dataset("item:{name}", codec=ZlibJson())(fetch)("a") == "a"


def test_a_forward_reference_to_an_unsupported_type_fails_the_first_call_the_same_way(
    mf: Memofill,
) -> None:
    def fetch(name: str) -> Unsupported:
        return Unsupported()

    cached = mf.cached_dataset("item:{name}")(fetch)  # Unsupported does not exist yet

    class Unsupported:
        pass

    fetch.__globals__["Unsupported"] = Unsupported
    try:
        with pytest.raises(ConfigurationError, match=r"return annotation .*Unsupported is not"):
            cached("a")
    finally:
        del fetch.__globals__["Unsupported"]


@pytest.mark.memofill(unstorable=True)
def test_an_unstorable_value_warns_once_per_dataset(
    mf: Memofill, caplog: pytest.LogCaptureFixture
) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: Opaque())
    with caplog.at_level(logging.INFO, "memofill"):
        for name in "abc":
            assert isinstance(fetch(name), Opaque)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "Opaque" in message
    assert "annotate the function's return type, pass codec=" in message


def test_the_plugin_fails_a_test_with_an_unstorable_value(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import pytest
        from memofill import Dataset

        POLICIES = {"v:{n}": Dataset("v:{n}", ttl_s=5)}

        class Opaque:
            pass

        @pytest.mark.memofill(policies=POLICIES)
        def test_unexpected(memofill_cache):
            assert isinstance(memofill_cache.cached_dataset("v:{n}")(lambda n: Opaque())(1), Opaque)

        @pytest.mark.memofill(policies=POLICIES, unstorable=True)
        def test_expected(memofill_cache):
            assert isinstance(memofill_cache.cached_dataset("v:{n}")(lambda n: Opaque())(1), Opaque)

        @pytest.mark.memofill(policies=POLICIES)
        def test_storable(memofill_cache):
            assert memofill_cache.cached_dataset("v:{n}")(lambda n: [n])(1) == [1]
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_unexpected*", "*Opaque*"])


@pytest.mark.memofill(unstorable=True)
def test_unstorable_values_are_warned_once_per_configuration_block(
    mf: Memofill, caplog: pytest.LogCaptureFixture
) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: Opaque())
    with caplog.at_level(logging.INFO, "memofill"):
        fetch("a")
        mf.configure(prefix="p:")  # the same instance, reconfigured: still told once
        fetch("b")
        with mf.override():  # a block of its own, as each test's fixtures are
            fetch("c")
            assert mf.unstorable_warned == {"item:{name}"}
        fetch("d")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert mf.unstorable_warned == {"item:{name}"}


def test_the_plugin_fails_every_test_of_the_default_instance_with_an_unstorable_value(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import pytest
        import memofill
        from memofill import Dataset

        POLICIES = {"v:{n}": Dataset("v:{n}", ttl_s=5)}

        class Opaque:
            pass

        @pytest.mark.memofill(policies=POLICIES)
        def test_first(memofill_default):
            assert isinstance(memofill.cached_dataset("v:{n}")(lambda n: Opaque())(1), Opaque)

        @pytest.mark.memofill(policies=POLICIES)
        def test_second(memofill_default):
            assert isinstance(memofill.cached_dataset("v:{n}")(lambda n: Opaque())(1), Opaque)
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=2)


# --- aliasing ---------------------------------------------------------------------------------


def test_a_caller_mutating_its_value_does_not_change_what_an_outage_serves(
    mf: Memofill, raw: fakeredis.FakeRedis
) -> None:
    fetch = mf.cached_dataset("item:{name}")(_returning(Quote, Quote("u", roles=["user"])))
    fetch("a").roles.append("admin")  # the fill's caller
    fetch("a").roles.append("admin")  # a hit's caller
    mf.breaker.trip()  # Redis is down: the locally kept copy is served
    served = fetch.call_with_outcome("a")
    assert served.outcome == "fallback_hit"
    assert served.value == Quote("u", roles=["user"])
    served.value.roles.append("root")
    assert fetch("a").roles == ["user"]


def test_callers_joined_to_one_fill_get_their_own_copies(mf: Memofill) -> None:
    release = threading.Event()

    def fetch(name: str) -> dict[str, list[str]]:
        release.wait(5)
        return {"roles": ["user"]}

    cached = mf.cached_dataset("item:{name}")(fetch)
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(cached.call_with_outcome("a")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    while len(mf.thread_flights._flights) == 0:  # the leader is in its fetch
        threading.Event().wait(0.005)
    threading.Event().wait(0.05)
    release.set()
    for thread in threads:
        thread.join()
    assert sorted(r.outcome for r in results).count("local_join") >= 1
    values = [r.value for r in results]
    assert all(v == {"roles": ["user"]} for v in values)
    assert len({id(v) for v in values}) == len(values)


# --- non-finite floats ------------------------------------------------------------------------


@pytest.mark.memofill(unstorable=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    ("annotation", "wrap"),
    [
        (Any, lambda bad: bad),
        (dict[str, Any], lambda bad: {"a": [1, {"b": bad}]}),
        (Quote, lambda bad: Quote("n", bad)),
        (Model, lambda bad: Model(symbol="n", bid=bad, when=datetime.date(2026, 1, 1))),
    ],
)
def test_non_finite_floats_are_refused_loudly_not_stored_as_null(
    mf: Memofill, raw: fakeredis.FakeRedis, annotation: Any, wrap: Any, bad: float
) -> None:
    value = wrap(bad)
    fetch = mf.cached_dataset("item:{name}")(_returning(annotation, value))
    result = fetch.call_with_outcome("a")
    assert result.value is value
    assert raw.get("t:item:a") is None  # not stored: every process fetches its own
    assert mf.unstorable_warned == {"item:{name}"}


def test_a_null_that_was_none_is_still_stored() -> None:
    assert JSON.encode({"a": None, "b": 1.5}) == b'{"a":null,"b":1.5}'
    assert TypedCodec(Optional[Quote]).encode(None) == b"null"  # noqa: UP045


@pytest.mark.memofill(unstorable=True)
@pytest.mark.parametrize("annotation", [Quote, Model])
def test_a_value_of_another_type_than_annotated_is_refused_not_guessed_at(
    mf: Memofill, raw: fakeredis.FakeRedis, annotation: Any
) -> None:
    fetch = mf.cached_dataset("item:{name}")(_returning(annotation, 42))
    assert fetch("a") == 42
    assert raw.get("t:item:a") is None
    assert mf.unstorable_warned == {"item:{name}"}


@pytest.mark.memofill(policies=POLICIES, prefix="t:")
def test_the_module_level_decorator_takes_a_codec(
    memofill_default: Memofill, memofill_redis: Any
) -> None:
    fetch = memofill.cached_dataset("item:{name}", codec=ZlibJson())(lambda name: [name])
    assert fetch("z") == ["z"]
    assert orjson.loads(zlib.decompress(stored_payload(memofill_redis.get("t:item:z")))) == ["z"]
    assert fetch.call_with_outcome("z").outcome == "hit"


@pytest.mark.memofill(policies=POLICIES)
async def test_a_coroutine_function_gets_its_type_back_too(memofill_cache: Memofill) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    async def fetch(name: str) -> Trade:
        return Trade(name, WHEN, Decimal("1.5"))

    assert await fetch("a") == Trade("a", WHEN, Decimal("1.5"))
    hit = await fetch.call_with_outcome("a")
    assert (hit.outcome, hit.value, type(hit.value)) == (
        "hit",
        Trade("a", WHEN, Decimal("1.5")),
        Trade,
    )
