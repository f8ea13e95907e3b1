"""The miss algorithm, step by step: ``fill()`` driven by a scripted driver and a fake clock.

Every branch of the coordinator is reached here without Redis: the driver
answers each :class:`Command` from a script (a value, an exception to throw
back, or the default below), performs :class:`Sleep` and blocking waits by
advancing the fake clock, and runs the fetch. The last tests run the real
drivers (``run_sync``, ``run_async``) on fakeredis.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MaxConnectionsError,
    NoPermissionError,
    OutOfMemoryError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from memofill.codec import NEGATIVE_MARKER, encode, error_marker, read_header
from memofill.commands import Commands
from memofill.coordinator import fill
from memofill.drivers import run_async, run_sync
from memofill.errors import FillError
from memofill.failures import RedisUnavailable
from memofill.fallback import Breaker
from memofill.keys import lock_key, wake_key
from memofill.outcomes import Outcome
from memofill.policy import CacheFill
from memofill.steps import CANCELLED, FETCH, LEASE_EXPIRED, Command, Plan, Result, Sleep
from memofill.testing import stored_payload
from tests.support.helpers import stored_marker

KEY = "t:item:a"
LOCK = lock_key(KEY)
WAKE = wake_key(KEY)
POLICY = CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200)
VALUE = {"answer": 42}
PAYLOAD = encode(VALUE)
#: A reply to XREAD that carries one entry: the leader signalled.
WOKEN = [[WAKE.encode(), [(b"1700000000000-0", {b"result": b"stored"})]]]
#: Redis's clock in the lock's reply, in seconds: the fill's stamp is this in µs.
STAMP_S = "1700000000"
STAMP = int(STAMP_S) * 1_000_000


def woken(result: bytes, entry_id: bytes = b"1700000000000-0") -> list[Any]:
    """An XREAD reply whose one entry says how the leader's fill ended."""
    return [[WAKE.encode(), [(entry_id, {b"result": result})]]]


class FakeClock:
    """A monotonic clock that moves only when a step says time passes."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class Boom(Exception):
    """What the fetch raises in these tests."""


def make_plan(**changes: Any) -> Plan:
    fields: dict[str, Any] = {
        "dataset": "item:{name}",
        "redis_key": KEY,
        "ttl_ms": 60_000,
        "negative_ttl_ms": 120_000,
        "cache_fill": POLICY,
    }
    fields.update(changes)
    return Plan(**fields)


class Driver:
    """Runs ``fill()`` against scripted replies; records every step it was asked to take.

    ``script`` maps a command name to a list of replies used in order; a reply
    that is an exception is thrown back into the generator, a callable is
    called with the step. When a list runs out the defaults apply: the lock is
    acquired, the data key is missing, writes and releases succeed, and a
    blocking wait times out after its full block time.

    ``acquire`` is a script (``SET NX``, the recheck ``GET``, the newest wake
    entry, ``TIME``), answered as Redis answers it: ``[acquired, stored, entries,
    seconds, µs]`` from the ``acquire``, ``get`` and ``newest`` scripts (a follower's ``get`` is its
    first poll, so only a leader's recheck takes a ``get`` reply; ``newest``
    defaults to an empty stream). A command error Redis would answer becomes
    that element; an unreachable Redis fails the whole step.
    """

    def __init__(
        self,
        script: dict[str, list[Any]] | None = None,
        fetch: Callable[[], Any] = lambda: VALUE,
        fetch_s: float = 0.0,
    ) -> None:
        self.clock = FakeClock()
        self.script = {name: list(replies) for name, replies in (script or {}).items()}
        self.fetch = fetch
        self.fetch_s = fetch_s
        self.steps: list[Any] = []

    def default(self, step: Command) -> Any:
        if step.name == "acquire":
            return True
        if step.name == "get":
            return None
        if step.name == "wait":
            self.clock.advance(step.args[2] / 1000)
            return []
        if step.name == "release":
            return 1
        if step.name == "newest":
            return []
        return True

    def answer(self, step: Any) -> Any:
        if step is FETCH:
            self.clock.advance(self.fetch_s)
            return self.fetch()
        if isinstance(step, Sleep):
            self.clock.advance(step.seconds)
            return None
        if step.name == "acquire":
            acquired = self.element(step, "acquire")
            recheck = Command("get", (step.args[3],))
            newest = self.element(Command("newest", (step.args[4],)), "newest")
            recheck_reply = self.element(recheck, "get") if acquired is True else None
            return [acquired, recheck_reply, newest, STAMP_S, "0"]
        return self.reply(step)

    def reply(self, step: Command) -> Any:
        replies = self.script.get(step.name)
        reply = replies.pop(0) if replies else self.default(step)
        if isinstance(reply, BaseException):
            raise reply
        return reply(step) if callable(reply) else reply

    def element(self, step: Command, name: str) -> Any:
        """One command's reply inside a pipeline: an answered error is returned, not raised."""
        try:
            return self.reply(Command(name, step.args))
        except (RedisConnectionError, RedisTimeoutError, RedisUnavailable):
            raise
        except Exception as exc:
            return exc

    def run(self, plan: Plan | None = None, seed: int = 0) -> Result:
        steps = fill(plan or make_plan(), self.clock, random.Random(seed))
        reply: Any = None
        failure: Exception | None = None
        while True:
            try:
                step = steps.send(reply) if failure is None else steps.throw(failure)
            except StopIteration as finished:
                result: Result = finished.value
                return result
            self.steps.append(step)
            reply, failure = None, None
            try:
                reply = self.answer(step)
            except Exception as exc:
                failure = exc

    def commands(self, name: str | None = None) -> list[Command]:
        return [s for s in self.steps if isinstance(s, Command) and name in (None, s.name)]

    def names(self) -> list[str]:
        return [
            "FETCH" if s is FETCH else "sleep" if isinstance(s, Sleep) else s.name
            for s in self.steps
        ]

    @property
    def fetches(self) -> int:
        return sum(1 for s in self.steps if s is FETCH)


