"""The near cache without Redis: the registry field, the options, the store's rules, the parser.

The store is driven with a fake clock and by hand, in the order a race would
interleave a read and an invalidation; the listener's RESP reader is fed the
bytes Redis sends, split anywhere.
"""

from __future__ import annotations

import time
import types
from typing import Any

import pytest

from memofill import ConfigurationError, Dataset, Memofill, NearCache, validate
from memofill.codegen import render
from memofill.listener import ListenerError, Reader, command, tracked_prefixes
from memofill.near import ALWAYS, LocalStore
from memofill.policy import load_policies
from memofill.testing import Faults
from tests.support.helpers import FakeClock

# -- the registry field ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("near_ms", "rule"),
    [
        (-1, "must be >= 0 (0: no near cache)"),
        (60_001, "must be <= ttl_s * 1000 (60000)"),
        (1.5, "must be an int (ms)"),
        (True, "must be an int (ms)"),
        ("500", "must be an int (ms)"),
    ],
)
def test_near_ms_is_an_int_of_ms_between_0_and_the_ttl(near_ms: object, rule: str) -> None:
    problems = validate([Dataset("q:{s}", ttl_s=60, near_ms=near_ms)])  # type: ignore[arg-type]
    assert [(p.key, p.field, p.value, p.rule) for p in problems] == [
        ("q:{s}", "near_ms", near_ms, rule)
    ]


def test_near_ms_is_listed_with_every_other_problem() -> None:
    problems = validate([Dataset("q:{s}", ttl_s=0, negative_ttl_s=-1, near_ms=-5)])
    assert [p.field for p in problems] == ["ttl_s", "negative_ttl_s", "near_ms"]


@pytest.mark.parametrize("near_ms", [0, 1, 60_000])
def test_near_ms_boundaries_that_are_allowed(near_ms: int) -> None:
    assert validate([Dataset("q:{s}", ttl_s=60, near_ms=near_ms)]) == []


def test_the_generator_writes_near_ms_and_the_run_time_reads_it_back() -> None:
    datasets = [Dataset("q:{s}", ttl_s=60, near_ms=500), Dataset("r:v1", ttl_s=60)]
    text = render(datasets, "registry.py")
    assert '"near_ms": 500,' in text
    assert text.count("near_ms") == 1  # 0, the default, is not written: old output unchanged
    module = types.ModuleType("generated")
    exec(text, module.__dict__)
    loaded = load_policies(module)
    assert loaded["q:{s}"].near_ms == 500
    assert loaded["r:v1"].near_ms == 0


# -- the options -------------------------------------------------------------------------------


def test_near_cache_options_are_checked_with_every_problem_named() -> None:
    with pytest.raises(ConfigurationError) as raised:
        NearCache(max_entries=-1, invalidation="push", heartbeat_ms=5)  # type: ignore[arg-type]
    message = str(raised.value)
    for part in ("max_entries=-1", "invalidation='push'", "heartbeat_ms=5"):
        assert part in message


# -- the store's rules -------------------------------------------------------------------------


def store(**kwargs: object) -> tuple[LocalStore, FakeClock]:
    clock = FakeClock()
    made = LocalStore(clock=clock, **kwargs)  # type: ignore[arg-type]
    return made, clock


def test_a_read_raced_by_an_invalidation_keeps_nothing() -> None:
    near, _ = store()
    reservation = near.reserve("k")
    assert reservation is not None
    near.invalidate(["k"])  # the write landed after the read was sent: its value may be old
    near.settle("k", reservation, {"v": 1}, None, 10, 200.0, 0.0)
    assert "k" not in near.entries


def test_a_read_raced_by_a_flush_keeps_nothing() -> None:
    near, _ = store()
    reservation = near.reserve("k")
    assert reservation is not None
    near.flush()
    near.settle("k", reservation, {"v": 1}, None, 10, 200.0, 0.0)
    assert "k" not in near.entries


