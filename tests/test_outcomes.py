"""One log record per miss, with its fields as attributes; hits counted, never logged.

Records are read with ``caplog`` on the ``memofill`` logger. Values in these
tests carry a secret string: no record may contain it, whatever the outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from memofill import FillError, Memofill, Outcome
from memofill.keys import lock_key
from memofill.outcomes import WARNING_OUTCOMES, Counters, MissRecord
from memofill.repeats import REPEATS
from tests.conftest import POLICIES
from tests.support.helpers import failure

PATIENCE_S = 10.0

SECRET = "s3cr3t-payload-do-not-log"
FIELDS = (
    "outcome",
    "dataset",
    "redis_key",
    "elapsed_ms",
    "waited_ms",
    "polls",
    "payload_bytes",
    "error",
)


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
    return Memofill(raw, prefix="o:", policies=POLICIES)


class Records:
    """The records the ``memofill`` logger emitted so far in the test, INFO and up."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="memofill")
        self._caplog = caplog

    def all(self) -> list[logging.LogRecord]:
        # Read at every use: pytest gives each test phase a fresh list.
        return self._caplog.records

    def misses(self) -> list[logging.LogRecord]:
        return [r for r in self.all() if r.name == "memofill" and hasattr(r, "outcome")]

    def only_miss(self) -> logging.LogRecord:
        (record,) = self.misses()
        return record

    def assert_no_secret(self) -> None:
        for record in self.all():
            assert SECRET not in record.getMessage()
            assert SECRET not in repr(vars(record))


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Records:
    return Records(caplog)


class Boom(Exception):
    """Carries the secret in its message, which must not reach the log."""


# --- one record per miss ---------------------------------------------------------------


def test_a_leader_fill_logs_one_record_with_every_field(mf: Memofill, records: Records) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: {"secret": SECRET})
    fetch("a")
    record = records.only_miss()
    assert record.levelno == logging.INFO
    for field in FIELDS:
        assert hasattr(record, field), field
    assert record.outcome == "leader_fill"
    assert record.dataset == "item:{name}"
    assert record.redis_key == "o:item:a"
    assert record.elapsed_ms >= 0
    assert (record.waited_ms, record.polls, record.error) == (0.0, 0, None)
    assert record.payload_bytes == len(f'{{"secret":"{SECRET}"}}')
    assert "leader_fill" in record.getMessage()
    records.assert_no_secret()


def test_hits_are_counted_not_logged(mf: Memofill, records: Records) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: SECRET)
    fetch("a")
    for _ in range(5):
        fetch("a")
    assert len(records.misses()) == 1
    assert len(records.all()) == 1
    assert mf.counters.snapshot() == {"item:{name}": {"hit": 5, "leader_fill": 1}}


def test_negative_and_legacy_outcomes(mf: Memofill, records: Records) -> None:
    mf.cached_dataset("item:{name}")(lambda name: None)("a")
    mf.cached_dataset("plain:{name}")(lambda name: SECRET)("a")
    assert [(r.outcome, r.dataset, r.levelno) for r in records.misses()] == [
        ("negative", "item:{name}", logging.INFO),
        ("legacy", "plain:{name}", logging.INFO),
    ]
    records.assert_no_secret()


def test_a_fetch_error_is_logged_as_its_type_only(mf: Memofill, records: Records) -> None:
    def fetch(name: str) -> Any:
        raise Boom(SECRET)

    cached = mf.cached_dataset("careful:{name}")(fetch)  # error_ttl_s: the error is stored
    with pytest.raises(Boom):
        cached("a")
    record = records.only_miss()
    assert (record.outcome, record.error, record.levelno) == (
        "fetch_error",
        "Boom",
        logging.WARNING,
    )
    assert record.exc_info is None
    records.assert_no_secret()
    # The error marker names the type only, too; a later caller gets a FillError, not logged.
    with pytest.raises(FillError) as info:
        cached("a")
    assert SECRET not in str(info.value)
    assert len(records.misses()) == 1


def test_an_unencodable_value_is_logged_with_its_error(mf: Memofill, records: Records) -> None:
    mf.cached_dataset("item:{name}")(lambda name: {SECRET: {1, 2}})("a")
    record = records.only_miss()
    assert (record.outcome, record.error, record.payload_bytes) == ("leader_fill", "TypeError", 0)
    records.assert_no_secret()


def test_a_follower_logs_its_wait_and_polls(
    mf: Memofill, raw: fakeredis.FakeRedis, records: Records
) -> None:
    key = "o:fast:a"
    raw.set(lock_key(key), "another-process", px=5_000)
    threading.Timer(0.15, lambda: raw.set(key, b'"' + SECRET.encode() + b'"')).start()
    assert mf.cached_dataset("fast:{name}")(lambda name: "never")("a") == SECRET
    record = records.only_miss()
    assert record.outcome == "follower_hit"
    assert record.polls >= 1
    assert 100 < record.waited_ms < 5_000
    assert record.elapsed_ms >= record.waited_ms
    assert record.payload_bytes == len(SECRET) + 2
    records.assert_no_secret()


def test_a_follower_timeout_is_a_warning(
    mf: Memofill, raw: fakeredis.FakeRedis, records: Records
) -> None:
    raw.set(lock_key("o:fast:a"), "a-dead-leader", px=5_000)
    mf.cached_dataset("fast:{name}")(lambda name: SECRET)("a")
    record = records.only_miss()
    assert (record.outcome, record.levelno) == ("follower_timeout", logging.WARNING)
    assert 450 < record.waited_ms < 5_000  # wait_ms is 500
    assert record.polls >= 3