def raise_boom() -> Any:
    raise Boom("secret payload detail")


# --- no coordination -------------------------------------------------------------------


def test_no_policy_fetches_and_writes_without_a_lock() -> None:
    driver = Driver()
    result = driver.run(make_plan(cache_fill=None))
    assert result.outcome is Outcome.LEGACY
    assert result.value == VALUE
    assert driver.names() == ["FETCH", "write"]
    key, written, ttl_ms, *_ = driver.commands("write")[0].args
    assert (key, stored_payload(written), ttl_ms) == (KEY, PAYLOAD, 60_000)


def test_redis_known_down_fetches_without_any_command() -> None:
    driver = Driver()
    result = driver.run(make_plan(redis_ok=False))
    assert result.outcome is Outcome.LOCK_ERROR
    assert result.value == VALUE
    assert result.error == "RedisUnavailable"
    assert driver.names() == ["FETCH"]


def test_redis_known_down_names_the_error_that_said_so() -> None:
    driver = Driver()
    result = driver.run(make_plan(redis_ok=False, redis_error="TimeoutError"))
    assert (result.outcome, result.error) == (Outcome.LOCK_ERROR, "TimeoutError")
    assert driver.names() == ["FETCH"]


def test_legacy_fetch_error_is_the_callers() -> None:
    driver = Driver(fetch=raise_boom)
    result = driver.run(make_plan(cache_fill=None))
    assert result.outcome is Outcome.FETCH_ERROR
    assert isinstance(result.exception, Boom)
    assert driver.names() == ["FETCH"]
    with pytest.raises(Boom):
        result.unwrap()


# --- leader ----------------------------------------------------------------------------


def test_acquire_error_degrades_to_a_local_fetch() -> None:
    driver = Driver({"acquire": [RedisConnectionError("refused")]})
    result = driver.run()
    assert result.outcome is Outcome.LOCK_ERROR
    assert result.value == VALUE
    assert result.led
    assert result.error == "ConnectionError"
    assert driver.names() == ["acquire", "FETCH", "write"]


def test_acquire_takes_the_derived_lock_with_a_fresh_token_and_the_lease() -> None:
    first, second = Driver(), Driver()
    first.run()
    second.run()
    (acquire,) = first.commands("acquire")
    lock, token, lease, recheck_key, wake = acquire.args
    assert (lock, lease, recheck_key, wake) == (LOCK, POLICY.lease_ms, KEY, WAKE)
    assert token != second.commands("acquire")[0].args[1]
    assert len(token) >= 32


def test_leader_fill_rechecks_fetches_writes_then_releases_with_its_token() -> None:
    driver = Driver()
    result = driver.run()
    assert result.outcome is Outcome.LEADER_FILL
    assert result.value == VALUE
    assert result.led
    assert result.payload_bytes == len(PAYLOAD)
    assert result.error is None
    assert driver.names() == ["acquire", "FETCH", "write", "release"]
    lock_arg, token, lease_ms, recheck_key, wake_arg = driver.commands("acquire")[0].args
    assert (lock_arg, lease_ms, recheck_key, wake_arg) == (LOCK, POLICY.lease_ms, KEY, WAKE)
    key, written, ttl_ms, *_ = driver.commands("write")[0].args
    assert (key, stored_payload(written), ttl_ms) == (KEY, PAYLOAD, 60_000)
    lock, wake, released_token, wake_ttl, told = driver.commands("release")[0].args
    assert told == "stored"
    assert (lock, wake, released_token) == (LOCK, WAKE, token)
    assert wake_ttl >= POLICY.poll_max_ms


