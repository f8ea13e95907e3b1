"""On a private redis-server: stampedes of processes, what goes over the wire, ACLs, outages.

These tests never skip: the fixtures start ``redis-server`` on a free loopback
port and fail loudly when it is missing (CI installs it).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from memofill import CacheFill, Dataset, FillError, KeyTemplateError, Memofill
from memofill.codec import encode
from memofill.keys import lock_key, wake_key
from memofill.testing import stored_payload
from tests.conftest import POLICIES
from tests.support.fault_helpers import wait_until
from tests.support.helpers import notify_after_acquire
from tests.support.redis_servers import RedisServer
from tests.support.stampede import run_stampede
from tests.typing import typed_values

pytestmark = pytest.mark.redis_server

#: Long enough for any step on a busy machine; only a failing test waits this long.
PATIENCE_S = 10.0


@pytest.fixture
def prefix() -> str:
    return f"r{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def mf(real_client: redis.Redis, prefix: str) -> Memofill:
    return Memofill(real_client, prefix=prefix, policies=POLICIES)


@pytest.fixture
async def amf(redis_server: RedisServer, prefix: str) -> AsyncIterator[Memofill]:
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    yield Memofill(client, prefix=prefix, policies=POLICIES)
    await client.aclose()


def fast_failing_client(server: RedisServer) -> redis.Redis:
    """A client that reports a dead server at once (redis-py retries 3 times by default)."""
    return server.client(
        socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


class Monitor:
    """The commands a server executes while the block runs, read with ``MONITOR`` in a thread.

    Each entry is ``(source, words)``: ``source`` is ``"lua"`` for a command a
    script ran, else ``"client"``; ``words`` are the command's name (upper
    case) and arguments. A command of the test's own, ``ECHO <marker>``,
    ends the recording, so nothing sent before or after the block is seen.
    """

    def __init__(self, server: RedisServer) -> None:
        # No socket time-out: the recording may sit idle while processes start on a busy machine.
        self.client = server.client(socket_timeout=None)
        # The command that ends the recording goes over a connection opened now, before
        # MONITOR starts, so that its handshake (HELLO, CLIENT SETINFO) is not recorded.
        self.stopper = server.client()
        self.stopper.ping()
        self.marker = f"monitor-stop-{uuid.uuid4().hex}"
        self.commands: list[tuple[str, list[str]]] = []
        self._monitor = self.client.monitor()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        for entry in self._monitor.listen():
            words = entry["command"].split(" ")
            if words[1:] == [self.marker]:
                return
            words[0] = words[0].upper()
            self.commands.append(("lua" if entry["client_type"] == "lua" else "client", words))

    def __enter__(self) -> Monitor:
        self._monitor.__enter__()  # MONITOR is acknowledged: every later command is recorded
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopper.echo(self.marker)
        self._thread.join(PATIENCE_S)
        self._monitor.__exit__()
        self.client.close()
        self.stopper.close()

    def touching(self, key: str) -> list[tuple[str, list[str]]]:
        """The commands that name ``key`` as an argument."""
        return [(source, words) for source, words in self.commands if key in words[1:]]


def assert_lock_untouched_but_by_set_nx_and_release(monitor: Monitor, lock: str) -> None:
    """The lock key is only ever taken (SET NX) or released (the script) — never read or polled."""
    for source, words in monitor.touching(lock):
        if words[0] == "SET":  # taken, in the lock's script
            assert "NX" in [w.upper() for w in words], words
        elif source == "lua":
            assert words[0] in {"GET", "DEL"}, words  # the compare-and-delete itself
        else:
            assert words[0] in {"EVALSHA", "EVAL"}, words


# --- stampedes -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stampede_of_processes_and_threads_calls_the_origin_once(
    redis_server: RedisServer, prefix: str
) -> None:
    result = run_stampede(redis_server.port, prefix, processes=4, threads=25)
    assert result.origin_calls == 1
    assert len(result.seen) == 100
    values = {repr(value) for _, value in result.seen}
    assert len(values) == 1
    assert "hot" in values.pop()
    outcomes = result.outcomes
    assert outcomes["leader_fill"] == 1
    # One coordinated miss per process at most; every other caller joined its process's fill.
    coordinated = (
        outcomes["leader_fill"] + outcomes["follower_hit"] + outcomes["leader_recheck_hit"]
    )
    assert coordinated <= 4
    assert set(outcomes) <= {
        "leader_fill",
        "follower_hit",
        "leader_recheck_hit",
        "local_join",
        "hit",
    }
    # 100 hit-path GETs and the origin's INCR, then a handful of lock-path commands per process
    # (followers poll the data key on a growing timer, so their count depends on timing).
    commands = result.commands
    assert commands["incrby"] == 1
    assert commands["set"] <= 4 + 1  # SET NX per coordinated miss, and the one write
    # Per process a read of the marks and a lock attempt per coordinated miss, then one
    # write and one release: each script twice at most (after NOSCRIPT).
    assert commands["evalsha"] + commands["eval"] <= 2 * (4 + 4 + 2)
    assert commands["xadd"] == 1  # one wake-up
    assert 100 <= commands["get"] <= 100 + 2 + 3 * 10
    assert sum(commands.values()) <= 200
    print(f"\nstampede 4x25: origin calls {result.origin_calls}, commands {dict(commands)}")


@pytest.mark.slow
def test_followers_never_read_the_lock_key_across_processes(
    redis_server: RedisServer, prefix: str
) -> None:
    with Monitor(redis_server) as monitor:
        result = run_stampede(redis_server.port, prefix, processes=4, threads=20, fetch_s=0.5)
    assert result.origin_calls == 1
    key = prefix + "stampede:hot"
    lock = lock_key(key)
    assert_lock_untouched_but_by_set_nx_and_release(monitor, lock)
    set_nx = [w for s, w in monitor.touching(lock) if w[0] == "SET"]
    assert 1 <= len(set_nx) <= 4
    # Followers noted the newest wake entry with their lock attempt, waited on the wake
    # stream and read the data key, nothing else.
    for _, words in monitor.touching(wake_key(key)):
        assert words[0] in {"XREVRANGE", "XREAD", "EVALSHA", "EVAL", "XADD", "PEXPIRE"}, words


def test_a_warm_key_costs_one_get_per_call_and_nothing_else(
    redis_server: RedisServer, mf: Memofill
) -> None:
    fetch = mf.cached_dataset("item:{name}")(lambda name: {"name": name})
    fetch("warm")
    with Monitor(redis_server) as monitor:
        for _ in range(10):
            assert fetch("warm") == {"name": "warm"}
    assert monitor.commands == [("client", ["GET", mf.final_key("item:{name}", name="warm")])] * 10


async def test_a_warm_key_costs_one_get_per_call_with_asyncio(
    redis_server: RedisServer, amf: Memofill
) -> None:
    @amf.cached_dataset("item:{name}")
    async def fetch(name: str) -> dict[str, str]:
        return {"name": name}

    await fetch("warm")
    with Monitor(redis_server) as monitor:
        for _ in range(10):
            assert await fetch("warm") == {"name": "warm"}
    assert monitor.commands == [("client", ["GET", amf.final_key("item:{name}", name="warm")])] * 10


async def test_fifty_tasks_share_one_fetch_and_one_lock(
    redis_server: RedisServer, amf: Memofill
) -> None:
    calls = 0

    @amf.cached_dataset("item:{name}")
    async def fetch(name: str) -> dict[str, str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return {"name": name}

    with Monitor(redis_server) as monitor:
        results = await asyncio.gather(*(fetch.call_with_outcome("hot") for _ in range(50)))
    assert calls == 1
    assert {repr(r.value) for r in results} == {"{'name': 'hot'}"}
    assert Counter(r.outcome for r in results) == Counter(leader_fill=1, local_join=49)
    assert len(amf.task_flights) == 0
    key = amf.final_key("item:{name}", name="hot")
    client_commands = Counter(words[0] for source, words in monitor.commands if source == "client")
    # 50 hit-path reads. Joiners that joined before the fetch began share its value with no
    # read; one that joined after it (a busy loop) costs one GET, shared by all.
    assert client_commands["GET"] in {50, 51}
    assert client_commands["SET"] == 0  # the lock and the value are taken and written by scripts
    lua_commands = Counter(words[0] for source, words in monitor.commands if source == "lua")
    assert lua_commands["SET"] == 2  # one lock taken, one value written
    assert_lock_untouched_but_by_set_nx_and_release(monitor, lock_key(key))


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_follower_blocks_under_its_socket_timeout_and_wakes_on_release(
    redis_server: RedisServer, prefix: str, protocol: int
) -> None:
    leader_client = redis_server.client(protocol=protocol)
    follower_client = redis_server.client(protocol=protocol, socket_timeout=0.1)
    leader_mf = Memofill(leader_client, prefix=prefix, policies=POLICIES)
    follower_mf = Memofill(follower_client, prefix=prefix, policies=POLICIES)
    entered, release = threading.Event(), threading.Event()

    def origin(name: str) -> str:
        entered.set()
        release.wait(PATIENCE_S)
        return name

    following = notify_after_acquire(follower_mf)
    seen: dict[str, Any] = {}
    with Monitor(redis_server) as monitor:
        leader = threading.Thread(
            target=lambda: seen.update(
                leader=leader_mf.cached_dataset("item:{name}")(origin).call_with_outcome("a")
            )
        )
        leader.start()
        assert entered.wait(PATIENCE_S)
        follower = threading.Thread(
            target=lambda: seen.update(
                follower=follower_mf.cached_dataset("item:{name}")(origin).call_with_outcome("a")
            )
        )
        follower.start()
        assert following.wait(PATIENCE_S)
        # Several waits, each shorter than the 100 ms socket time-out, before the release.
        wait_until(lambda: sum(w[0] == "XREAD" for _, w in monitor.commands) >= 2, PATIENCE_S)
        release.set()
        leader.join(PATIENCE_S)
        follower.join(PATIENCE_S)
    assert (seen["leader"].outcome, seen["follower"].outcome) == ("leader_fill", "follower_hit")
    blocks = [int(w[w.index("BLOCK") + 1]) for _, w in monitor.commands if w[0] == "XREAD"]
    assert len(blocks) >= 2
    assert max(blocks) <= 80  # 0.8 x the socket time-out: a wait never outlives the socket
    assert not follower_mf.breaker.is_open
    leader_client.close()
    follower_client.close()


# --- races the lock must survive -------------------------------------------------------


def test_a_lock_taken_over_during_the_fetch_survives_the_first_leaders_release(
    real_client: redis.Redis, mf: Memofill, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="memofill")
    lock = mf.lock_key("item:{name}", name="a")

    def fetch(name: str) -> str:
        # The first leader's lease ran out and a second leader took the lock.
        real_client.delete(lock)
        real_client.set(lock, "second-leader", px=5_000)
        return "first"

    result = mf.cached_dataset("item:{name}")(fetch).call_with_outcome("a")
    assert (result.value, result.outcome, result.led) == ("first", "leader_fill", True)
    assert real_client.get(lock) == b"second-leader"
    assert 0 < real_client.pttl(lock) <= 5_000
    (record,) = [r for r in caplog.records if hasattr(r, "outcome")]
    assert record.error == "LeaseExpired"  # the first leader says its lease was lost


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_value_landing_between_the_miss_and_the_lock_is_found_by_the_recheck(
    redis_server: RedisServer, real_client: redis.Redis, prefix: str, mode: str
) -> None:
    async_client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        mf = Memofill(
            async_client if mode == "async" else real_client, prefix=prefix, policies=POLICIES
        )
        key = mf.final_key("item:{name}", name="a")
        commands: Any = mf._async or mf._sync
        acquire = commands.acquire

        def land_then_acquire(*args: Any) -> Any:
            real_client.set(key, encode({"from": "another leader"}), px=60_000)
            return acquire(*args)

        commands.acquire = land_then_acquire
        origin_calls: list[str] = []

        if mode == "async":

            async def fetch_async(name: str) -> str:
                origin_calls.append(name)
                return "origin"

            result = await mf.cached_dataset("item:{name}")(fetch_async).call_with_outcome("a")
        else:

            def fetch(name: str) -> str:
                origin_calls.append(name)
                return "origin"

            result = mf.cached_dataset("item:{name}")(fetch).call_with_outcome("a")
        assert (result.value, result.outcome, result.led) == (
            {"from": "another leader"},
            "leader_recheck_hit",
            True,
        )
        assert origin_calls == []
        assert real_client.exists(lock_key(key)) == 0
    finally:
        await async_client.aclose()


# --- ACLs and outages ------------------------------------------------------------------


@pytest.fixture
def no_scripts_user(redis_server: RedisServer, real_client: redis.Redis) -> Iterator[str]:
    name = f"noscripts-{uuid.uuid4().hex[:8]}"
    real_client.acl_setuser(
        name,
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-eval", "-evalsha", "-script"],
    )
    yield name
    real_client.acl_deluser(name)


def test_a_user_denied_scripts_still_gets_values_and_is_told_what_to_grant(
    redis_server: RedisServer,
    no_scripts_user: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without scripts nothing can be locked or written safely: every call fetches, and says why.

    The lock, the conditional write and the marks are scripts; a plain ``SET`` in
    their place could write a value over an invalidation, so none is sent.
    """
    clients = [redis_server.client(username=no_scripts_user, password="secret") for _ in range(2)]
    caches = [Memofill(c, prefix=prefix, policies=POLICIES) for c in clients]
    calls: list[str] = []

    def origin(name: str) -> dict[str, str]:
        calls.append(name)
        return {"name": name}

    fetches = [cache.cached_dataset("fast:{name}")(origin) for cache in caches]
    caplog.set_level(logging.INFO, logger="memofill")
    results = [fetch.call_with_outcome("a") for fetch in fetches for _ in range(2)]
    assert [r.value for r in results] == [{"name": "a"}] * 4
    assert {r.outcome for r in results} == {"lock_error"}
    assert calls == ["a"] * 4
    assert not redis_server.client().exists(prefix + "fast:a")  # nothing written unguarded
    told = [r for r in caplog.records if r.levelno == logging.ERROR]
    about_marks = [r for r in told if "invalidation marks" in r.getMessage()]
    assert len(about_marks) == 2  # once per instance (and dataset), naming what to grant
    assert all("acl_rule" in r.getMessage() for r in about_marks)
    for client in clients:
        client.close()