def test_a_read_made_while_the_listener_is_not_tracking_reserves_nothing() -> None:
    near, clock = store()
    near.attach(None)  # tracking wanted, no listener yet
    assert near.reserve("k") is None
    near.heard(clock.now + 0.5)
    assert near.reserve("k") is not None
    clock.now += 0.6
    assert near.reserve("k") is None  # no answered ping for two heartbeats


def test_a_settled_read_is_kept_and_an_invalidation_drops_it() -> None:
    near, _ = store()
    reservation = near.reserve("k")
    assert reservation is not None
    near.settle("k", reservation, {"v": 1}, None, 10, 200.0, 30.0)
    assert near.entries["k"].value == {"v": 1}
    assert near.pending == {}
    near.invalidate(["k"])
    assert "k" not in near.entries


def test_without_a_listener_needed_copies_are_always_vouched_for() -> None:
    near, _ = store()
    near.attach(None, needed=False)
    assert near.live_until == ALWAYS


def test_eviction_gives_a_hit_entry_a_second_chance() -> None:
    near, _ = store(max_entries=3)
    for key in "abc":
        near.put(key, key.encode(), ttl_s=10)
    near.entries["a"].visited = True  # a near hit on the oldest
    near.put("d", b"d", ttl_s=10)
    assert list(near.entries) == ["c", "d", "a"]  # "b" went, "a" moved to the back
    assert not near.entries["a"].visited
    near.put("e", b"e", ttl_s=10)
    assert list(near.entries) == ["d", "a", "e"]
    assert near.evictions == 2


# -- the listener's reader ---------------------------------------------------------------------

RESP2_INVALIDATION = (
    b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*2\r\n$3\r\np:a\r\n$3\r\np:b\r\n"
)
RESP2_FLUSH = b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*-1\r\n"
RESP3_INVALIDATION = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\np:a\r\n"
RESP3_FLUSH = b">2\r\n$10\r\ninvalidate\r\n_\r\n"
PONGS = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n+PONG\r\n"
OTHERS = (
    b"%1\r\n+k\r\n:1\r\n|1\r\n+meta\r\n+x\r\n+value\r\n-ERR no\r\n#t\r\n,1.5\r\n=7\r\ntxt:abc\r\n"
)


def test_the_reader_splits_resp2_and_resp3_replies_wherever_the_bytes_are_cut() -> None:
    data = RESP2_INVALIDATION + RESP2_FLUSH + RESP3_INVALIDATION + RESP3_FLUSH + PONGS + OTHERS
    for cut in range(1, len(data)):
        reader = Reader()
        replies = []
        reader.feed(data[:cut])
        replies.extend(reader.replies())
        reader.feed(data[cut:])
        replies.extend(reader.replies())
        assert [repr(r) for r in replies] == [
            repr([b"message", b"__redis__:invalidate", [b"p:a", b"p:b"]]),
            repr([b"message", b"__redis__:invalidate", None]),
            repr([b"invalidate", [b"p:a"]]),
            repr([b"invalidate", None]),
            repr([b"pong", b""]),
            repr(b"PONG"),
            repr({b"k": 1}),
            repr(b"value"),
            repr(ListenerError("ERR no")),
            repr(b"t"),
            repr(b"1.5"),
            repr(b"abc"),
        ]


def test_commands_are_sent_as_arrays_of_bulk_strings() -> None:
    assert command("CLIENT", "ID") == b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n"


def test_tracked_prefixes_keep_the_shortest_of_those_that_overlap() -> None:
    assert tracked_prefixes(["p:q:", "p:q:x:", "p:r", "p:qz"]) == ("p:q:", "p:qz", "p:r")
    assert tracked_prefixes(["p:", "", "x"]) == ("",)


# -- the pytest plugin: ttl mode on fakeredis, and a lost listener -------------------------------

NEAR_POLICIES = {"q:{s}": Dataset("q:{s}", ttl_s=60, near_ms=60_000)}