@pytest.mark.parametrize(
    ("stored", "expected"),
    [(PAYLOAD, VALUE), (NEGATIVE_MARKER, None), (b"0", 0), (b'""', "")],
)
def test_recheck_hit_returns_the_value_another_leader_wrote(stored: bytes, expected: Any) -> None:
    driver = Driver({"get": [stored]})
    result = driver.run()
    assert result.outcome is Outcome.LEADER_RECHECK_HIT
    assert result.value == expected
    assert result.led
    assert driver.fetches == 0
    assert driver.names() == ["acquire", "release"]


@pytest.mark.parametrize("stored", [b"\xffnot json", error_marker("Boom")])
def test_recheck_that_finds_corrupt_bytes_or_an_error_marker_fetches(stored: bytes) -> None:
    driver = Driver({"get": [stored]})
    result = driver.run()
    assert result.outcome is Outcome.LEADER_FILL
    assert result.value == VALUE
    assert driver.names() == ["acquire", "FETCH", "write", "release"]


def test_recheck_error_still_fetches_under_the_lock_and_reports_it() -> None:
    driver = Driver({"get": [ResponseError("LOADING")]})
    result = driver.run()
    assert result.outcome is Outcome.LEADER_FILL
    assert result.value == VALUE
    assert result.error == "ResponseError"
    assert driver.names() == ["acquire", "FETCH", "write", "release"]


@pytest.mark.parametrize("negative_ttl_ms", [0, 120_000])
def test_fetch_error_stores_nothing_by_default_and_releases(negative_ttl_ms: int) -> None:
    """A failure is told to the followers waiting now, and stored for no later caller."""
    driver = Driver(fetch=raise_boom)
    result = driver.run(make_plan(negative_ttl_ms=negative_ttl_ms))
    assert result.outcome is Outcome.FETCH_ERROR
    assert isinstance(result.exception, Boom)
    assert result.error == "Boom"
    assert result.led
    assert driver.names() == ["acquire", "FETCH", "release"]
    assert driver.commands("release")[0].args[4] == "error:Boom"


@pytest.mark.parametrize("error_ttl_ms", [1, 5_000, 30_000])
def test_fetch_error_with_error_ttl_writes_an_error_marker_for_that_long(
    error_ttl_ms: int,
) -> None:
    driver = Driver(fetch=raise_boom)
    result = driver.run(make_plan(error_ttl_ms=error_ttl_ms, negative_ttl_ms=0))
    assert isinstance(result.exception, Boom)
    assert driver.names() == ["acquire", "FETCH", "write", "release"]
    key, payload, ttl_ms, stamp = driver.commands("write")[0].args[:4]
    assert (key, stored_marker(payload), ttl_ms) == (KEY, error_marker("Boom"), error_ttl_ms)
    assert read_header(payload).stamp == stamp  # type: ignore[union-attr]  # as a value's
    assert b"secret" not in payload


def test_fetch_error_is_returned_even_when_redis_fails_after_it() -> None:
    driver = Driver(
        {"write": [RedisConnectionError("gone")], "release": [RedisConnectionError("gone")]},
        fetch=raise_boom,
    )
    result = driver.run()
    assert result.outcome is Outcome.FETCH_ERROR
    assert isinstance(result.exception, Boom)


def test_none_is_cached_as_a_negative_marker() -> None:
    driver = Driver(fetch=lambda: None)
    result = driver.run()
    assert result.outcome is Outcome.NEGATIVE
    assert result.value is None
    assert result.exception is None
    assert driver.names() == ["acquire", "FETCH", "write", "release"]
    key, payload, ttl_ms, stamp = driver.commands("write")[0].args[:4]
    assert (key, stored_marker(payload), ttl_ms) == (KEY, NEGATIVE_MARKER, 120_000)
    assert read_header(payload).stamp == stamp  # type: ignore[union-attr]  # as a value's


def test_none_without_negative_caching_writes_nothing() -> None:
    driver = Driver(fetch=lambda: None)
    result = driver.run(make_plan(negative_ttl_ms=0))
    assert result.outcome is Outcome.NEGATIVE
    assert driver.names() == ["acquire", "FETCH", "release"]


def test_unencodable_value_is_returned_not_cached_and_reported() -> None:
    value = {"when": object()}
    driver = Driver(fetch=lambda: value)
    result = driver.run()
    assert result.outcome is Outcome.LEADER_FILL
    assert result.value is value
    assert result.error == "TypeError"  # orjson.JSONEncodeError is TypeError
    assert result.payload_bytes == 0
    assert driver.names() == ["acquire", "FETCH", "release"]


