"""A failed fetch fails only the callers that waited for it, unless ``error_ttl_s`` says more.

The leader's caller gets the exception and the followers waiting at that moment
a :class:`~memofill.FillError`, told through the wake signal. Nothing is stored
for later callers, in any process, unless the dataset declares ``error_ttl_s``:
then they get :class:`~memofill.FillError` until the error marker expires.

Also here: the longest durations the registry accepts really work on
redis-server, and the first ones beyond are refused.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import redis

from memofill import CacheFill, Dataset, FillError, Memofill, validate
from memofill.codec import error_marker
from memofill.keys import lock_key
from memofill.policy import MAX_ERROR_TTL_S, MAX_LEASE_MS, MAX_TTL_S
from tests.support.helpers import stored_marker
from tests.support.redis_servers import RedisServer

#: Long enough for any step on a busy machine; only a failing test waits this long.
PATIENCE_S = 20.0
#: Followers would wait 30 s before fetching themselves: one that raises FillError was told.
SLOW_FILL = CacheFill(lease_ms=60_000, wait_ms=30_000, poll_min_ms=10, poll_max_ms=250)


def dataset(error_ttl_s: float = 0) -> Dataset:
    """A coordinated dataset that remembers ``None`` (so only ``error_ttl_s`` differs)."""
    return Dataset(
        "flaky:{name}", ttl_s=60, negative_ttl_s=120, cache_fill=SLOW_FILL, error_ttl_s=error_ttl_s
    )


class Upstream:
    """A fetch that fails while ``failing`` is set, counting its calls."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0
        self.release = threading.Event()
        self.release.set()

    def __call__(self, name: str) -> dict[str, str]:
        self.calls += 1
        assert self.release.wait(PATIENCE_S)
        if self.failing:
            raise LookupError("upstream is down")
        return {"name": name}


def cached(client: redis.Redis, prefix: str, data: Dataset, fetch: Any) -> Any:
    mf = Memofill(client, prefix=prefix, policies={data.key: data})
    return mf.cached_dataset(data.key)(fetch)


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = PATIENCE_S
    event = threading.Event()
    while not condition():
        assert deadline > 0, "condition never held"
        event.wait(0.02)
        deadline -= 0.02


# -- unit: fakeredis -----------------------------------------------------------------------------


def test_by_default_the_next_call_after_a_failure_fetches_again(fake_client: redis.Redis) -> None:
    upstream = Upstream()
    fetch = cached(fake_client, "u:", dataset(), upstream)
    with pytest.raises(LookupError):
        fetch("x")
    assert fake_client.exists(fetch.redis_key("x")) == 0  # nothing stored
    assert fake_client.exists(lock_key(fetch.redis_key("x"))) == 0  # lock released
    with pytest.raises(LookupError):
        fetch("x")  # the upstream is asked again, not a remembered error
    upstream.failing = False
    assert fetch("x") == {"name": "x"}
    assert upstream.calls == 3


def test_with_error_ttl_later_callers_get_fill_error_without_fetching(
    fake_client: redis.Redis,
) -> None:
    upstream = Upstream()
    fetch = cached(fake_client, "u:", dataset(error_ttl_s=5), upstream)
    with pytest.raises(LookupError):
        fetch("x")
    key = fetch.redis_key("x")
    assert stored_marker(fake_client.get(key)) == error_marker("LookupError")
    assert 0 < fake_client.pttl(key) <= 5_000
    upstream.failing = False
    with pytest.raises(FillError, match="LookupError"):
        fetch("x")
    assert upstream.calls == 1
    fake_client.delete(key)  # what the expiry does
    assert fetch("x") == {"name": "x"}


# -- real redis-server, two processes ------------------------------------------------------------


