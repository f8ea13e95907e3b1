"""The pytest plugin ``memofill.testing``: fixtures, assertions and faults, used as users use them.

The tests in this module use the plugin's fixtures directly (the plugin is
installed through its ``pytest11`` entry point). The ``pytester`` tests write a
small user project and run pytest on it in a subprocess, so that its
module-level ``memofill.configure`` and decorated functions never touch this
process's default instance.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

import memofill
from memofill import CacheFill, ConfigurationError, Dataset, Memofill
from memofill.instance import default as default_instance
from memofill.metrics import call_outcomes
from memofill.outcomes import COUNTED_ONLY, Outcome
from memofill.testing import CORRUPT_PAYLOAD, Faults, Harness, Outcomes, stored_payload
from memofill.testing._assertions import COUNTED_NAMES
from tests.support.helpers import failure
from tests.support.redis_servers import RedisServer, free_port

pytest_plugins = ["pytester"]

#: Short waits, so that a follower that times out costs a test a fifth of a second.
QUICK = CacheFill(lease_ms=2_000, wait_ms=200, poll_min_ms=5, poll_max_ms=50)
POLICIES = {
    "item:{name}": Dataset("item:{name}", ttl_s=60, negative_ttl_s=30, cache_fill=QUICK),
    "other:v1": Dataset("other:v1", ttl_s=60, cache_fill=QUICK),
    "plain:{name}": Dataset("plain:{name}", ttl_s=60),
}

pytestmark = pytest.mark.memofill(policies=POLICIES, prefix="t:")


class Origin:
    """A fetch function's upstream: returns a value per name, optionally after a pause."""

    def __init__(self, pause_s: float = 0.0) -> None:
        self.pause_s = pause_s

    def __call__(self, name: str) -> dict[str, str]:
        time.sleep(self.pause_s)
        return {"name": name}


# --- importing ----------------------------------------------------------------------------------


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(out.split())


def test_importing_memofill_imports_neither_pytest_nor_the_plugin() -> None:
    modules = _modules_after("import memofill")
    assert "pytest" not in modules
    assert "memofill.testing" not in modules
    assert "fakeredis" not in modules


def test_loading_the_plugin_does_not_import_fakeredis() -> None:
    # The plugin loads in every pytest run where memofill is installed, test extra or not.
    assert "fakeredis" not in _modules_after("import memofill.testing")


# --- the fixtures -------------------------------------------------------------------------------