def test_write_error_keeps_the_value_and_still_releases() -> None:
    driver = Driver({"write": [RedisTimeoutError("slow")]})
    result = driver.run()
    assert result.outcome is Outcome.LEADER_FILL
    assert result.value == VALUE
    assert result.error == "TimeoutError"
    assert driver.names() == ["acquire", "FETCH", "write", "release"]


def test_release_error_keeps_the_value_and_is_reported() -> None:
    driver = Driver({"release": [NoPermissionError("evalsha")]})
    result = driver.run()
    assert result.outcome is Outcome.LEADER_FILL
    assert result.value == VALUE
    assert result.error == "NoPermissionError"


def test_a_lock_that_was_no_longer_ours_is_reported_as_a_lost_lease() -> None:
    driver = Driver({"release": [0]})
    result = driver.run()
    assert result.outcome is Outcome.LEADER_FILL
    assert result.value == VALUE
    assert result.error == LEASE_EXPIRED


def test_release_error_after_a_recheck_hit_is_reported() -> None:
    driver = Driver({"get": [PAYLOAD], "release": [NoPermissionError("evalsha")]})
    result = driver.run()
    assert result.outcome is Outcome.LEADER_RECHECK_HIT
    assert result.value == VALUE
    assert result.error == "NoPermissionError"


def test_an_answered_error_on_the_lock_is_a_lock_error_even_inside_the_pipeline() -> None:
    driver = Driver({"acquire": [NoPermissionError("set")]})
    result = driver.run()
    assert result.outcome is Outcome.LOCK_ERROR
    assert result.error == "NoPermissionError"
    assert driver.names() == ["acquire", "FETCH", "write"]


# --- follower --------------------------------------------------------------------------


def follower(script: dict[str, list[Any]] | None = None, **kwargs: Any) -> Driver:
    """A driver whose SET NX fails: another process holds the lock."""
    return Driver({"acquire": [None], **(script or {})}, **kwargs)


@pytest.mark.parametrize(("stored", "expected"), [(PAYLOAD, VALUE), (NEGATIVE_MARKER, None)])
def test_a_follower_whose_lock_attempt_finds_the_value_returns_at_once(
    stored: bytes, expected: Any
) -> None:
    driver = follower(fetch=raise_boom)
    driver.answer = landed(driver, stored)  # type: ignore[method-assign]
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.value == expected
    assert (result.polls, result.waited_ms) == (0, 0.0)
    assert driver.names() == ["acquire"]


def landed(driver: Driver, stored: bytes) -> Callable[[Any], Any]:
    """The driver's answers, with ``stored`` under the data key as the lock is attempted."""
    answer = driver.answer

    def with_stored(step: Any) -> Any:
        reply = answer(step)
        if getattr(step, "name", None) == "acquire":
            return [reply[0], stored, *reply[2:]]
        return reply

    return with_stored


def test_a_follower_whose_lock_attempt_finds_an_error_marker_raises_at_once() -> None:
    driver = follower()
    driver.answer = landed(driver, error_marker("Boom"))  # type: ignore[method-assign]
    result = driver.run()
    assert result.outcome is Outcome.FETCH_ERROR
    assert isinstance(result.exception, FillError)
    assert driver.names() == ["acquire"]


def test_follower_woken_by_the_leader_reads_the_data_key() -> None:
    driver = follower({"wait": [WOKEN], "get": [PAYLOAD]})
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.value == VALUE
    assert not result.led
    assert result.polls == 1
    assert result.payload_bytes == len(PAYLOAD)
    assert driver.fetches == 0
    assert driver.names() == ["acquire", "wait", "get"]
    wake, last_id, block_ms = driver.commands("wait")[0].args
    assert (wake, last_id) == (WAKE, "0-0")
    assert 1 <= block_ms <= POLICY.poll_min_ms


def test_follower_blocks_after_the_last_entry_it_saw() -> None:
    driver = follower({"wait": [WOKEN], "get": [None, PAYLOAD]})
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.polls == 2
    assert [c.args[1] for c in driver.commands("wait")] == ["0-0", "1700000000000-0"]


def test_follower_reads_the_wake_stream_only_after_the_entry_its_lock_attempt_saw() -> None:
    earlier = [(b"1699999999999-0", {b"result": b"none"})]  # an earlier fill's signal
    driver = follower({"newest": [earlier], "wait": [WOKEN], "get": [PAYLOAD]})
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.value == VALUE  # not the earlier fill's None
    assert driver.commands("wait")[0].args[1] == "1699999999999-0"