def test_a_redis_failure_is_a_lock_error_naming_the_redis_error(
    server: fakeredis.FakeServer, mf: Memofill, records: Records
) -> None:
    server.connected = False
    assert mf.cached_dataset("item:{name}")(lambda name: SECRET)("a") == SECRET
    record = records.only_miss()
    assert (record.outcome, record.levelno, failure(record.error)) == (
        "lock_error",
        logging.WARNING,
        "ConnectionError",
    )


def test_a_fill_and_the_callers_it_served_log_one_record(mf: Memofill, records: Records) -> None:
    """Joiners are counted and sent to hooks; the log gets one record that says how many."""
    gate = threading.Event()
    hooked: list[Any] = []
    mf.events.subscribe(hooked.append)

    def fetch(name: str) -> str:
        assert gate.wait(PATIENCE_S)
        return SECRET

    cached = mf.cached_dataset("item:{name}")(fetch)
    threads = [threading.Thread(target=cached, args=("a",)) for _ in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + PATIENCE_S
    while sum(flight.joiners for flight in list(mf.thread_flights._flights.values())) < 5:
        assert time.monotonic() < deadline, "the callers did not join the fill"
        time.sleep(0.001)
    gate.set()
    for thread in threads:
        thread.join(PATIENCE_S)
    (record,) = records.misses()
    assert (record.outcome, record.joined) == ("leader_fill", 5)
    assert "joined=5" in record.getMessage()
    assert mf.counters.snapshot()["item:{name}"] == {"leader_fill": 1, "local_join": 5}
    assert sorted(r.outcome.value for r in hooked) == ["leader_fill"] + ["local_join"] * 5
    assert all(r.polls == 0 and r.joined == 0 for r in hooked if r.outcome == "local_join")


# --- records and counters on their own -------------------------------------------------


def test_warning_outcomes_are_the_ones_that_went_wrong() -> None:
    assert {o.value for o in WARNING_OUTCOMES} == {
        "follower_timeout",
        "lock_error",
        "fetch_error",
        "stale_on_error",
        "refresh_error",
        "refresh_lock_error",
    }
    assert {"fill_refused", "refresh_refused"} <= {o.value for o in Outcome}
    assert {o.value for o in Outcome} - {"fill_refused", "refresh_refused"} == {
        "leader_fill",
        "forced_fill",
        "leader_recheck_hit",
        "follower_hit",
        "follower_timeout",
        "lock_error",
        "legacy",
        "local_join",
        "fetch_error",
        "negative",
        "stale_on_error",
        "refresh_fill",
        "refresh_negative",
        "refresh_recheck_hit",
        "refresh_error",
        "refresh_lock_error",
        "refresh_busy",
        "refresh_dropped",
    }


def test_a_record_is_not_built_when_the_logger_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="memofill")
    MissRecord(Outcome.LOCK_ERROR, "d", "k", 1.0).emit()
    assert caplog.records == []


def test_memofill_installs_no_handler() -> None:
    assert logging.getLogger("memofill").handlers == []


def test_counters_snapshot_and_reset_are_per_dataset_and_thread_safe() -> None:
    counters = Counters()

    def count() -> None:
        for _ in range(1000):
            counters.add("a", "hit")

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counters.add("b", "leader_fill")
    assert counters.snapshot() == {"a": {"hit": 4000}, "b": {"leader_fill": 1}}
    counters.reset()
    assert counters.snapshot() == {}


def test_the_counters_keep_counting_with_logging_off(
    mf: Memofill, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="memofill")
    fetch = mf.cached_dataset("item:{name}")(lambda name: name)
    fetch("a")
    fetch("a")
    assert mf.counters.snapshot() == {"item:{name}": {"hit": 1, "leader_fill": 1}}
    assert caplog.records == []


def test_a_warning_repeated_for_one_key_is_logged_once_then_summed_up(
    mf: Memofill, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An origin down under a hot key: one WARNING, then one summary per window, not one a call.

    Counters and hooks still see every call.
    """
    monkeypatch.setattr(REPEATS, "window_s", 0.5)
    hooked: list[Any] = []
    mf.events.subscribe(hooked.append)

    def fetch(name: str) -> str:
        raise ConnectionResetError("upstream down")

    cached = mf.cached_dataset("item:{name}")(fetch)
    for name in ["hot"] * 50 + ["cold"]:
        with pytest.raises(ConnectionResetError):
            cached(name)
    assert [(r.redis_key, r.levelno) for r in records.misses()] == [
        ("o:item:hot", logging.WARNING),
        ("o:item:cold", logging.WARNING),
    ]
    deadline = time.monotonic() + PATIENCE_S
    while not [r for r in records.misses() if hasattr(r, "repeated")]:
        assert time.monotonic() < deadline, "no summary came"
        time.sleep(0.01)
    (summary,) = [r for r in records.misses() if hasattr(r, "repeated")]
    assert (summary.outcome, summary.redis_key, summary.repeated) == (
        "fetch_error",
        "o:item:hot",
        49,
    )
    assert (summary.levelno, summary.error) == (logging.WARNING, "ConnectionResetError")
    assert "repeated 49 more times" in summary.getMessage()
    assert mf.counters.snapshot()["item:{name}"] == {"fetch_error": 51}
    assert len(hooked) == 51
    with pytest.raises(ConnectionResetError):
        cached("hot")  # the window ended: told in full again
    told = [r.redis_key for r in records.misses() if not hasattr(r, "repeated")]
    assert told == ["o:item:hot", "o:item:cold", "o:item:hot"]
