"""``@cached_dataset``: what is decided at decoration, how keys are built, and the wrapper's API.

All on fakeredis; the same behaviour on a real server is in ``test_contract.py``.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import functools
import inspect
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal, Optional, Union

import fakeredis
import pytest
import redis
import redis.asyncio

import memofill
from memofill import (
    CachedDataset,
    CallResult,
    ConfigurationError,
    Dataset,
    KeyArgumentError,
    KeyTemplateError,
    Memofill,
    UnknownDatasetError,
)
from memofill.codec import encode
from memofill.testing import stored_payload
from tests.conftest import POLICIES


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def raw(server: fakeredis.FakeServer) -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis(server=server)
    yield client
    client.close()


@pytest.fixture
def mf(raw: fakeredis.FakeRedis) -> Memofill:
    return Memofill(raw, prefix="t:", policies=POLICIES)


@pytest.fixture
async def amf(server: fakeredis.FakeServer) -> AsyncIterator[Memofill]:
    client = fakeredis.FakeAsyncRedis(server=server)
    yield Memofill(client, prefix="t:", policies=POLICIES)
    await client.aclose()


class Origin:
    """A fetch function's upstream: counts calls, returns a value built from the argument."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, name: Any) -> dict[str, Any]:
        self.calls.append(name)
        return {"name": str(name), "call": len(self.calls)}


# --- decoration time -------------------------------------------------------------------


def test_unknown_dataset_fails_when_decorating(mf: Memofill) -> None:
    with pytest.raises(UnknownDatasetError, match="nope:v1") as info:
        mf.cached_dataset("nope:v1")
    assert isinstance(info.value, LookupError)
    assert "item:{name}" in str(info.value)  # the message lists the known keys


def test_template_field_that_is_not_a_parameter_fails_when_decorating(mf: Memofill) -> None:
    decorate = mf.cached_dataset("item:{name}")
    with pytest.raises(KeyTemplateError, match=r"\{name\}.*symbol"):

        @decorate
        def fetch(symbol: str) -> int:
            return 1


@pytest.mark.parametrize("signature", ["*name", "**name"])
def test_template_field_bound_to_var_args_fails_when_decorating(
    mf: Memofill, signature: str
) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def fetch({signature}): return 1", namespace)
    with pytest.raises(KeyTemplateError):
        mf.cached_dataset("item:{name}")(namespace["fetch"])


# --- the key covers every argument ---------------------------------------------------------

LANG = {
    "b:{topic}": Dataset("b:{topic}", ttl_s=60),
    "b:{topic}:{lang}": Dataset("b:{topic}:{lang}", ttl_s=60),
}


def test_a_parameter_the_key_does_not_hold_fails_when_decorating() -> None:
    mf = Memofill(None, policies=LANG)
    with pytest.raises(KeyTemplateError) as caught:

        @mf.cached_dataset("b:{topic}")
        def b(topic: str, lang: str = "en") -> dict[str, str]:
            return {"topic": topic, "lang": lang}

    message = str(caught.value)
    assert "parameter 'lang' is not in the key" in message
    assert "add {lang} to the registry key" in message
    assert "ignore=('lang',)" in message
    assert "\n" not in message


def test_with_the_parameter_in_the_key_each_value_gets_its_entry(raw: fakeredis.FakeRedis) -> None:
    mf = Memofill(raw, policies=LANG)

    @mf.cached_dataset("b:{topic}:{lang}")
    def b(topic: str, lang: str = "en") -> dict[str, str]:
        return {"topic": topic, "lang": lang}

    assert b("rates") == {"topic": "rates", "lang": "en"}
    assert b("rates", lang="fr") == {"topic": "rates", "lang": "fr"}
    assert sorted(raw.keys("b:*")) == [b"b:rates:en", b"b:rates:fr"]