def test_a_follower_told_the_fetch_returned_none_returns_none_without_a_read() -> None:
    driver = follower({"wait": [woken(b"none")]}, fetch=raise_boom)
    result = driver.run(make_plan(negative_ttl_ms=0))
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.value is None
    assert result.exception is None
    assert driver.names() == ["acquire", "wait"]
    assert driver.fetches == 0


def test_a_follower_told_the_fetch_raised_raises_at_once_without_a_marker() -> None:
    driver = follower({"wait": [woken(b"error:Boom")]})
    result = driver.run(make_plan(negative_ttl_ms=0))
    assert result.outcome is Outcome.FETCH_ERROR
    assert isinstance(result.exception, FillError)
    assert result.error == "Boom"
    assert driver.names() == ["acquire", "wait"]
    assert driver.fetches == 0
    assert driver.clock.now - 1000.0 < POLICY.wait_ms / 1000  # well before wait_ms


@pytest.mark.parametrize(
    ("fetch", "told"),
    [
        (lambda: VALUE, "stored"),
        (lambda: None, "none"),
        (raise_boom, "error:Boom"),
        (lambda: {"tags": {1, 2}}, "unstored:TypeError"),
    ],
)
def test_the_leader_tells_the_followers_how_its_fill_ended(
    fetch: Callable[[], Any], told: str
) -> None:
    driver = Driver(fetch=fetch)
    driver.run(make_plan(negative_ttl_ms=0))
    assert driver.commands("release")[0].args[4] == told


def test_a_value_whose_write_failed_is_told_as_unstored() -> None:
    driver = Driver({"write": [OutOfMemoryError("OOM")]})
    result = driver.run()
    assert result.error == "OutOfMemoryError"
    assert driver.commands("release")[0].args[4] == "unstored:OutOfMemoryError"


def test_a_follower_told_the_value_was_not_stored_fetches_at_once() -> None:
    driver = follower({"wait": [woken(b"unstored:TypeError")]})
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_TIMEOUT
    assert result.value == VALUE
    assert result.error == "TypeError"
    assert driver.names() == ["acquire", "wait", "FETCH", "write"]
    assert driver.clock.now - 1000.0 < POLICY.wait_ms / 1000


def test_follower_never_reads_the_lock_key() -> None:
    driver = follower({"get": [None] * 5 + [PAYLOAD]})
    driver.run()
    for command in driver.commands():
        if command.name != "acquire":
            assert LOCK not in command.args
    assert {c.args for c in driver.commands("get")} == {(KEY,)}


def test_follower_sees_a_negative_marker_as_none() -> None:
    driver = follower({"get": [NEGATIVE_MARKER]})
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.value is None
    assert result.exception is None
    assert driver.fetches == 0


def test_follower_sees_an_error_marker_and_raises_fill_error_without_fetching() -> None:
    driver = follower({"get": [None, error_marker("Boom")]})
    result = driver.run()
    assert result.outcome is Outcome.FETCH_ERROR
    assert isinstance(result.exception, FillError)
    assert result.exception.error == "Boom"
    assert result.exception.redis_key == KEY
    assert result.exception.dataset == "item:{name}"
    assert result.error == "Boom"
    assert result.polls == 2
    assert not result.led
    assert driver.fetches == 0
    with pytest.raises(FillError, match="Boom"):
        result.unwrap()


def test_follower_treats_corrupt_bytes_as_not_there_yet() -> None:
    driver = follower({"get": [b"\xff\xfe", PAYLOAD]})
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.value == VALUE
    assert result.polls == 2


def test_follower_get_error_degrades_to_a_local_fetch() -> None:
    driver = follower({"get": [None, RedisConnectionError("reset")]})
    result = driver.run()
    assert result.outcome is Outcome.LOCK_ERROR
    assert result.value == VALUE
    assert result.error == "ConnectionError"
    assert result.polls == 1
    assert result.led
    assert driver.names()[-2:] == ["FETCH", "write"]


def test_wake_stream_error_falls_back_to_polling_on_a_timer() -> None:
    driver = follower(
        {"wait": [ResponseError("unknown command XREAD")], "get": [None, None, PAYLOAD]}
    )
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.polls == 3
    # One failed XREAD, then the wake stream is left alone: sleep, GET, sleep, GET...
    assert driver.names() == ["acquire", "wait", "sleep", "get", "sleep", "get", "sleep", "get"]


def test_a_timed_out_wait_means_not_yet_and_the_follower_keeps_following() -> None:
    # A blocking XREAD that outlives the socket time-out (Redis ends blocks on its 100 ms
    # timer; a busy process reads the reply late) says nothing about Redis's health.
    driver = follower({"wait": [RedisTimeoutError("read"), RedisTimeoutError("read")]})
    driver.script["get"] = [None, None, PAYLOAD]
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.value == VALUE
    assert driver.fetches == 0
    # No timer sleep after a timed-out wait (it took its time), and the stream is used again.
    assert driver.names() == ["acquire", "wait", "get", "wait", "get", "wait", "get"]