def test_redis_stopped_twenty_threads_one_origin_call_no_exception(
    own_redis_server: RedisServer,
) -> None:
    client = fast_failing_client(own_redis_server)
    mf = Memofill(client, prefix="down:", policies=POLICIES)
    own_redis_server.stop()
    calls: list[str] = []

    @mf.cached_dataset("item:{name}")
    def fetch(name: str) -> dict[str, str]:
        calls.append(name)
        time.sleep(0.3)
        return {"name": name}

    barrier = threading.Barrier(20)
    seen: list[Any] = []

    def call() -> None:
        barrier.wait(PATIENCE_S)
        try:
            seen.append(fetch.call_with_outcome("a"))
        except Exception as exc:
            seen.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE_S)
    assert calls == ["a"]
    assert all(getattr(r, "value", None) == {"name": "a"} for r in seen), seen
    outcomes = Counter(r.outcome for r in seen)
    assert outcomes["lock_error"] == 1
    assert set(outcomes) <= {"lock_error", "local_join", "fallback_hit"}
    assert mf.breaker.is_open
    client.close()


def test_while_redis_is_down_recent_values_are_served_locally_then_redis_again(
    own_redis_server: RedisServer,
) -> None:
    client = fast_failing_client(own_redis_server)
    mf = Memofill(client, prefix="outage:", policies=POLICIES, breaker_cooldown_s=0.2)
    calls: list[str] = []

    @mf.cached_dataset("item:{name}")
    def fetch(name: str) -> dict[str, Any]:
        calls.append(name)
        return {"name": name, "call": len(calls)}

    fetch("warm")
    own_redis_server.stop()
    assert fetch.call_with_outcome("warm").outcome == "fallback_hit"  # the GET failed
    assert mf.breaker.is_open
    assert fetch.call_with_outcome("warm").outcome == "fallback_hit"  # Redis not even tried
    cold = fetch.call_with_outcome("cold")
    assert (cold.outcome, cold.value) == ("lock_error", {"name": "cold", "call": 2})
    assert calls == ["warm", "cold"]
    own_redis_server.start()  # empty: the server keeps nothing on disk
    time.sleep(0.3)  # the breaker's cool-down
    assert fetch.call_with_outcome("warm").outcome == "leader_fill"
    assert fetch.call_with_outcome("warm").outcome == "hit"
    assert calls == ["warm", "cold", "warm"]
    client.close()