def test_an_ignored_parameter_is_left_out_of_the_key(mf: Memofill) -> None:
    origin = Origin()

    @mf.cached_dataset("item:{name}", ignore=("db", "timeout_s"))
    def fetch(db: object, name: str, *, timeout_s: float = 1.0) -> dict[str, Any]:
        return origin(name)

    assert (
        fetch.redis_key("session-1", "a") == fetch.redis_key(None, "a", timeout_s=9) == "t:item:a"
    )
    fetch("session-1", "a")
    fetch("session-2", "a", timeout_s=2.0)
    assert origin.calls == ["a"]


@pytest.mark.parametrize(
    ("signature", "name"), [("name, *args", "args"), ("name, **options", "options")]
)
def test_var_args_must_be_ignored(mf: Memofill, signature: str, name: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def fetch({signature}): return 1", namespace)
    with pytest.raises(
        KeyTemplateError,
        match=rf"takes arguments the key cannot see; list it as ignore=\('{name}',\)",
    ):
        mf.cached_dataset("item:{name}")(namespace["fetch"])
    fetch = mf.cached_dataset("item:{name}", ignore=(name,))(namespace["fetch"])
    assert fetch.redis_key("a") == "t:item:a"


@pytest.mark.parametrize(
    ("ignore", "message"),
    [
        (("nope",), "ignore= names 'nope', which is not a parameter"),
        (("name",), "ignore= names 'name', which is a key field"),
        ("db", r"ignore= takes a tuple of parameter names, such as ignore=\('db',\), not a str"),
        ((1,), "ignore= holds 1; it takes parameter names"),
    ],
)
def test_a_wrong_ignore_fails_when_decorating(mf: Memofill, ignore: Any, message: str) -> None:
    with pytest.raises(KeyTemplateError, match=message):

        @mf.cached_dataset("item:{name}", ignore=ignore)
        def fetch(name: str, db: object = None) -> int:
            return 1


def test_a_methods_self_and_cls_need_no_ignore(mf: Memofill) -> None:
    class Service:
        @mf.cached_dataset("item:{name}")
        def by_self(self, name: str) -> str:
            return name

        @mf.cached_dataset("fast:{name}")
        def by_cls(cls, name: str) -> str:  # as a classmethod names it
            return name

    assert Service().by_self.redis_key("a") == "t:item:a"
    with pytest.raises(KeyTemplateError, match="parameter 'this'"):

        @mf.cached_dataset("item:{name}")
        def odd(this: object, name: str) -> str:
            return name


# --- key field types --------------------------------------------------------------------------


class Tier(enum.Enum):
    GOLD = "gold"


def test_supported_annotations_are_accepted(mf: Memofill) -> None:
    @mf.cached_dataset("item:{name}")
    def optional(name: int | None = None) -> int:
        return 1

    @mf.cached_dataset("item:{name}")
    def literal(name: Literal["a", 1, Tier.GOLD]) -> int:
        return 1

    @mf.cached_dataset("item:{name}")
    def annotated(name: Annotated[Optional[uuid.UUID], "doc"]) -> int:  # noqa: UP045  # typing's
        return 1

    @mf.cached_dataset("item:{name}")
    def many(name: Union[str, Tier, datetime.date, decimal.Decimal, bool]) -> int:  # noqa: UP007
        return 1

    assert optional.redis_key() == "t:item:~n"
    assert optional.redis_key(3) == "t:item:3"


@pytest.mark.parametrize(
    ("annotation", "problem"),
    [
        ("float", "float has no exact key text"),
        ("int | float", "float has no exact key text"),
        ("list[str]", "list has no exact key text"),
        ("Literal['a', 1.5]", "Literal value 1.5 has no exact key text"),
        ("Annotated[bytes, 'x']", "bytes has no exact key text"),
    ],
)
def test_an_annotation_without_an_exact_text_fails_when_decorating(
    mf: Memofill, annotation: str, problem: str
) -> None:
    namespace: dict[str, Any] = {"Literal": Literal, "Annotated": Annotated}
    exec(f"def fetch(name: {annotation!r}): return 1", namespace)
    with pytest.raises(KeyTemplateError) as caught:
        mf.cached_dataset("item:{name}")(namespace["fetch"])
    message = str(caught.value)
    assert f"field {{name}}: {problem}; annotate it str, int" in message
    assert "ignore=('name',)" in message


def test_an_annotation_that_does_not_resolve_is_checked_at_call_time(mf: Memofill) -> None:
    namespace: dict[str, Any] = {}
    exec("def fetch(name: 'NotImportedHere'): return 1", namespace)
    fetch = mf.cached_dataset("item:{name}")(namespace["fetch"])
    assert fetch("a") == 1
    with pytest.raises(KeyArgumentError, match="not float"):
        fetch(1.5)


# --- coroutine functions behind a plain wrapper -----------------------------------------------


def plain_wrapper(function: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator written as a plain ``def``: it returns the coroutine unawaited."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return wrapper


async def test_an_async_function_behind_a_plain_wrapper_is_cached_as_one(
    amf: Memofill, raw: fakeredis.FakeRedis
) -> None:
    origin = Origin()

    @amf.cached_dataset("item:{name}")
    @plain_wrapper
    async def fetch(name: str) -> dict[str, Any]:
        return origin(name)

    assert inspect.iscoroutinefunction(fetch.__wrapped__.__wrapped__)
    assert await fetch("a") == {"name": "a", "call": 1}
    result = await fetch.call_with_outcome("a")
    assert (result.outcome, result.value) == ("hit", {"name": "a", "call": 1})
    assert origin.calls == ["a"]
    assert stored_payload(raw.get("t:item:a")) == encode({"name": "a", "call": 1})


async def test_an_object_with_an_async_call_is_cached_as_a_coroutine_function(
    amf: Memofill,
) -> None:
    origin = Origin()

    class AsyncOrigin:
        async def __call__(self, name: str) -> dict[str, Any]:
            return origin(name)

    fetch = amf.cached_dataset("item:{name}")(AsyncOrigin())
    assert await fetch("a") == {"name": "a", "call": 1}
    assert (await fetch.call_with_outcome("a")).outcome == "hit"
    assert origin.calls == ["a"]


def test_a_plain_function_behind_a_plain_wrapper_stays_sync(
    mf: Memofill, raw: fakeredis.FakeRedis
) -> None:
    origin = Origin()

    @mf.cached_dataset("item:{name}")
    @plain_wrapper
    def fetch(name: str) -> dict[str, Any]:
        return origin(name)

    assert fetch("a") == {"name": "a", "call": 1}
    assert fetch.call_with_outcome("a").outcome == "hit"
    assert origin.calls == ["a"]


def test_decorating_needs_no_client_only_policies() -> None:
    unconfigured = Memofill(None, policies=POLICIES)

    @unconfigured.cached_dataset("item:{name}")
    def fetch(name: str) -> str:
        return name

    assert isinstance(fetch, CachedDataset)
    assert fetch.dataset is POLICIES["item:{name}"]


def test_module_level_decorator_reads_the_generated_policies() -> None:
    with memofill.instance.default.override():  # forgets what the block decorates

        @memofill.cached_dataset("market:quotes:{symbol}")
        def quotes(symbol: str) -> dict[str, Any]:
            return {}

        assert quotes.dataset.cache_fill is not None
        assert quotes.dataset.cache_fill.wait_ms < quotes.dataset.cache_fill.lease_ms
        with pytest.raises(UnknownDatasetError):
            memofill.cached_dataset("item:{name}")


# --- what the wrapper looks like -------------------------------------------------------


def test_keeps_name_doc_signature_and_module(mf: Memofill) -> None:
    def fetch_item(name: str, *, verbose: bool = False) -> dict[str, Any]:
        """Fetch one item from the slow upstream."""
        return {}

    wrapped = mf.cached_dataset("item:{name}", ignore=("verbose",))(fetch_item)
    assert wrapped.__name__ == "fetch_item"
    assert wrapped.__qualname__ == fetch_item.__qualname__
    assert wrapped.__doc__ == "Fetch one item from the slow upstream."
    assert wrapped.__module__ == __name__
    assert wrapped.__wrapped__ is fetch_item
    assert inspect.signature(wrapped) == inspect.signature(fetch_item)
    assert not inspect.iscoroutinefunction(wrapped)


def test_coroutine_function_stays_a_coroutine_function(amf: Memofill) -> None:
    async def fetch_item(name: str) -> int:
        """Async upstream."""
        return 1

    wrapped = amf.cached_dataset("item:{name}")(fetch_item)
    assert inspect.iscoroutinefunction(wrapped)
    assert wrapped.__name__ == "fetch_item"
    assert wrapped.__doc__ == "Async upstream."
    assert inspect.signature(wrapped) == inspect.signature(fetch_item)


# --- functions, methods, coroutines ----------------------------------------------------


def test_function_is_called_once_then_served_from_redis(
    mf: Memofill, raw: fakeredis.FakeRedis
) -> None:
    origin = Origin()
    fetch = mf.cached_dataset("item:{name}")(origin)
    assert fetch("a") == {"name": "a", "call": 1}
    assert fetch("a") == {"name": "a", "call": 1}
    assert origin.calls == ["a"]
    assert stored_payload(raw.get("t:item:a")) == encode({"name": "a", "call": 1})


async def test_coroutine_function_is_called_once(amf: Memofill, raw: fakeredis.FakeRedis) -> None:
    origin = Origin()

    @amf.cached_dataset("item:{name}")
    async def fetch(name: str) -> dict[str, Any]:
        return origin(name)

    assert await fetch("a") == {"name": "a", "call": 1}
    assert await fetch("a") == {"name": "a", "call": 1}
    assert origin.calls == ["a"]
    assert raw.get("t:item:a") is not None


class Repo:
    """Methods whose key fields come after ``self``."""

    def __init__(self, mf: Memofill, origin: Origin) -> None:
        self.origin = origin
        self.mf = mf

    def fetch(self, name: str) -> dict[str, Any]:
        return self.origin(name)


def make_repo_class(mf: Memofill) -> type[Repo]:
    class CachedRepo(Repo):
        @mf.cached_dataset("item:{name}")
        def fetch(self, name: str) -> dict[str, Any]:
            """Cached method."""
            return self.origin(name)

    return CachedRepo


def test_method_via_instance_and_via_class_share_one_entry(mf: Memofill) -> None:
    origin = Origin()
    repo = make_repo_class(mf)(mf, origin)
    assert repo.fetch("a") == {"name": "a", "call": 1}
    assert type(repo).fetch(repo, "a") == {"name": "a", "call": 1}
    assert repo.fetch(name="a") == {"name": "a", "call": 1}
    assert origin.calls == ["a"]
    assert repo.fetch.__doc__ == "Cached method."


def test_method_helpers_via_instance_and_via_class(mf: Memofill) -> None:
    origin = Origin()
    repo = make_repo_class(mf)(mf, origin)
    cls = type(repo)
    assert repo.fetch.redis_key("a") == "t:item:a"
    assert cls.fetch.redis_key(repo, "a") == "t:item:a"
    first = repo.fetch.call_with_outcome("a")
    assert (first.outcome, first.led) == ("leader_fill", True)
    assert cls.fetch.call_with_outcome(repo, "a") == CallResult(first.value, "hit", False)
    repo.fetch.invalidate("a")
    assert repo.fetch.call_with_outcome("a").outcome == "leader_fill"
    cls.fetch.invalidate(repo, "a")
    assert cls.fetch.call_with_outcome(repo, name="a").outcome == "leader_fill"
    assert origin.calls == ["a", "a", "a"]


async def test_async_method_via_instance_and_via_class(amf: Memofill) -> None:
    origin = Origin()

    class AsyncRepo:
        @amf.cached_dataset("item:{name}")
        async def fetch(self, name: str) -> dict[str, Any]:
            return origin(name)

    repo = AsyncRepo()
    assert await repo.fetch("a") == await AsyncRepo.fetch(repo, "a")
    result = await repo.fetch.call_with_outcome("a")
    assert (result.outcome, result.led) == ("hit", False)
    await AsyncRepo.fetch.invalidate(repo, "a")
    assert (await repo.fetch.call_with_outcome("a")).outcome == "leader_fill"
    assert origin.calls == ["a", "a"]


def test_field_from_keyword_default_and_keyword_only(mf: Memofill) -> None:
    origin = Origin()

    @mf.cached_dataset("item:{name}", ignore=("limit",))
    def with_default(limit: int = 5, name: str = "dflt") -> dict[str, Any]:
        return origin(name)

    @mf.cached_dataset("fast:{name}")
    def keyword_only(*, name: str) -> dict[str, Any]:
        return origin(name)

    assert with_default.redis_key() == "t:item:dflt"
    assert with_default.redis_key(1, "x") == with_default.redis_key(name="x") == "t:item:x"
    with_default()
    with_default(3)
    assert origin.calls == ["dflt"]
    assert keyword_only.redis_key(name="k") == "t:fast:k"
    with pytest.raises(TypeError, match="name"):
        keyword_only.redis_key()


# --- arguments the function would refuse ------------------------------------------------


def refusal(call: Callable[[], object]) -> str:
    """The message of the TypeError ``call`` raises."""
    with pytest.raises(TypeError) as caught:
        call()
    return str(caught.value)


def get(name: str, session: object = None) -> dict[str, Any]:
    return {"name": name}


#: Calls that Python refuses, each with ``get``'s parameters: (args, kwargs).
REFUSED_CALLS = [
    (("a", None, "extra"), {}),  # one positional argument too many
    ((), {}),  # a required one missing
    (("a",), {"name": "b"}),  # one argument given twice
    (("a",), {"colour": "red"}),  # a keyword the function does not take
]


@pytest.mark.parametrize(("args", "kwargs"), REFUSED_CALLS, ids=["extra", "missing", "twice", "kw"])
def test_arguments_the_function_refuses_raise_its_typeerror_on_a_hit_and_on_a_miss(
    mf: Memofill, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    expected = refusal(lambda: get(*args, **kwargs))
    cached = mf.cached_dataset("item:{name}", ignore=("session",))(get)
    assert refusal(lambda: cached(*args, **kwargs)) == expected  # a miss: nothing stored
    assert cached("a") == {"name": "a"}  # now "a" is stored: the same call would be a hit
    assert cached.call_with_outcome("a").outcome == "hit"
    assert refusal(lambda: cached(*args, **kwargs)) == expected
    assert refusal(lambda: cached.call_with_outcome(*args, **kwargs)) == expected
    assert refusal(lambda: cached.redis_key(*args, **kwargs)) == expected


def test_a_method_refuses_an_extra_argument_as_python_does(mf: Memofill) -> None:
    class Store:
        def get(self, name: str) -> dict[str, Any]:
            return {"name": name}

    expected = refusal(lambda: Store().get("a", "extra"))  # type: ignore[call-arg]
    assert expected == (
        "test_a_method_refuses_an_extra_argument_as_python_does.<locals>.Store.get() "
        "takes 2 positional arguments but 3 were given"
    )
    Store.get = mf.cached_dataset("item:{name}")(Store.get)  # type: ignore[method-assign]
    store = Store()
    assert refusal(lambda: store.get("a", "extra")) == expected  # type: ignore[call-arg]
    assert store.get("a") == {"name": "a"}
    assert refusal(lambda: store.get("a", "extra")) == expected  # type: ignore[call-arg]
    assert store.get(name="a") == {"name": "a"}  # what fits still fits


def test_keys_with_no_field_or_several_refuse_what_the_function_refuses(mf: Memofill) -> None:
    policies = {"all": Dataset("all", ttl_s=60), "pair:{a}:{b}": Dataset("pair:{a}:{b}", ttl_s=60)}
    tenant = Memofill(mf._sync.client if mf._sync else None, prefix="t:", policies=policies)

    def every() -> list[str]:
        return ["x"]

    def pair(a: str, b: str = "-", *, c: int = 0) -> str:
        return a + b

    cached_every = tenant.cached_dataset("all")(every)
    cached_pair = tenant.cached_dataset("pair:{a}:{b}", ignore=("c",))(pair)
    assert (cached_every(), cached_pair("x"), cached_pair("x", "y", c=1)) == (["x"], "x-", "xy")
    for raw, cached, args, kwargs in [
        (every, cached_every, (1,), {}),
        (every, cached_every, (), {"x": 1}),
        (pair, cached_pair, ("x", "y", "z"), {}),
        (pair, cached_pair, ("x",), {"a": "y"}),
        (pair, cached_pair, ("x",), {"d": 1}),
    ]:
        expected = refusal(lambda: raw(*args, **kwargs))  # noqa: B023  # called at once
        assert refusal(lambda: cached(*args, **kwargs)) == expected  # noqa: B023


async def test_a_coroutine_function_refuses_on_a_hit_as_on_a_miss(amf: Memofill) -> None:
    async def fetch(name: str) -> dict[str, Any]:
        return {"name": name}

    cached = amf.cached_dataset("item:{name}")(fetch)
    expected = refusal(lambda: fetch("a", "extra"))  # type: ignore[call-arg]
    with pytest.raises(TypeError) as miss:
        await cached("a", "extra")
    assert await cached("a") == {"name": "a"}
    with pytest.raises(TypeError) as hit:
        await cached("a", "extra")
    assert str(miss.value) == str(hit.value) == expected


# --- keys ------------------------------------------------------------------------------


def test_an_argument_with_separators_cannot_forge_another_key(mf: Memofill) -> None:
    policies = {
        "user:{uid}": Dataset("user:{uid}", ttl_s=60),
        "user:{uid}:admin": Dataset("user:{uid}:admin", ttl_s=60),
    }
    tenant = Memofill(mf._sync.client if mf._sync else None, prefix="t:", policies=policies)

    @tenant.cached_dataset("user:{uid}")
    def user(uid: str) -> str:
        return f"user {uid}"

    @tenant.cached_dataset("user:{uid}:admin")
    def admin(uid: str) -> str:
        return f"admin {uid}"

    assert admin("u7") == "admin u7"
    assert user("u7:admin") == "user u7:admin"  # not the admin entry
    assert user.redis_key("u7:admin") == "t:user:u7%3Aadmin"
    assert admin.redis_key("u7") == "t:user:u7:admin"
    assert len({user.redis_key(v) for v in ["a/b", "a%2Fb", "a b", "a\nb", "{a}", "a:b"]}) == 6


def test_values_of_different_types_name_different_entries(mf: Memofill) -> None:
    origin = Origin()
    fetch = mf.cached_dataset("item:{name}")(origin)

    class Color(enum.Enum):
        RED = "red"

    for value in [42, "42", None, "None", "", True, 1, "True", Color.RED, "red"]:
        fetch(value)
    # An enum member names its value's entry; every other value is its own.
    assert origin.calls == [42, "42", None, "None", "", True, 1, "True", Color.RED]


@pytest.mark.parametrize("bad", [1.5, object(), b"bytes", [1], float("nan")])
def test_an_argument_that_cannot_name_a_key_is_refused_before_redis(
    mf: Memofill, raw: fakeredis.FakeRedis, bad: Any
) -> None:
    origin = Origin()
    fetch = mf.cached_dataset("item:{name}")(origin)
    with pytest.raises(KeyArgumentError):
        fetch(bad)
    assert origin.calls == []
    assert raw.dbsize() == 0


def test_a_long_argument_becomes_a_digest(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(Origin())
    key = fetch.redis_key("x" * 1000)
    assert key.startswith("t:item:~")
    assert len(key) < 100
    assert key != fetch.redis_key("x" * 1001)


def test_final_key_and_lock_key_agree_with_the_decorator(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(Origin())
    assert mf.final_key("item:{name}", name="a b") == fetch.redis_key("a b") == "t:item:a%20b"
    assert mf.lock_key("item:{name}", name="a") == "{t:item:a}#lock"


# --- the wrapper's helpers -------------------------------------------------------------


def test_call_with_outcome_tells_value_outcome_and_leadership(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(Origin())
    first = fetch.call_with_outcome("a")
    assert first == CallResult({"name": "a", "call": 1}, "leader_fill", True)
    assert fetch.call_with_outcome("a") == CallResult({"name": "a", "call": 1}, "hit", False)
    assert fetch.call_with_outcome(name="b").outcome == "leader_fill"


def test_invalidate_deletes_the_entry_so_the_next_call_fills_again(
    mf: Memofill, raw: fakeredis.FakeRedis
) -> None:
    origin = Origin()
    fetch = mf.cached_dataset("item:{name}")(origin)
    fetch("a")
    fetch("b")
    assert fetch.invalidate("a") == 1
    assert raw.exists("t:item:a") == 0
    assert raw.exists("t:item:b") == 1
    assert fetch("a") == {"name": "a", "call": 3}
    assert fetch.invalidate("zzz") == 0


async def test_async_invalidate_and_call_with_outcome_are_awaitable(amf: Memofill) -> None:
    origin = Origin()

    @amf.cached_dataset("item:{name}")
    async def fetch(name: str) -> dict[str, Any]:
        return origin(name)

    assert await fetch.call_with_outcome("a") == CallResult(
        {"name": "a", "call": 1}, "leader_fill", True
    )
    assert await fetch.invalidate("a") == 1
    assert (await fetch.call_with_outcome("a")).outcome == "leader_fill"


# --- configuration ---------------------------------------------------------------------


def test_a_client_that_decodes_responses_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="decode_responses"):
        Memofill(redis.Redis(decode_responses=True), policies=POLICIES)
    with pytest.raises(ConfigurationError, match="decode_responses"):
        Memofill(fakeredis.FakeRedis(decode_responses=True), policies=POLICIES)


async def test_an_async_client_that_decodes_responses_is_refused() -> None:
    client = redis.asyncio.Redis(decode_responses=True)
    try:
        with pytest.raises(ConfigurationError, match="decode_responses"):
            Memofill(client, policies=POLICIES)
    finally:
        await client.aclose()


def test_something_that_is_not_a_redis_client_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="dict"):
        Memofill({}, policies=POLICIES)


@pytest.mark.parametrize("prefix", ["{app", "app}", "{}:", "{a}{b}:", "}{"])
def test_a_prefix_that_would_split_lock_and_data_slots_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="prefix"):
        Memofill(None, prefix=prefix, policies=POLICIES)


@pytest.mark.parametrize(("prefix", "type_name"), [(b"app:", "bytes"), (7, "int")])
def test_a_prefix_that_is_not_a_str_is_a_configuration_error(
    raw: fakeredis.FakeRedis, prefix: Any, type_name: str
) -> None:
    expected = f"prefix {prefix!r}: a prefix must be a str, such as 'app:', not {type_name}"
    with pytest.raises(ConfigurationError) as caught:
        Memofill(None, prefix=prefix, policies=POLICIES)
    assert str(caught.value) == expected
    mf = Memofill(raw, prefix="t:", policies=POLICIES)
    with pytest.raises(ConfigurationError, match="must be a str"):
        mf.configure(raw, prefix=prefix)
    assert mf.prefix == "t:"


def test_a_hash_tag_prefix_is_kept_for_data_and_lock_keys(raw: fakeredis.FakeRedis) -> None:
    tenant = Memofill(raw, prefix="{tenant-7}:", policies=POLICIES)
    assert tenant.final_key("item:{name}", name="a") == "{tenant-7}:item:a"
    assert tenant.lock_key("item:{name}", name="a") == "{tenant-7}:item:a#lock"


def test_two_clients_of_one_kind_are_refused(raw: fakeredis.FakeRedis) -> None:
    with pytest.raises(ConfigurationError):
        Memofill(raw, async_client=fakeredis.FakeRedis(), policies=POLICIES)


def test_a_sync_function_without_a_blocking_client_is_a_configuration_error(
    server: fakeredis.FakeServer,
) -> None:
    """A def route of an app configured with async_client= alone: the message says what to add."""
    only_async = Memofill(fakeredis.FakeAsyncRedis(server=server), policies=POLICIES)
    fetch = only_async.cached_dataset("item:{name}")(Origin())
    with pytest.raises(ConfigurationError) as caught:
        fetch("a")
    assert str(caught.value) == (
        "Origin (item:{name}): a plain function needs a blocking Redis client, and only an "
        "asyncio one is configured: pass one as client= too (memofill.redis_client(url))"
    )


async def test_a_coroutine_function_without_an_asyncio_client_is_a_configuration_error(
    server: fakeredis.FakeServer,
) -> None:
    only_sync = Memofill(fakeredis.FakeRedis(server=server), policies=POLICIES)

    @only_sync.cached_dataset("item:{name}")
    async def fetch(name: str) -> str:
        return name

    with pytest.raises(ConfigurationError) as caught:
        await fetch("a")
    assert str(caught.value) == (
        f"{fetch.__wrapped__.__qualname__} (item:{{name}}): a coroutine function needs an "
        "asyncio Redis client, and only a blocking one is configured: pass one as async_client= "
        "too (memofill.redis_client(url, asyncio=True))"
    )


def test_reconfiguring_policies_rebinds_decorated_functions(mf: Memofill) -> None:
    fetch = mf.cached_dataset("item:{name}")(Origin())
    changed = dict(POLICIES)
    changed["item:{name}"] = Dataset("item:{name}", ttl_s=5)
    mf.configure(mf._sync.client if mf._sync else None, policies=changed)
    assert fetch.dataset.ttl_s == 5
    assert fetch.call_with_outcome("a").outcome == "legacy"


def test_module_level_configure_returns_the_default_instance(raw: fakeredis.FakeRedis) -> None:
    with memofill.instance.default.override():  # puts the default back as it was
        configured = memofill.configure(raw, prefix="m:")
        assert configured is memofill.instance.default

        @memofill.cached_dataset("news:digest:v1")
        def digest() -> str:
            return "today"

        assert digest() == "today"
        assert stored_payload(raw.get("m:news:digest:v1")) == b'"today"'


def test_a_refused_configuration_changes_nothing(mf: Memofill, raw: fakeredis.FakeRedis) -> None:
    fetch = mf.cached_dataset("item:{name}")(Origin())
    before = (mf.prefix, mf._sync, fetch.dataset)
    without_item = {k: v for k, v in POLICIES.items() if k != "item:{name}"}
    with pytest.raises(UnknownDatasetError, match=r"item:\{name\}"):
        mf.configure(raw, prefix="other:", policies=without_item)
    with pytest.raises(ConfigurationError):
        mf.configure(fakeredis.FakeRedis(decode_responses=True), prefix="other:")
    assert (mf.prefix, mf._sync, fetch.dataset) == before
    assert fetch.redis_key("a") == "t:item:a"


# --- no Redis at all -------------------------------------------------------------------


def test_without_a_client_misses_take_the_legacy_path() -> None:
    origin = Origin()
    local = Memofill(None, policies=POLICIES)
    fetch = local.cached_dataset("item:{name}")(origin)
    first = fetch.call_with_outcome("a")
    assert first == CallResult({"name": "a", "call": 1}, "legacy", True)
    assert local.counters.snapshot() == {"item:{name}": {"legacy": 1}}
    assert fetch.invalidate("a") is None


async def test_without_a_client_coroutines_take_the_legacy_path() -> None:
    local = Memofill(None, policies=POLICIES)

    @local.cached_dataset("item:{name}")
    async def fetch(name: str) -> str:
        return name

    assert (await fetch.call_with_outcome("a")).outcome == "legacy"
    assert await fetch.invalidate("a") is None


def test_functools_partial_of_a_cached_function_still_works(mf: Memofill) -> None:
    origin = Origin()
    fetch = mf.cached_dataset("item:{name}")(origin)
    bound = functools.partial(fetch, "p")
    assert bound() == bound() == {"name": "p", "call": 1}