def test_a_wait_timeout_then_a_failed_read_degrades_with_the_read_error() -> None:
    driver = follower({"wait": [RedisTimeoutError("read")], "get": [RedisUnavailable("breaker")]})
    result = driver.run()
    assert (result.outcome, result.error) == (Outcome.LOCK_ERROR, "RedisUnavailable")
    assert result.value == VALUE


@pytest.mark.parametrize(
    "full",
    [MaxConnectionsError("Too many connections"), RedisConnectionError("Too many connections")],
)
@pytest.mark.parametrize("name", ["acquire", "get", "wait", "write", "release"])
def test_a_full_pool_waits_for_a_connection_and_never_fetches_uncoordinated(
    full: Exception, name: str
) -> None:
    script: dict[str, list[Any]] = {name: [full] * 5}
    if name in ("get", "wait"):
        driver = follower({**script, "get": [*script.get("get", []), None, PAYLOAD]})
        expected = Outcome.FOLLOWER_HIT
    else:
        driver = Driver(script)
        expected = Outcome.LEADER_FILL
    result = driver.run()
    assert (result.outcome, result.error) == (expected, None)
    assert driver.fetches == (1 if expected is Outcome.LEADER_FILL else 0)
    sleeps = [s.seconds * 1000 for s in driver.steps if isinstance(s, Sleep)]
    assert sleeps[:5] == [1, 2, 4, 8, 16]


def test_a_blocking_pool_that_waited_its_own_timeout_is_not_asked_again() -> None:
    driver = Driver({"acquire": [RedisConnectionError("No connection available.")]})
    result = driver.run()
    assert (result.outcome, result.error) == (Outcome.LOCK_ERROR, "ConnectionError")
    assert not [s for s in driver.steps if isinstance(s, Sleep)]


def test_a_pool_full_for_longer_than_wait_ms_is_a_lock_error() -> None:
    driver = Driver({"acquire": [MaxConnectionsError("Too many connections")] * 10_000})
    result = driver.run()
    assert (result.outcome, result.error) == (Outcome.LOCK_ERROR, "MaxConnectionsError")
    slept = sum(s.seconds for s in driver.steps if isinstance(s, Sleep))
    assert POLICY.wait_ms / 1000 <= slept <= POLICY.wait_ms / 1000 + 0.1


def test_follower_timeout_fetches_uncoordinated_and_writes() -> None:
    driver = follower()
    result = driver.run()
    assert result.outcome is Outcome.FOLLOWER_TIMEOUT
    assert result.value == VALUE
    assert result.led
    assert result.error is None
    assert result.waited_ms == pytest.approx(POLICY.wait_ms, abs=1)
    assert result.polls == len(driver.commands("get"))
    assert driver.names()[-2:] == ["FETCH", "write"]
    assert "release" not in driver.names()


def test_follower_timeout_with_a_failing_fetch_returns_the_error() -> None:
    driver = follower(fetch=raise_boom)
    result = driver.run()
    assert result.outcome is Outcome.FETCH_ERROR
    assert isinstance(result.exception, Boom)
    assert "write" not in driver.names()


def block_times(driver: Driver) -> list[float]:
    return [c.args[2] for c in driver.commands("wait")]


@pytest.mark.parametrize("seed", range(20))
def test_backoff_is_jittered_grows_to_poll_max_and_never_outwaits_wait_ms(seed: int) -> None:
    driver = follower()
    started = driver.clock()
    driver.run(seed=seed)
    blocks = block_times(driver)
    assert all(POLICY.poll_min_ms <= b <= POLICY.poll_max_ms for b in blocks[:-1])
    assert blocks[0] == POLICY.poll_min_ms
    assert max(blocks) > POLICY.poll_max_ms / 2  # it did grow
    # The interval doubles up to poll_max; the last wait is cut to what is left of wait_ms.
    assert all(
        b <= min(POLICY.poll_min_ms * 2**i, POLICY.poll_max_ms) for i, b in enumerate(blocks)
    )
    waited_ms = (driver.clock() - started) * 1000
    assert waited_ms == pytest.approx(POLICY.wait_ms, abs=1)
    assert sum(blocks) == pytest.approx(POLICY.wait_ms, abs=len(blocks))


def test_backoff_differs_between_followers() -> None:
    runs = []
    for seed in range(5):
        driver = follower()
        driver.run(seed=seed)
        runs.append(tuple(block_times(driver)))
    assert len(set(runs)) > 1