OUTAGE_FILL = CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200)


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


@pytest.mark.parametrize(
    ("ttl_s", "stale_if_error_s", "read_at", "served_at"),
    [(2.0, 0.0, 1.0, 1.0), (1.0, 1.0, 0.5, 1.6)],
    ids=["ttl", "ttl+stale_if_error"],
)
def test_an_outage_copy_is_served_until_its_window_after_the_fetch_began_not_after(
    own_redis_server: RedisServer,
    ttl_s: float,
    stale_if_error_s: float,
    read_at: float,
    served_at: float,
) -> None:
    """ttl_s + stale_if_error_s (2 s in both cases), counted from the fetch start.

    Another process reads the value ``read_at`` after its fetch began. Timed
    from that read, and without stale_if_error_s, its copy was served until
    ``read_at + ttl_s`` (measured before: 2.94-3.01 s after the fetch with
    ttl_s=2, read at 1 s); it is now served until 2 s after the fetch: at
    ``served_at`` still, at 2.5 s no longer.
    """
    policy = Dataset(
        "item:{name}", ttl_s=ttl_s, stale_if_error_s=stale_if_error_s, cache_fill=OUTAGE_FILL
    )
    writer_client = fast_failing_client(own_redis_server)
    reader_client = fast_failing_client(own_redis_server)
    writer = Memofill(writer_client, prefix="win:", policies={policy.key: policy})
    reader = Memofill(reader_client, prefix="win:", policies={policy.key: policy})
    origin = {"call": 0}

    def fetch(name: str) -> dict[str, Any]:
        origin["call"] += 1
        return {"name": name, "call": origin["call"]}

    write = writer.cached_dataset(policy.key)(fetch)
    read = reader.cached_dataset(policy.key)(fetch)
    fetched = time.monotonic()
    assert write.call_with_outcome("a").outcome == "leader_fill"
    sleep_until(fetched + read_at - 0.1)  # fresh for ttl_s: a hit, kept from now
    assert read.call_with_outcome("a").outcome == "hit"
    own_redis_server.stop()
    sleep_until(fetched + served_at)
    served = read.call_with_outcome("a")
    assert time.monotonic() - fetched < 1.8  # within the 2 s window, with room to spare
    assert (served.outcome, served.value) == ("fallback_hit", {"name": "a", "call": 1})
    sleep_until(fetched + 2.5)  # past the window
    late = read.call_with_outcome("a")
    assert (late.outcome, late.value) == ("lock_error", {"name": "a", "call": 2})
    for client in (writer_client, reader_client):
        client.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_once_redis_answers_again_its_value_wins_over_the_outage_copy(
    own_redis_server: RedisServer, mode: str
) -> None:
    """Redis restarted, a new value written: the next call gets it, cool-down or not.

    The breaker's cool-down is 30 s here; before, the outage copy was served
    until it ended (0.85 s after a new write was measured with the default 1 s).
    """
    new = fast_failing_client(own_redis_server)
    if mode == "async":
        client: Any = redis.asyncio.Redis(  # as fast_failing_client: no retries
            port=own_redis_server.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=AsyncRetry(NoBackoff(), 0),
        )
        mf = Memofill(async_client=client, prefix="back:", policies=POLICIES, breaker_cooldown_s=30)
    else:
        client = fast_failing_client(own_redis_server)
        mf = Memofill(client, prefix="back:", policies=POLICIES, breaker_cooldown_s=30)
    version = ["before"]

    def origin(name: str) -> dict[str, str]:
        return {"name": name, "version": version[0]}

    async def origin_async(name: str) -> dict[str, str]:
        return origin(name)

    cached = mf.cached_dataset("item:{name}")(origin_async if mode == "async" else origin)

    async def call() -> Any:
        result = cached.call_with_outcome("a")
        return await result if mode == "async" else result

    assert (await call()).outcome == "leader_fill"
    own_redis_server.stop()
    assert (await call()).outcome == "fallback_hit"
    assert mf.breaker.is_open
    own_redis_server.start()  # empty: the server keeps nothing on disk
    version[0] = "after"
    writer = Memofill(new, prefix="back:", policies=POLICIES)  # another process writes
    assert writer.cached_dataset("item:{name}")(origin).call_with_outcome("a").outcome == (
        "leader_fill"
    )
    await asyncio.sleep(0.2)  # a probe falls due (every 50 ms after a refused connection)
    result = await call()
    assert (result.outcome, result.value) == ("hit", {"name": "a", "version": "after"})
    assert not mf.breaker.is_open  # Redis answered: the breaker closed
    new.close()
    if mode == "async":
        await client.aclose()
    else:
        client.close()


