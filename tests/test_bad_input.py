"""Bad input at the call boundary and in the registry: normalised or refused, never confused.

The key rules themselves (escaping, digests, overlap) are unit-tested in
test_keys.py; here the arguments go through a decorated function, to a real
Redis and back, and the properties are stated over whole argument tuples:
different tuples never share an entry, and every entry's lock and wake keys
share its Cluster slot. The registry validator is fed arbitrary values and
must report them, never crash on them.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import itertools
import string
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from memofill import CacheFill, Dataset, KeyArgumentError, Memofill, RegistryError, validate
from memofill.keys import MAX_FIELD_CHARS, lock_key, wake_key
from memofill.policy import ensure_valid
from tests.support.redis_servers import RedisServer
from tests.support.strategies import canonical_kind, key_values

TWO_FIELDS = Dataset(
    "bad:{kind}:{name}",
    ttl_s=60,
    cache_fill=CacheFill(lease_ms=2_000, wait_ms=1_000, poll_min_ms=10, poll_max_ms=100),
)
POLICIES = {TWO_FIELDS.key: TWO_FIELDS}
#: What a key may hold after the prefix: printable ASCII, no space, no brace.
KEY_CHARS = set(string.ascii_letters + string.digits + "_.-:/%~")


class Region(enum.Enum):
    EU = "eu"


AWKWARD: list[object] = [
    "plain",
    "",
    ":",
    "a:b",
    "a/b",
    "{",
    "}",
    "{tag}",
    " ",
    "two words",
    "\n",
    "line\nbreak",
    "\t\r\x00",
    "é",
    "日本語",
    "🙂",
    "\udcff",  # a lone surrogate, as os.fsdecode makes from a bad file name
    "%3A",  # looks like an escaped ':' but is three characters
    "~" + "0" * 64,  # looks like a digest but is not one
    "x" * 10_000,
    "x" * 9_999 + "y",
    0,
    -1,
    2**70,
    10**5000,  # past str()'s limit for ints
    "0",
    "-1",
    None,
    "None",
    True,
    "True",
    uuid.UUID(int=1),
    datetime.date(2024, 1, 31),
    datetime.datetime(2024, 1, 31, 8, 30),
    datetime.datetime(2024, 1, 31, 8, 30, tzinfo=datetime.timezone.utc),
    decimal.Decimal("0.10"),
    Region.EU,
]


def identity(value: object) -> tuple[str, object]:
    """What a field value stands for: its kind and value (42 and "42" differ; enums: the value)."""
    plain = value.value if isinstance(value, enum.Enum) else value
    return canonical_kind(value), plain


def stored(value: object) -> str:
    """The cached value naming ``value`` (ASCII: orjson refuses a lone surrogate in a value)."""
    kind, plain = identity(value)
    # hex: an int past 4,300 digits has no decimal text.
    return kind + ":" + (hex(plain) if type(plain) is int else ascii(plain))


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def cached(client: Any, prefix: str, calls: list[tuple[object, object]]) -> Any:
    mf = Memofill(client, prefix=prefix, policies=POLICIES)

    @mf.cached_dataset(TWO_FIELDS.key)
    def fetch(kind: object, name: object) -> list[str]:
        calls.append((kind, name))
        return [stored(kind), stored(name)]

    return fetch


@pytest.mark.redis_server
def test_awkward_arguments_each_get_their_own_entry_in_redis(
    client: redis.Redis, prefix: str
) -> None:
    calls: list[tuple[object, object]] = []
    fetch = cached(client, prefix, calls)
    pairs = [(a, b) for a, b in itertools.product(AWKWARD, repeat=2) if a != b or a == "plain"]
    for kind, name in pairs:
        assert fetch(kind, name) == [stored(kind), stored(name)]
    # Second round: every pair is a hit holding its own value.
    for kind, name in pairs:
        result = fetch.call_with_outcome(kind, name)
        assert (result.outcome, result.value) == ("hit", [stored(kind), stored(name)])
    assert len(calls) == len(pairs)
    keys = [k.decode() for k in client.scan_iter(f"{prefix}*") if not k.endswith(b"#meta")]
    assert len(keys) == len(pairs)
    for key in keys:
        rest = key.removeprefix(prefix)
        assert set(rest) <= KEY_CHARS, key
        assert len(rest) <= len("bad::") + 2 * MAX_FIELD_CHARS
        assert key_slot(lock_key(key).encode()) == key_slot(key.encode())


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (1.5, "float"),
        (float("nan"), "float"),
        (b"bytes", "bytes"),
        (["a"], "list"),
        (("a",), "tuple"),
        ({"a": 1}, "dict"),
        (object(), "object"),
    ],
)
async def test_values_that_cannot_name_a_key_are_refused_clearly(
    fake_client: Any, prefix: str, value: object, type_name: str
) -> None:
    calls: list[tuple[object, object]] = []
    fetch = cached(fake_client, prefix, calls)
    with pytest.raises(
        KeyArgumentError, match=rf"\{{name\}} takes a str or int .*, not {type_name}:"
    ):
        fetch("plain", value)
    with pytest.raises(TypeError):  # KeyArgumentError is a TypeError, as the caller expects
        fetch(value, "plain")
    assert calls == []
    assert fake_client.dbsize() == 0

    mf = Memofill(async_client=fake_async(fake_client), prefix=prefix, policies=POLICIES)

    @mf.cached_dataset(TWO_FIELDS.key)
    async def fetch_async(kind: object, name: object) -> str:
        calls.append((kind, name))
        return "never"

    with pytest.raises(KeyArgumentError, match=type_name):
        await fetch_async(value, "plain")
    assert calls == []


def fake_async(fake_client: Any) -> Any:
    import fakeredis  # noqa: PLC0415  # only these tests need the asyncio flavour

    return fakeredis.FakeAsyncRedis(server=fake_client.connection_pool.connection_kwargs["server"])


def test_an_int_and_its_text_name_two_entries(fake_client: Any, prefix: str) -> None:
    calls: list[tuple[object, object]] = []
    fetch = cached(fake_client, prefix, calls)
    assert fetch.redis_key(42, "eu") != fetch.redis_key("42", Region.EU)
    assert fetch.redis_key("42", "eu") == fetch.redis_key("42", Region.EU)
    fetch(42, "eu")
    assert fetch.call_with_outcome("42", Region.EU).outcome != "hit"
    assert fetch.call_with_outcome("42", "eu").outcome == "hit"
    assert calls == [(42, "eu"), ("42", Region.EU)]


# -- properties over whole argument tuples ---------------------------------------------------

field_values = key_values | st.text(min_size=150, max_size=400)


@given(st.tuples(field_values, field_values), st.tuples(field_values, field_values))
@settings(max_examples=300, deadline=None)
def test_two_argument_tuples_share_a_key_only_when_they_name_the_same_values(
    first: tuple[object, object], second: tuple[object, object]
) -> None:
    fetch = cached(None, "p:", [])
    same = tuple(map(identity, first)) == tuple(map(identity, second))
    assert (fetch.redis_key(*first) == fetch.redis_key(*second)) is same


@given(
    st.sampled_from(["", "app:", "{tenant}:", "t-1/"]),
    st.tuples(field_values, field_values),
)
@settings(max_examples=200, deadline=None)
def test_every_entry_keeps_its_lock_and_wake_keys_in_its_slot(
    prefix: str, values: tuple[object, object]
) -> None:
    key = cached(None, prefix, []).redis_key(*values)
    slot = key_slot(key.encode())
    assert key_slot(lock_key(key).encode()) == slot
    assert key_slot(wake_key(key).encode()) == slot
    assert len({key, lock_key(key), wake_key(key)}) == 3


# -- the registry validator fed arbitrary values ---------------------------------------------

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.builds(object),
)
fills = st.builds(CacheFill, anything, anything, anything, anything) | anything
junk_datasets = st.builds(
    Dataset,
    key=st.text(max_size=30) | anything,
    ttl_s=anything,
    negative_ttl_s=anything,
    cache_fill=st.none() | fills,
)


@given(st.lists(junk_datasets | anything, max_size=6))
@settings(max_examples=300, deadline=None)
def test_the_validator_reports_any_values_and_never_crashes(registry: list[object]) -> None:
    problems = validate(registry)
    for problem in problems:
        assert isinstance(problem.key, str)
        assert problem.field
        assert problem.rule
        str(problem)  # every problem renders
    if problems:
        with pytest.raises(RegistryError) as raised:
            ensure_valid(registry)
        assert [str(p) for p in raised.value.problems] == [str(p) for p in problems]  # NaN != NaN
        assert isinstance(raised.value, ValueError)
    else:
        ensure_valid(registry)