def test_timer_polling_uses_the_same_backoff() -> None:
    driver = follower({"wait": [ResponseError("NOPERM")]})
    driver.run(seed=3)
    sleeps = [s.seconds * 1000 for s in driver.steps if isinstance(s, Sleep)]
    assert sleeps[0] == pytest.approx(POLICY.poll_min_ms)
    assert all(s <= POLICY.poll_max_ms + 1e-9 for s in sleeps)
    assert sum(sleeps) == pytest.approx(POLICY.wait_ms, abs=1)


@pytest.mark.parametrize(
    ("socket_timeout_ms", "cap_ms"), [(300.0, 150), (1000.0, 500), (200.0, 50)]
)
def test_block_ends_well_before_the_socket_timeout(socket_timeout_ms: float, cap_ms: int) -> None:
    # Redis ends a BLOCK on its own timer (every 100 ms at hz 10): BLOCK 240 returns after
    # about 300 ms, so 80% of a 0.3 s time-out is not enough; a block stays 150 ms under it.
    driver = follower(script={}, fetch=lambda: VALUE)
    policy = CacheFill(lease_ms=5_000, wait_ms=2_000, poll_min_ms=10, poll_max_ms=1_000)
    result = driver.run(make_plan(block_limit_ms=socket_timeout_ms, cache_fill=policy))
    assert result.outcome is Outcome.FOLLOWER_TIMEOUT
    assert max(block_times(driver)) == cap_ms


def test_block_is_never_zero_which_would_block_forever() -> None:
    driver = follower()
    driver.run(make_plan(block_limit_ms=0.5))
    assert min(block_times(driver)) >= 1


# --- the real drivers ------------------------------------------------------------------


class Recorder:
    """A ``Commands`` stand-in: records names, answers from a function."""

    def __init__(self, answer: Callable[[str, tuple[Any, ...]], Any]) -> None:
        self.sent: list[str] = []
        self._answer = answer

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def send(*args: Any) -> Any:
            self.sent.append(name)
            return self._answer(name, args)

        return send


def refuse(name: str, args: tuple[Any, ...]) -> Any:
    raise RedisConnectionError("refused")


def test_run_sync_trips_the_breaker_on_a_connection_error_and_skips_redis_after() -> None:
    breaker = Breaker()
    commands: Any = Recorder(refuse)
    result = run_sync(
        fill(make_plan(), FakeClock(), random.Random(0)), commands, lambda: VALUE, breaker
    )
    assert result.outcome is Outcome.LOCK_ERROR
    assert result.value == VALUE
    assert result.error == "ConnectionError"  # the cause, not the breaker that followed it
    assert breaker.is_open
    # The write after the fetch is not sent: the breaker answers for Redis.
    assert commands.sent == ["acquire"]


def test_run_sync_keeps_the_breaker_closed_on_an_error_redis_answered() -> None:
    def deny(name: str, args: tuple[Any, ...]) -> Any:
        if name == "acquire":
            raise NoPermissionError("no")
        return True

    breaker = Breaker()
    commands: Any = Recorder(deny)
    result = run_sync(
        fill(make_plan(), FakeClock(), random.Random(0)), commands, lambda: VALUE, breaker
    )
    assert result.outcome is Outcome.LOCK_ERROR
    assert result.error == "NoPermissionError"
    assert not breaker.is_open
    assert commands.sent == ["acquire", "write"]


def test_run_sync_without_commands_never_raises_redis_errors_to_the_caller() -> None:
    result = run_sync(
        fill(make_plan(), FakeClock(), random.Random(0)), None, lambda: VALUE, Breaker()
    )
    assert result.outcome is Outcome.LOCK_ERROR
    assert result.value == VALUE


def test_run_sync_on_fakeredis_fills_and_releases(fake_client: fakeredis.FakeRedis) -> None:
    commands = Commands(fake_client)
    result = run_sync(
        fill(make_plan(), FakeClock(), random.Random(0)), commands, lambda: VALUE, Breaker()
    )
    assert result.outcome is Outcome.LEADER_FILL
    assert stored_payload(fake_client.get(KEY)) == PAYLOAD
    assert 59_000 < fake_client.pttl(KEY) <= 60_000
    assert fake_client.exists(LOCK) == 0
    assert fake_client.xlen(WAKE) == 1


def test_run_sync_release_spares_a_lock_another_caller_now_holds(
    fake_client: fakeredis.FakeRedis,
) -> None:
    def fetch() -> Any:
        fake_client.set(LOCK, "someone-else", px=5_000)
        return VALUE

    commands = Commands(fake_client)
    result = run_sync(fill(make_plan(), FakeClock(), random.Random(0)), commands, fetch, Breaker())
    assert result.outcome is Outcome.LEADER_FILL
    assert fake_client.get(LOCK) == b"someone-else"