# -- followers are told how a fill ended, even when nothing was stored --------------------------


@pytest.mark.parametrize("ending", ["raises", "returns None"])
def test_without_negative_entries_followers_are_told_at_once(
    real_client: redis.Redis, prefix: str, ending: str
) -> None:
    """``negative_ttl_s = 0``: no marker under the key, yet no follower waits out ``wait_ms``."""
    quiet = Dataset(
        "told:{name}",
        ttl_s=60,
        negative_ttl_s=0,
        cache_fill=CacheFill(lease_ms=60_000, wait_ms=30_000, poll_min_ms=10, poll_max_ms=250),
    )
    leader_fetches, follower_fetches = [], []

    def leader_fetch(name: str) -> Any:
        leader_fetches.append(name)
        time.sleep(0.3)
        if ending == "raises":
            raise LookupError("upstream said no")
        return None

    def follower_fetch(name: str) -> Any:
        follower_fetches.append(name)
        return {"name": name}

    # Two instances: two processes' worth of coordination, without process-local joining.
    leader = Memofill(real_client, prefix=prefix, policies={quiet.key: quiet})
    follower = Memofill(real_client, prefix=prefix, policies={quiet.key: quiet})
    lead = leader.cached_dataset(quiet.key)(leader_fetch)
    follow = follower.cached_dataset(quiet.key)(follower_fetch)
    outcome: dict[str, Any] = {}

    def run_leader() -> None:
        try:
            outcome["leader"] = lead.call_with_outcome("x")
        except LookupError as exc:
            outcome["leader"] = exc

    thread = threading.Thread(target=run_leader)
    thread.start()
    wait_until(lambda: leader_fetches, PATIENCE_S)  # the leader holds the lock and is fetching
    started = time.monotonic()
    try:
        outcome["follower"] = follow.call_with_outcome("x")
    except FillError as exc:
        outcome["follower"] = exc
    waited = time.monotonic() - started
    thread.join()

    assert leader_fetches == ["x"]
    assert follower_fetches == []
    assert waited < quiet.cache_fill.wait_ms / 1000  # told when the fetch ended, not after
    assert real_client.exists(lead.redis_key("x")) == 0  # nothing was stored
    if ending == "raises":
        assert isinstance(outcome["leader"], LookupError)
        assert isinstance(outcome["follower"], FillError)
        assert "LookupError" in str(outcome["follower"])
    else:
        assert outcome["leader"].outcome == "negative"
        assert (outcome["follower"].value, outcome["follower"].outcome) == (None, "follower_hit")