@pytest.mark.memofill(policies=NEAR_POLICIES)
def test_the_plugin_keeps_near_copies_on_fakeredis_for_near_ms(
    memofill_cache: Memofill, memofill_faults: Faults
) -> None:
    calls: list[str] = []

    @memofill_cache.cached_dataset("q:{s}")
    def quote(s: str) -> dict[str, int]:
        calls.append(s)
        return {"n": len(calls)}

    quote("a")  # fills
    quote("a")  # reads Redis: kept near
    assert quote.call_with_outcome("a").outcome == "near_hit"
    with memofill_faults.listener_lost():
        assert [quote.call_with_outcome("a").outcome for _ in range(2)] == ["hit", "hit"]
    quote("a")
    assert quote.call_with_outcome("a").outcome == "near_hit"
    quote.invalidate("a")  # this process's own invalidation drops its copy at once
    assert quote("a") == {"n": 2}
    assert memofill_cache.counters.snapshot()["q:{s}"]["near_hit"] == 2


@pytest.mark.memofill(policies=NEAR_POLICIES)
def test_the_default_instance_keeps_near_copies_in_ttl_mode_under_the_plugin(
    memofill_default: Memofill,
) -> None:
    assert memofill_default.near is not None
    assert memofill_default.near.invalidation == "ttl"


@pytest.mark.memofill(policies=NEAR_POLICIES)
def test_one_entry_serves_near_and_then_an_outage(
    memofill_cache: Memofill, memofill_faults: Faults
) -> None:
    quote = memofill_cache.cached_dataset("q:{s}")(lambda s: {"s": s})
    quote("a")
    quote("a")  # kept near: the same entry serves outages, so the value is kept once
    assert len(memofill_cache.local_store) == 1
    with memofill_faults.redis_down():
        memofill_cache.breaker.trip()
        result = quote.call_with_outcome("a")
    assert result.outcome in ("near_hit", "fallback_hit")
    assert result.value == {"s": "a"}
    with memofill_faults.listener_lost(), memofill_faults.redis_down():
        memofill_cache.breaker.trip()
        assert quote.call_with_outcome("a").outcome == "fallback_hit"


@pytest.mark.memofill(policies=NEAR_POLICIES)
def test_near_hits_share_one_object_so_a_caller_that_changes_it_changes_the_next_callers(
    memofill_cache: Memofill,
) -> None:
    quote = memofill_cache.cached_dataset("q:{s}")(lambda s: {"bid": 100})
    quote("a")
    first = quote("a")  # read from Redis: the object kept near
    first["bid"] = 0  # the hazard: never change what a cached function returned
    assert quote("a") is first
    assert quote("a") == {"bid": 0}


@pytest.mark.memofill(policies=NEAR_POLICIES)
def test_copy_on_hit_gives_every_caller_its_own_object(
    memofill_cache: Memofill, memofill_redis: Any
) -> None:
    memofill_cache.configure(near=NearCache(invalidation="ttl", copy_on_hit=True))
    quote = memofill_cache.cached_dataset("q:{s}")(lambda s: {"bid": 100})
    quote("a")
    first = quote("a")
    first["bid"] = 0
    result = quote.call_with_outcome("a")
    assert result.outcome == "near_hit"
    assert result.value == {"bid": 100}
    assert result.value is not quote("a")


@pytest.mark.memofill(
    policies={"n:{s}": Dataset("n:{s}", ttl_s=60, negative_ttl_s=1, near_ms=60_000)}
)
def test_a_none_is_kept_near_within_the_smaller_of_near_ms_and_negative_ttl_s(
    memofill_cache: Memofill, memofill_redis: Any
) -> None:
    calls: list[str] = []

    @memofill_cache.cached_dataset("n:{s}")
    def lookup(s: str) -> None:
        calls.append(s)

    lookup("a")  # fills the negative marker
    lookup("a")  # reads it: kept near for its PTTL (under 1 s), not near_ms (60 s)
    assert lookup.call_with_outcome("a").outcome == "near_hit"
    entry = memofill_cache.local_store.entries["n:a"]
    assert entry.near_until - time.monotonic() <= 1.0
    assert entry.outage_until == 0.0  # a None is never served for an outage