def test_marker_sets_policies_and_prefix(
    memofill_cache: Memofill, memofill_redis: redis.Redis
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    assert memofill_cache.prefix == "t:"
    assert set(memofill_cache.policies) == set(POLICIES)
    assert item("a") == {"name": "a"}
    assert stored_payload(memofill_redis.get("t:item:a")) == b'{"name":"a"}'


@pytest.mark.memofill(prefix="closer:")
def test_the_closest_marker_wins_option_by_option(memofill_cache: Memofill) -> None:
    assert memofill_cache.prefix == "closer:"
    assert set(memofill_cache.policies) == set(POLICIES)


def test_each_test_has_its_own_server(memofill_redis: redis.Redis) -> None:
    assert memofill_redis.dbsize() == 0
    memofill_redis.set("left-behind", b"1")


def test_and_the_next_one_does_not_see_the_last(memofill_redis: redis.Redis) -> None:
    assert memofill_redis.dbsize() == 0
    memofill_redis.set("left-behind", b"1")


def test_cache_serves_plain_and_coroutine_functions(
    memofill_cache: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    @memofill_cache.cached_dataset("item:{name}")
    async def item_async(name: str) -> dict[str, str]:
        return {"name": name}

    assert item("a") == {"name": "a"}
    assert asyncio.run(item_async("a")) == {"name": "a"}
    memofill_outcomes.assert_outcomes("item:{name}", leader_fill=1, hit=1)


async def test_async_twin_has_only_an_asyncio_client(
    memofill_cache_async: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache_async.cached_dataset("item:{name}")
    async def item(name: str) -> dict[str, str]:
        await asyncio.sleep(0.01)
        return {"name": name}

    @memofill_cache_async.cached_dataset("item:{name}")
    def blocking(name: str) -> dict[str, str]:
        return {"name": name}

    assert await asyncio.gather(*(item("a") for _ in range(4))) == [{"name": "a"}] * 4
    memofill_outcomes.assert_outcomes("item:{name}", leader_fill=1, local_join=3)
    with pytest.raises(ConfigurationError, match="blocking Redis client"):
        blocking("a")


@memofill.cached_dataset("news:digest:v1")
def digest() -> dict[str, int]:
    """Decorated at import time on the default instance, with the project's policies."""
    return {"items": 3}


@pytest.mark.memofill(policies=None)
def test_default_points_import_time_functions_at_the_fake(
    memofill_default: Memofill, memofill_redis: redis.Redis, memofill_outcomes: Outcomes
) -> None:
    assert memofill_default is default_instance
    assert memofill_default.prefix == "t:"
    assert digest() == {"items": 3}
    assert memofill_outcomes.assert_hit(digest) == {"items": 3}
    memofill_outcomes.assert_outcomes("news:digest:v1", leader_fill=1, hit=1)
    assert stored_payload(memofill_redis.get("t:news:digest:v1")) == b'{"items":3}'


def test_default_takes_the_policies_the_test_gives(memofill_default: Memofill) -> None:
    @memofill.cached_dataset("other:v1")
    def other() -> int:
        return 1

    assert memofill_default.policy("other:v1") is POLICIES["other:v1"]
    assert "news:digest:v1" in memofill_default.policies  # the project's, for digest()
    assert other() == 1
    assert digest() == {"items": 3}


def test_default_is_restored_after_the_test(pytester: pytest.Pytester) -> None:
    # Run in this process, on this process's default instance; a second test that checked
    # what the first left behind would depend on the order, and on which worker runs them.
    state = dict(vars(default_instance))
    bindings = set(default_instance._bindings)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import memofill
        import pytest
        from memofill import Dataset

        @pytest.mark.memofill(policies={"inner:v1": Dataset("inner:v1", ttl_s=5)}, prefix="in:")
        def test_inner(memofill_default):
            assert memofill_default.prefix == "in:"
            assert memofill.cached_dataset("inner:v1")(lambda: 1)() == 1
        """
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert vars(default_instance).keys() == state.keys()
    changed = [name for name, value in state.items() if vars(default_instance)[name] is not value]
    assert changed == ["_bindings"]  # a new set, holding the same functions
    assert set(default_instance._bindings) == bindings
    assert digest.dataset.cache_fill is not None  # rebound to the project's policies


# --- Memofill.override, which memofill_default is made of ---------------------------------------


def test_override_starts_fresh_and_puts_everything_back(memofill_harness: Harness) -> None:
    cache = Memofill(policies=POLICIES)

    @cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    item("before")
    saved = dict(vars(cache))
    inner_policies = {
        "item:{name}": Dataset("item:{name}", ttl_s=1),
        "new:v1": Dataset("new:v1", ttl_s=1),
    }
    with cache.override(memofill_harness.client(), prefix="o:", policies=inner_policies) as same:
        assert same is cache
        assert cache.counters.snapshot() == {}
        assert len(cache.local_store) == 0
        assert item.dataset.ttl_s == 1
        new = cache.cached_dataset("new:v1")(lambda: 1)
        assert item("x") == {"name": "x"}
    assert all(vars(cache)[name] is value for name, value in saved.items() if name != "_bindings")
    assert item.dataset is POLICIES["item:{name}"]
    assert new not in set(cache._bindings)
    assert cache.counters.snapshot() == {"item:{name}": {"legacy": 1}}


def test_override_restores_even_when_configure_refuses(memofill_harness: Harness) -> None:
    cache = Memofill(memofill_harness.client(), prefix="a:", policies=POLICIES)
    with pytest.raises(ConfigurationError), cache.override(prefix="{bad"):
        pass
    assert cache.prefix == "a:"


# --- Outcomes -----------------------------------------------------------------------------------


def test_counts_hits_joins_and_origin_calls(
    memofill_cache: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return Origin(pause_s=0.05)(name)

    origin = memofill_outcomes.origin_calls(item)
    threads = [threading.Thread(target=item, args=("a",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert memofill_outcomes.assert_hit(item, "a") == {"name": "a"}
    assert origin.count == 1
    assert origin.calls == [(("a",), {})]
    # A thread that starts after the fill landed hits instead of joining (a busy machine).
    joined = memofill_outcomes.counts("item:{name}")["local_join"]
    memofill_outcomes.assert_outcomes(
        "item:{name}", leader_fill=1, local_join=joined, hit=4 - joined
    )
    assert memofill_outcomes.counts("item:{name}") == Counter(
        leader_fill=1, local_join=joined, hit=4 - joined
    )
    [record] = [r for r in memofill_outcomes.records("item:{name}") if r.outcome == "leader_fill"]
    assert record.redis_key == "t:item:a"


def test_what_a_many_did_is_asserted_as_a_unit(
    memofill_cache: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    with pytest.raises(TypeError, match="has no batch function"):
        memofill_outcomes.batch_calls(item)

    @item.batch
    def items(names: list[str]) -> list[dict[str, str]]:
        return [{"name": name} for name in names]

    single = memofill_outcomes.origin_calls(item)
    batch = memofill_outcomes.batch_calls(item)
    with memofill_outcomes.expect("item:{name}", leader_fill=2):
        assert item.many(["a", "b"]) == [{"name": "a"}, {"name": "b"}]
    with memofill_outcomes.expect("item:{name}", hit=2, leader_fill=1):
        item.many(["b", "c", "a"])
    assert batch.calls == [((["a", "b"],), {}), ((["c"],), {})]
    assert single.count == 0


async def test_async_hit_and_origin_calls(
    memofill_cache: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    async def item(name: str) -> dict[str, str]:
        await asyncio.sleep(0.01)
        return {"name": name}

    origin = memofill_outcomes.origin_calls(item)
    with memofill_outcomes.expect("item:{name}", leader_fill=1, local_join=2):
        await asyncio.gather(item("a"), item("a"), item("a"))
    with memofill_outcomes.expect("item:{name}", hit=1):
        assert await memofill_outcomes.assert_hit(item, "a") == {"name": "a"}
    assert origin.count == 1


def test_failure_shows_every_outcome_seen(
    memofill_cache: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    @memofill_cache.cached_dataset("plain:{name}")
    def plain(name: str) -> dict[str, str]:
        return {"name": name}

    item("a")
    item("a")
    plain("b")
    with pytest.raises(AssertionError) as failure:
        memofill_outcomes.assert_outcomes("item:{name}", leader_fill=1)
    assert str(failure.value).splitlines() == [
        "outcomes of dataset 'item:{name}' differ",
        "  expected: leader_fill=1",
        "  seen:     hit=1, leader_fill=1",
        "every outcome seen in this test, per dataset:",
        "  item:{name}: hit=1, leader_fill=1",
        "  plain:{name}: legacy=1",
        "miss records of 'item:{name}', oldest first:",
        str(failure.value).splitlines()[7],
    ]
    assert str(failure.value).splitlines()[7].startswith("  leader_fill t:item:a elapsed_ms=")


def test_assert_hit_says_what_the_call_was(
    memofill_cache: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    with pytest.raises(AssertionError, match=r"item\('a'\) was leader_fill, not a hit"):
        memofill_outcomes.assert_hit(item, "a")
    with pytest.raises(TypeError, match="not a function decorated with cached_dataset"):
        memofill_outcomes.assert_hit(len, "a")


def test_expect_reports_what_the_block_added(
    memofill_cache: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    item("a")
    with (
        pytest.raises(AssertionError, match="the block added: leader_fill=1"),
        memofill_outcomes.expect("item:{name}", hit=1),
    ):
        item("b")


def test_a_misspelt_outcome_is_an_error(memofill_outcomes: Outcomes) -> None:
    with pytest.raises(TypeError, match=r"unknown outcome names \['leader_fil'\]"):
        memofill_outcomes.assert_outcomes("item:{name}", leader_fil=1)


def test_every_name_the_counters_report_is_assertable(memofill_outcomes: Outcomes) -> None:
    # The accepted names are memofill's vocabulary itself, not a copy of it that can fall behind:
    # every outcome of memofill_calls_total, every refresh outcome, every name counted only.
    reported = {*COUNTED_ONLY, *(outcome.value for outcome in Outcome), *call_outcomes()}
    assert {"disabled", "near_hit", "stale_hit", "fallback_hit", "hit"} <= reported
    assert reported == COUNTED_NAMES
    memofill_outcomes.assert_outcomes("item:{name}", **dict.fromkeys(sorted(reported), 0))
    with memofill_outcomes.expect("item:{name}", **dict.fromkeys(sorted(reported), 0)):
        pass


def test_disabled_calls_are_asserted_exactly(
    memofill_cache: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    with memofill_outcomes.expect("item:{name}", disabled=2), memofill.disabled():
        item("a")
        item("a")
    item("a")
    memofill_outcomes.assert_outcomes("item:{name}", disabled=2, leader_fill=1)
    with pytest.raises(AssertionError, match="seen:     disabled=2, leader_fill=1"):
        memofill_outcomes.assert_outcomes("item:{name}", leader_fill=1)


#: A near-cached dataset: a value read from Redis is kept in the process for ``near_ms``.
NEAR_POLICIES = {"hot:{name}": Dataset("hot:{name}", ttl_s=60, near_ms=60_000, cache_fill=QUICK)}


@pytest.mark.memofill(policies=NEAR_POLICIES)
def test_near_hits_of_a_near_ms_dataset_are_asserted_exactly(
    memofill_cache: Memofill, memofill_outcomes: Outcomes
) -> None:
    @memofill_cache.cached_dataset("hot:{name}")
    def hot(name: str) -> dict[str, str]:
        return {"name": name}

    hot("a")  # fills: a fill's own value is not kept near (its write invalidates it)
    hot("a")  # read from Redis: kept near
    with memofill_outcomes.expect("hot:{name}", near_hit=3):
        for _ in range(3):
            hot("a")
    memofill_outcomes.assert_outcomes("hot:{name}", leader_fill=1, hit=1, near_hit=3)


@pytest.mark.redis_server
def test_near_hits_on_a_real_redis_server_are_asserted_exactly(redis_server: RedisServer) -> None:
    # On a real server the near copies are dropped by the listener of writes (CLIENT TRACKING),
    # as in production; a test of such a dataset adopts its own instance into a Harness.
    cache = Memofill(redis_server.client(), prefix="outcomes-near:", policies=NEAR_POLICIES)
    harness = Harness()
    with harness.cleanup:
        harness.cleanup.callback(cache.local_store.attach, None)  # stop the listener
        outcomes = Outcomes(harness)
        hot = harness.adopt(cache).cached_dataset("hot:{name}")(lambda name: {"name": name})
        seen: Counter[str] = Counter()
        deadline = time.monotonic() + 20
        while seen["near_hit"] == 0:  # until the listener is live and the copy kept
            assert time.monotonic() < deadline, f"never a near hit: {seen}"
            seen[hot.call_with_outcome("a").outcome] += 1
        with outcomes.expect("hot:{name}", near_hit=3):
            for _ in range(3):
                hot("a")
        outcomes.assert_outcomes("hot:{name}", **(seen + Counter(near_hit=3)))
        assert seen["leader_fill"] == 1


def test_nothing_seen_says_so(memofill_outcomes: Outcomes) -> None:
    with pytest.raises(AssertionError, match="nothing: no call went through"):
        memofill_outcomes.assert_outcomes("item:{name}", hit=1)
    memofill_outcomes.assert_outcomes("item:{name}")


def test_origin_calls_counts_methods_and_is_undone(memofill_cache: Memofill) -> None:
    class Service:
        @memofill_cache.cached_dataset("item:{name}")
        def item(self, name: str) -> dict[str, str]:
            return {"name": name}

    body = Service.__dict__["item"].__wrapped__
    harness = Harness()
    with harness.cleanup:
        harness.adopt(memofill_cache)
        origin = Outcomes(harness).origin_calls(Service.item)
        service = Service()
        assert service.item("a") == {"name": "a"}
        assert service.item("a") == {"name": "a"}
        assert origin.count == 1
        assert origin.calls[0][0][1:] == ("a",)
    assert Service.__dict__["item"].__wrapped__ is body


# --- Faults -------------------------------------------------------------------------------------


def test_redis_down_degrades_then_recovers(
    memofill_cache: Memofill, memofill_outcomes: Outcomes, memofill_faults: Faults
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    item("warm")
    with memofill_faults.redis_down():
        assert item("cold") == {"name": "cold"}
        assert item("warm") == {"name": "warm"}
    memofill_outcomes.assert_outcomes("item:{name}", leader_fill=1, lock_error=1, fallback_hit=1)
    [record] = memofill_outcomes.records("item:{name}")[1:]
    assert (record.outcome, failure(record.error)) == ("lock_error", "ConnectionError")
    with memofill_outcomes.expect("item:{name}", leader_fill=1):
        item("cold")  # Redis is back at once: the breaker was closed


async def test_redis_down_async(
    memofill_cache_async: Memofill, memofill_outcomes: Outcomes, memofill_faults: Faults
) -> None:
    @memofill_cache_async.cached_dataset("item:{name}")
    async def item(name: str) -> dict[str, str]:
        return {"name": name}

    with memofill_faults.redis_down():
        assert await item("a") == {"name": "a"}
    assert await item("b") == {"name": "b"}
    memofill_outcomes.assert_outcomes("item:{name}", lock_error=1, leader_fill=1)


def test_lock_held_makes_a_caller_wait_then_fetch(
    memofill_cache: Memofill, memofill_outcomes: Outcomes, memofill_faults: Faults
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    with memofill_faults.lock_held("item:{name}", name="a") as holder:
        started = time.monotonic()
        assert item("a") == {"name": "a"}
        assert time.monotonic() - started >= QUICK.wait_ms / 1000
        assert holder.lock_key == memofill_cache.lock_key("item:{name}", name="a")
    memofill_outcomes.assert_outcomes("item:{name}", follower_timeout=1)
    [record] = memofill_outcomes.records("item:{name}")
    assert record.waited_ms >= QUICK.wait_ms


def test_lock_held_is_released_when_the_block_ends(
    memofill_cache: Memofill, memofill_redis: redis.Redis, memofill_faults: Faults
) -> None:
    lock = memofill_cache.lock_key("item:{name}", name="a")
    with memofill_faults.lock_held("item:{name}", name="a"):
        assert memofill_redis.exists(lock)
        with (
            pytest.raises(RuntimeError, match="already held"),
            memofill_faults.lock_held("item:{name}", name="a"),
        ):
            pass
    assert not memofill_redis.exists(lock)


#: The caller meets the holder's fill as a follower; on a busy machine its lock attempt (or its
#: first read) may come after the holder's fill: a recheck hit (or a hit). Never a fetch.
FILLED_BY_THE_HOLDER = (Counter(follower_hit=1), Counter(leader_recheck_hit=1), Counter(hit=1))


def test_lock_held_then_filled_by_its_holder(
    memofill_cache: Memofill, memofill_outcomes: Outcomes, memofill_faults: Faults
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    origin = memofill_outcomes.origin_calls(item)
    with memofill_faults.lock_held("item:{name}", name="a") as holder:
        holder.fill({"name": "theirs"}, after_ms=30)
        assert item("a") == {"name": "theirs"}
    assert origin.count == 0
    assert memofill_outcomes.counts("item:{name}") in FILLED_BY_THE_HOLDER


async def test_lock_held_then_filled_async(
    memofill_cache_async: Memofill, memofill_outcomes: Outcomes, memofill_faults: Faults
) -> None:
    @memofill_cache_async.cached_dataset("item:{name}")
    async def item(name: str) -> dict[str, str] | None:
        return {"name": name}

    with memofill_faults.lock_held("item:{name}", name="a") as holder:
        holder.fill(None, after_ms=30)
        assert await item("a") is None
    assert memofill_outcomes.counts("item:{name}") in FILLED_BY_THE_HOLDER


def test_a_fill_that_fails_in_the_background_fails_the_test(
    memofill_cache: Memofill, memofill_faults: Faults
) -> None:
    with memofill_faults.lock_held("item:{name}", name="a") as holder:
        with memofill_faults.redis_down():  # down before the fill fires, however slow the host
            holder.fill({"name": "a"}, after_ms=1)
            time.sleep(0.05)
        with pytest.raises(redis.ConnectionError):
            holder.end()
    with (
        memofill_faults.redis_down(),
        pytest.raises(redis.ConnectionError),
        memofill_faults.lock_held("item:{name}", name="a"),
    ):
        pass


def test_lock_held_needs_a_coordinated_dataset(
    memofill_cache: Memofill, memofill_faults: Faults
) -> None:
    with (
        pytest.raises(ValueError, match="no cache_fill"),
        memofill_faults.lock_held("plain:{name}", name="a"),
    ):
        pass
    with pytest.raises(LookupError, match="no cache in this test declares dataset 'nope'"):
        memofill_faults.corrupt("nope")


def test_corrupt_value_is_a_miss_and_is_refilled(
    memofill_cache: Memofill,
    memofill_outcomes: Outcomes,
    memofill_faults: Faults,
    memofill_redis: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    key = memofill_faults.corrupt("item:{name}", name="a")
    assert memofill_redis.get(key) == CORRUPT_PAYLOAD
    assert item("a") == {"name": "a"}
    memofill_outcomes.assert_outcomes("item:{name}", leader_fill=1)
    assert stored_payload(memofill_redis.get(key)) == b'{"name":"a"}'
    assert "corrupt bytes under t:item:a" in caplog.text


def test_slow_redis_slows_hits_and_times_out(
    memofill_cache: Memofill, memofill_outcomes: Outcomes, memofill_faults: Faults
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    item("a")
    with memofill_faults.slow(40):
        started = time.monotonic()
        memofill_outcomes.assert_hit(item, "a")
        assert time.monotonic() - started >= 0.04
    with memofill_faults.slow(500, timeout_ms=20):
        started = time.monotonic()
        assert item("b") == {"name": "b"}
        assert time.monotonic() - started < 0.5
    memofill_outcomes.assert_outcomes("item:{name}", leader_fill=1, hit=1, lock_error=1)
    assert failure(memofill_outcomes.records("item:{name}")[-1].error) == "TimeoutError"


async def test_slow_redis_async(
    memofill_cache: Memofill, memofill_outcomes: Outcomes, memofill_faults: Faults
) -> None:
    @memofill_cache.cached_dataset("item:{name}")
    async def item(name: str) -> dict[str, str]:
        return {"name": name}

    with memofill_faults.slow(500, timeout_ms=20):
        assert await item("a") == {"name": "a"}
    memofill_outcomes.assert_outcomes("item:{name}", lock_error=1)


# --- as a user's project runs it ----------------------------------------------------------------

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "testing.rst"
USER_INI = """
[pytest]
pythonpath = .
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
addopts = --strict-markers -p no:cacheprovider
filterwarnings =
    error
"""
#: For runs in this process, where memofill is imported before pytest can mark it for rewriting.
IN_PROCESS_INI = USER_INI + "    ignore:Module already imported:pytest.PytestAssertRewriteWarning\n"


def captioned_blocks(page: str) -> dict[str, str]:
    """The code blocks of a reStructuredText page whose caption is a file path: path -> source."""
    blocks = {}
    lines = page.splitlines()
    for index, line in enumerate(lines[:-1]):
        caption = lines[index + 1].strip()
        if not line.startswith(".. code-block::") or not caption.startswith(":caption:"):
            continue
        body = []
        for following in lines[index + 2 :]:
            if following and not following.startswith("   "):
                break
            body.append(following[3:])
        blocks[caption.removeprefix(":caption:").strip()] = "\n".join(body).strip() + "\n"
    return blocks


@pytest.fixture
def docs_project(pytester: pytest.Pytester) -> pytest.Pytester:
    """The example project of docs/testing.rst, its policies generated by ``memofill gen``."""
    blocks = captioned_blocks(DOCS_PAGE.read_text(encoding="utf-8"))
    assert sorted(blocks) == [
        "myapp/news.py",
        "myapp/quotes.py",
        "registry.py",
        "tests/test_news.py",
        "tests/test_outages.py",
        "tests/test_quotes.py",
    ]
    for path, source in [*blocks.items(), ("myapp/__init__.py", "")]:
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source, encoding="utf-8")
    subprocess.run([sys.executable, "-m", "memofill", "gen"], cwd=pytester.path, check=True)
    pytester.makeini(USER_INI)
    return pytester


#: A whole pytest run (with its own xdist workers) on a busy machine can take minutes.
PATIENCE_S = 300


@pytest.mark.slow
@pytest.mark.timeout(PATIENCE_S + 60)
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_the_documented_example_passes(docs_project: pytest.Pytester, workers: list[str]) -> None:
    # A subprocess: the example decorates functions on its own default instance at import.
    result = docs_project.runpytest_subprocess(*workers, timeout=PATIENCE_S)
    result.assert_outcomes(passed=6)


def test_a_failure_shows_what_happened(pytester: pytest.Pytester) -> None:
    pytester.makeini(IN_PROCESS_INI)
    pytester.makepyfile(
        """
        import pytest
        from memofill import Dataset

        @pytest.mark.memofill(policies={"a:v1": Dataset("a:v1", ttl_s=5)}, prefix="p:")
        def test_user(memofill_cache, memofill_outcomes):
            fetch = memofill_cache.cached_dataset("a:v1")(lambda: 1)
            fetch()
            fetch()
            memofill_outcomes.assert_outcomes("a:v1", legacy=2)
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            ">*memofill_outcomes.assert_outcomes(*",  # the user's line, not the plugin's
            "E *AssertionError: outcomes of dataset 'a:v1' differ",
            "E *  expected: legacy=2",
            "E *  seen:     hit=1, legacy=1",
            "E *every outcome seen in this test, per dataset:",
            "E *  a:v1: hit=1, legacy=1",
            "E *miss records of 'a:v1', oldest first:",
            "E *  legacy p:a:v1 elapsed_ms=*",
        ],
        consecutive=True,
    )


def test_policies_from_the_ini_option_or_an_overriding_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeini(IN_PROCESS_INI + "memofill_policies = mypolicies\n")
    pytester.makepyfile(
        mypolicies='POLICIES = {"from:ini": {"ttl_s": 5, "negative_ttl_s": 0, "cache_fill": None}}',
        test_ini="""
            def test_ini(memofill_cache):
                assert list(memofill_cache.policies) == ["from:ini"]
        """,
    )
    pytester.mkdir("sub")
    pytester.path.joinpath("sub", "conftest.py").write_text(
        "import pytest\n"
        "from memofill import Dataset\n\n"
        "@pytest.fixture\n"
        "def memofill_policies():\n"
        '    return {"from:fixture": Dataset("from:fixture", ttl_s=5)}\n'
    )
    pytester.path.joinpath("sub", "test_fixture.py").write_text(
        "def test_fixture(memofill_cache):\n"
        '    assert list(memofill_cache.policies) == ["from:fixture"]\n'
    )
    pytester.runpytest_inprocess().assert_outcomes(passed=2)


def test_a_missing_policy_module_says_how_to_name_another(pytester: pytest.Pytester) -> None:
    pytester.makeini(IN_PROCESS_INI + "memofill_policies = no_such_policies\n")
    pytester.makepyfile("def test_cache(memofill_cache):\n    pass\n")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "cannot import policies 'no_such_policies': run `memofill gen`, or pass policies=*",
            "for the memofill_* fixtures: set the memofill_policies ini option, or use *",
        ]
    )