def test_run_sync_follower_on_fakeredis_reads_the_value_the_holder_left(
    fake_client: fakeredis.FakeRedis,
) -> None:
    fake_client.set(LOCK, "holder", px=5_000)
    fake_client.set(KEY, PAYLOAD)
    fetches: list[int] = []
    commands = Commands(fake_client)
    result = run_sync(
        fill(make_plan(), FakeClock(), random.Random(0)),
        commands,
        lambda: fetches.append(1),
        Breaker(),
    )
    assert result.outcome is Outcome.FOLLOWER_HIT
    assert result.value == VALUE
    assert fetches == []


async def test_run_async_on_fakeredis_fills_and_follows() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    try:
        commands = Commands(client)

        async def fetch() -> Any:
            return VALUE

        led = await run_async(
            fill(make_plan(), FakeClock(), random.Random(0)), commands, fetch, Breaker()
        )
        assert led.outcome is Outcome.LEADER_FILL
        assert stored_payload(await client.get(KEY)) == PAYLOAD
        await client.set(LOCK, "holder", px=5_000)
        followed = await run_async(
            fill(make_plan(), FakeClock(), random.Random(0)), commands, fetch, Breaker()
        )
        assert followed.outcome is Outcome.FOLLOWER_HIT
        assert followed.value == VALUE
    finally:
        await client.aclose()


async def test_run_async_degrades_when_the_breaker_is_open() -> None:
    breaker = Breaker()
    breaker.trip()
    commands: Any = Recorder(refuse)

    async def fetch() -> Any:
        return VALUE

    result = await run_async(
        fill(make_plan(), FakeClock(), random.Random(0)), commands, fetch, breaker
    )
    assert result.outcome is Outcome.LOCK_ERROR
    assert result.error == "RedisUnavailable"
    assert commands.sent == []


def test_redis_unavailable_is_a_connection_error() -> None:
    assert issubclass(RedisUnavailable, RedisConnectionError)


# --- cancellation ----------------------------------------------------------------------


def test_a_follower_told_the_leader_was_cancelled_retries_the_lock_at_once() -> None:
    # The first lock attempt fails (another leader); its wake entry says it was cancelled.
    driver = follower({"wait": [woken(CANCELLED.encode())], "get": [None]})
    result = driver.run()
    assert result.outcome is Outcome.LEADER_FILL
    assert result.value == VALUE
    assert driver.names() == ["acquire", "wait", "acquire", "FETCH", "write", "release"]
    assert driver.clock.now == 1000.0  # no time passed: it did not wait out wait_ms


def test_a_follower_told_cancelled_follows_again_when_another_took_the_lock() -> None:
    script = {"acquire": [None, None], "wait": [woken(CANCELLED.encode())], "get": [PAYLOAD]}
    driver = follower(script, fetch=raise_boom)
    result = driver.run()
    assert driver.fetches == 0
    assert driver.names() == ["acquire", "wait", "acquire", "wait", "get"]
    assert (result.outcome, result.value) == (Outcome.FOLLOWER_HIT, VALUE)


def test_a_leader_cancelled_mid_fetch_releases_with_cancelled_and_re_raises() -> None:
    steps = fill(make_plan(), FakeClock(), random.Random(0))
    assert steps.send(None).name == "acquire"  # type: ignore[union-attr]
    assert steps.send([True, None, [], STAMP_S, "0"]) is FETCH
    release = steps.throw(asyncio.CancelledError())
    assert isinstance(release, Command)
    assert release.name == "release"
    assert release.args[0] == LOCK
    assert release.args[-1] == CANCELLED
    with pytest.raises(asyncio.CancelledError):
        steps.send(1)


def test_a_leader_cancelled_mid_write_releases_with_cancelled_and_re_raises() -> None:
    steps = fill(make_plan(), FakeClock(), random.Random(0))
    steps.send(None)
    steps.send([True, None, [], STAMP_S, "0"])
    write = steps.send(VALUE)
    assert isinstance(write, Command)
    assert write.name == "write"
    release = steps.throw(asyncio.CancelledError())
    assert isinstance(release, Command)
    assert release.args[-1] == CANCELLED
    with pytest.raises(asyncio.CancelledError):
        steps.send(1)


def test_a_follower_cancelled_mid_wait_stops_without_a_step() -> None:
    steps = fill(make_plan(), FakeClock(), random.Random(0))
    steps.send(None)
    wait = steps.send([False, None, [], STAMP_S, "0"])
    assert isinstance(wait, Command)
    assert wait.name == "wait"
    with pytest.raises(asyncio.CancelledError):
        steps.throw(asyncio.CancelledError())