# -- keys cover every argument ---------------------------------------------------------------

LANG_POLICIES = {
    key: Dataset(key, ttl_s=60, cache_fill=POLICIES["item:{name}"].cache_fill)
    for key in ("b:{topic}", "b:{topic}:{lang}", "p:{topic}/{page}")
}


def test_an_unkeyed_argument_is_refused_and_a_keyed_one_gets_its_own_value(
    real_client: redis.Redis, prefix: str
) -> None:
    """The issue's case: ``lang`` left out of the key once served English to French callers."""
    mf = Memofill(real_client, prefix=prefix, policies=LANG_POLICIES)

    def b(topic: str, lang: str = "en") -> dict[str, str]:
        return {"topic": topic, "lang": lang}

    with pytest.raises(KeyTemplateError, match=r"parameter 'lang' is not in the key"):
        mf.cached_dataset("b:{topic}")(b)
    assert real_client.keys(f"{prefix}*") == []

    keyed = mf.cached_dataset("b:{topic}:{lang}")(b)
    assert keyed("rates") == {"topic": "rates", "lang": "en"}
    assert keyed("rates", lang="fr") == {"topic": "rates", "lang": "fr"}
    assert keyed.call_with_outcome("rates", lang="fr").outcome == "hit"
    assert keyed.call_with_outcome("rates").value == {"topic": "rates", "lang": "en"}
    assert stored_payload(real_client.get(f"{prefix}b:rates:fr")) == encode(
        {"topic": "rates", "lang": "fr"}
    )
    assert stored_payload(real_client.get(f"{prefix}b:rates:en")) == encode(
        {"topic": "rates", "lang": "en"}
    )