def test_a_wrong_marker_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makeini(IN_PROCESS_INI)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.memofill(polices={})
        def test_typo(memofill_cache):
            pass
        """
    )
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*takes only the keyword options*unknown*polices*"])


@pytest.mark.slow
def test_without_fakeredis_the_fixtures_say_what_to_install(pytester: pytest.Pytester) -> None:
    pytester.makeini(USER_INI)
    pytester.makeconftest("import sys\nsys.modules['fakeredis'] = None  # as if not installed\n")
    pytester.makepyfile(
        """
        def test_no_fixture():
            pass

        def test_fixture(memofill_cache):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["memofill's test fixtures need fakeredis: pip install *"])


# --- tests never reach a real Redis by accident ------------------------------------------


def test_an_app_configure_inside_the_fixture_keeps_the_fake(pytester: pytest.Pytester) -> None:
    port = free_port()  # a free port, nothing listening: a write there would fail
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        f"""
        import memofill
        import redis
        from memofill.testing import stored_payload

        def create_app():  # an app factory, or a FastAPI lifespan, configuring at start-up
            memofill.configure(redis.Redis(port={port}), prefix="prod:")

        def test_app(memofill_default, memofill_redis):
            create_app()

            @memofill.cached_dataset("weather:alerts:v2")
            def alerts():
                return ["storm"]

            assert alerts() == ["storm"]
            assert stored_payload(memofill_redis.get("weather:alerts:v2")) == b'["storm"]'
            assert memofill_default.prefix == ""
        """
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