def other_process(
    port: int, prefix: str, data: Dataset, requests: Any, replies: Any
) -> None:  # pragma: no cover - runs in the spawned process
    """Another process of the fleet: calls the same dataset on request, with a working upstream."""
    client = redis.Redis(host="127.0.0.1", port=port)

    def fetch(name: str) -> dict[str, Any]:
        client.incr(f"{prefix}other-fetches")
        return {"name": name, "pid": os.getpid()}

    call = cached(client, prefix, data, fetch)
    replies.put(("ready", None, None))
    while (name := requests.get()) is not None:
        try:
            result = call.call_with_outcome(name)
            replies.put(("value", result.value, result.outcome))
        except FillError as exc:
            replies.put(("FillError", str(exc), None))
        except Exception as exc:  # reported to the test, which names what it expected
            replies.put((type(exc).__name__, str(exc), None))


class Other:
    """A spawned process calling the dataset when asked (see :func:`other_process`)."""

    def __init__(self, port: int, prefix: str, data: Dataset) -> None:
        context = multiprocessing.get_context("spawn")
        self.requests: Any = context.Queue()
        self.replies: Any = context.Queue()
        self.process = context.Process(
            target=other_process, args=(port, prefix, data, self.requests, self.replies)
        )
        self.process.start()
        assert self.reply()[0] == "ready"

    def send(self, name: str) -> None:
        self.requests.put(name)

    def reply(self) -> tuple[str, Any, Any]:
        try:
            return self.replies.get(timeout=PATIENCE_S * 3)  # type: ignore[no-any-return]
        except queue.Empty:
            pytest.fail("the other process never answered")

    def call(self, name: str) -> tuple[str, Any, Any]:
        self.send(name)
        return self.reply()

    def close(self) -> None:
        self.requests.put(None)
        self.process.join(PATIENCE_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@pytest.fixture
def prefix() -> str:
    return f"e{uuid.uuid4().hex[:10]}:"


@pytest.fixture(params=[0, 5], ids=["no error_ttl_s", "error_ttl_s=5"])
def error_ttl_s(request: pytest.FixtureRequest) -> float:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def other(redis_server: RedisServer, prefix: str, error_ttl_s: float) -> Iterator[Other]:
    process = Other(redis_server.port, prefix, dataset(error_ttl_s))
    yield process
    process.close()


@pytest.mark.redis_server
def test_after_a_failure_another_process_fetches_again_or_gets_the_remembered_error(
    real_client: redis.Redis, prefix: str, other: Other, error_ttl_s: float
) -> None:
    upstream = Upstream()
    fetch = cached(real_client, prefix, dataset(error_ttl_s), upstream)
    key = fetch.redis_key("x")
    with pytest.raises(LookupError):
        fetch("x")
    assert real_client.exists(lock_key(key)) == 0
    if error_ttl_s:
        assert stored_marker(real_client.get(key)) == error_marker("LookupError")
        assert 0 < real_client.pttl(key) <= error_ttl_s * 1000
        kind, message, _ = other.call("x")
        assert (kind, "LookupError" in message) == ("FillError", True)
        assert real_client.get(f"{prefix}other-fetches") is None  # the upstream was not asked
        wait_until(lambda: real_client.exists(key) == 0)  # the marker expires
    else:
        assert real_client.exists(key) == 0  # nothing makes a later caller fail
    kind, value, outcome = other.call("x")
    assert (kind, value["name"], outcome) == ("value", "x", "leader_fill")
    assert value["pid"] != os.getpid()
    assert int(real_client.get(f"{prefix}other-fetches") or 0) == 1


@pytest.mark.redis_server
def test_a_follower_in_another_process_waiting_at_the_failure_gets_fill_error_at_once(
    real_client: redis.Redis, prefix: str, other: Other, error_ttl_s: float
) -> None:
    """Told by the wake signal; had it waited out ``wait_ms`` (30 s) it would have fetched."""
    upstream = Upstream()
    upstream.release.clear()
    fetch = cached(real_client, prefix, dataset(error_ttl_s), upstream)
    key = fetch.redis_key("x")
    raised: list[BaseException] = []

    def lead() -> None:
        try:
            fetch("x")
        except LookupError as exc:
            raised.append(exc)

    leader = threading.Thread(target=lead)
    leader.start()
    try:
        wait_until(lambda: real_client.exists(lock_key(key)) == 1)
        other.send("x")
        # The other process follows: it blocks on the wake stream.
        wait_until(
            lambda: any(
                c.get("cmd") == "xread" and "b" in c.get("flags", "")
                for c in real_client.client_list()
            )
        )
    finally:
        upstream.release.set()
        leader.join(PATIENCE_S)
    kind, message, _ = other.reply()
    assert len(raised) == 1
    assert (kind, "LookupError" in message) == ("FillError", True)
    assert real_client.get(f"{prefix}other-fetches") is None
    assert upstream.calls == 1


# -- the longest durations the registry accepts work on redis-server -----------------------------

LONGEST_FILL = CacheFill(
    lease_ms=MAX_LEASE_MS, wait_ms=MAX_LEASE_MS - 1, poll_min_ms=10, poll_max_ms=MAX_LEASE_MS - 2
)
LONGEST = Dataset(
    "longest:{name}",
    ttl_s=MAX_TTL_S,
    negative_ttl_s=MAX_TTL_S,
    cache_fill=LONGEST_FILL,
    error_ttl_s=MAX_ERROR_TTL_S,
)


def test_the_longest_durations_are_valid_and_the_next_ones_are_not() -> None:
    assert validate([LONGEST]) == []
    beyond: dict[str, Any] = {
        "ttl_s": math.nextafter(MAX_TTL_S, math.inf),
        "negative_ttl_s": math.nextafter(MAX_TTL_S, math.inf),
        "error_ttl_s": math.nextafter(MAX_ERROR_TTL_S, math.inf),
    }
    for field, value in beyond.items():
        problems = validate([attrs.evolve(LONGEST, **{field: value})])
        assert [(p.field, p.value) for p in problems] == [(field, value)]
    longer_fill = attrs.evolve(LONGEST_FILL, lease_ms=MAX_LEASE_MS + 1, wait_ms=MAX_LEASE_MS)
    problems = validate([attrs.evolve(LONGEST, cache_fill=longer_fill)])
    assert [(p.field, p.value) for p in problems] == [("cache_fill.lease_ms", MAX_LEASE_MS + 1)]


@pytest.mark.redis_server
def test_the_longest_durations_the_registry_accepts_work_on_redis_server(
    real_client: redis.Redis, prefix: str
) -> None:
    upstream = Upstream()
    upstream.release.clear()
    fetch = cached(real_client, prefix, LONGEST, upstream)
    key = fetch.redis_key("x")
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(fetch("x"))
        except LookupError as exc:
            results.append(exc)

    # A failed fill: the lock is taken for lease_ms, then the error stored for error_ttl_s.
    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: real_client.exists(lock_key(key)) == 1)
    assert MAX_LEASE_MS - 60_000 < real_client.pttl(lock_key(key)) <= MAX_LEASE_MS
    upstream.release.set()
    thread.join(PATIENCE_S)
    assert isinstance(results.pop(), LookupError)
    assert stored_marker(real_client.get(key)) == error_marker("LookupError")
    assert 0 < real_client.pttl(key) <= MAX_ERROR_TTL_S * 1000
    # A value: stored for ttl_s.
    real_client.delete(key)
    upstream.failing = False
    assert fetch("x") == {"name": "x"}
    assert MAX_TTL_S * 1000 - 60_000 < real_client.pttl(key) <= MAX_TTL_S * 1000
    # None: remembered for negative_ttl_s.
    none = cached(real_client, prefix, LONGEST, lambda name: None)
    assert none("y") is None
    assert MAX_TTL_S * 1000 - 60_000 < real_client.pttl(none.redis_key("y")) <= MAX_TTL_S * 1000