def test_an_int_its_text_and_none_are_three_entries(real_client: redis.Redis, prefix: str) -> None:
    mf = Memofill(real_client, prefix=prefix, policies=LANG_POLICIES)
    calls: list[object] = []

    @mf.cached_dataset("p:{topic}/{page}")
    def page(topic: str, page: int | str | None = None) -> str:
        calls.append(page)
        return f"{topic} page {page!r}"

    for value in (42, "42", None, "None", ""):
        assert page("rates", value) == f"rates page {value!r}"
        assert page.call_with_outcome("rates", value).outcome == "hit"
    assert calls == [42, "42", None, "None", ""]
    assert sorted(real_client.keys(f"{prefix}p:rates/*")) == sorted(
        f"{prefix}p:rates/{text}".encode() for text in ("42", "%342", "~n", "None", "")
    )


# --- typed values across processes ---------------------------------------------------------


@pytest.mark.slow
def test_typed_values_filled_in_one_process_come_back_typed_in_another(
    redis_server: RedisServer, real_client: redis.Redis, prefix: str
) -> None:
    filler = multiprocessing.get_context("spawn").Process(
        target=typed_values.fill_in_this_process, args=(redis_server.port, prefix)
    )
    filler.start()
    filler.join(60)
    assert filler.exitcode == 0

    def must_not_fetch(kind: str) -> Any:
        raise AssertionError(f"{kind} was not filled by the other process")

    mf = Memofill(
        real_client, prefix=prefix, policies={typed_values.DATASET.key: typed_values.DATASET}
    )
    for kind, function in typed_values.functions(mf, must_not_fetch).items():
        result = function.call_with_outcome(kind)
        expected = typed_values.VALUES[kind]
        assert result.outcome == "hit"
        assert result.value == expected
        assert type(result.value) is type(expected)
