"""Near copies on a real redis-server: served fast, dropped when Redis says so, never past near_ms.

Each fault test runs a reader that calls a near-cached function as fast as it
can while a writer changes the value in Redis every few milliseconds, and a
fault strikes the listener (its connection killed, its thread paused, the event
loop blocked, Redis restarted or flushed). Every read the reader sends to Redis
is recorded with the time it was sent and the listener's session then; the
contract is checked on every near hit: the value was read less than
``near_ms`` before the call, in the listener session of the call (no copy
survives a listener loss), and the writes are seen in the end.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio

from memofill import CacheFill, ConfigurationError, Dataset, Memofill, NearCache
from memofill.codec import payload, read_header
from memofill.listener import Listener
from tests.support.redis_servers import RedisServer

PATIENCE_S = 10.0

pytestmark = pytest.mark.redis_server

NEAR_MS = 300
POLICIES = {
    "hot:{name}": Dataset("hot:{name}", ttl_s=60, near_ms=NEAR_MS),
    "cold:{name}": Dataset("cold:{name}", ttl_s=60),
}
#: Short heartbeats: a lost or paused listener stops its copies within 100 ms.
NEAR = NearCache(heartbeat_ms=50)


def listener_of(mf: Memofill) -> Listener:
    listener = mf.local_store.listener
    assert isinstance(listener, Listener)
    return listener


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def wait_live(mf: Memofill, call: Callable[[], Any]) -> None:
    """Start the listener (the first near read does) and wait for its first answered ping."""
    call()
    wait_until(lambda: mf.local_store.live_until > time.monotonic())


def _body(raw: bytes | None) -> bytes | None:
    """The value's own bytes, without the header a fill writes in front of them."""
    return None if raw is None else bytes(payload(raw))


class Reads:
    """Records every read the instance sends for a near copy: (sent at, payload, session)."""

    def __init__(self, mf: Memofill, *, is_async: bool = False) -> None:
        self.mf = mf
        self.log: list[tuple[float, bytes | None, int]] = []
        commands: Any = mf._async if is_async else mf._sync
        original = commands.read_near
        if is_async:

            async def read_async(key: str) -> Any:
                sent, session = time.monotonic(), self.session()
                reply = await original(key)
                self.log.append((sent, _body(reply[0]), session))
                return reply

            commands.read_near = read_async
        else:

            def read(key: str) -> Any:
                sent, session = time.monotonic(), self.session()
                reply = original(key)
                self.log.append((sent, _body(reply[0]), session))
                return reply

            commands.read_near = read

    def session(self) -> int:
        listener = self.mf.local_store.listener
        return listener.sessions if isinstance(listener, Listener) else 0


Served = list[tuple[float, int, str, Any]]


def check_contract(served: Served, reads: Reads, near_ms: int = NEAR_MS) -> int:
    """Every near hit: read < near_ms before the call, in the listener session of the call."""
    near_hits = 0
    for called, session, outcome, value in served:
        if outcome != "near_hit":
            continue
        near_hits += 1
        raw = orjson.dumps(value)
        before = [read for read in reads.log if read[0] <= called and read[1] == raw]
        assert before, f"near hit of {value!r} at {called} with no read of it before"
        sent, _, read_session = before[-1]
        assert called - sent < near_ms / 1000, f"{value!r} served {called - sent:.3f} s after"
        assert read_session >= session, (
            f"{value!r} read in session {read_session}, served in {session}"
        )
    return near_hits


class Writer:
    """Writes a new version of the key every ``every_s`` in a thread, as another process."""

    def __init__(self, client: redis.Redis, key: str, every_s: float = 0.02) -> None:
        self.client, self.key, self.every_s = client, key, every_s
        self.version = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.version += 1
            try:
                self.client.set(self.key, orjson.dumps({"v": self.version}), px=60_000)
            except redis.RedisError:
                self.version -= 1  # Redis is down: that version was never written
            self._stop.wait(self.every_s)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make(server: RedisServer, prefix: str, **kwargs: Any) -> tuple[Memofill, Any]:
    mf = Memofill(server.client(), prefix=prefix, policies=POLICIES, near=NEAR, **kwargs)

    @mf.cached_dataset("hot:{name}")
    def hot(name: str) -> dict[str, Any]:
        return {"v": -1}  # the origin: only after a flush or a restart emptied Redis

    return mf, hot


@pytest.fixture
def stores() -> Iterator[list[Memofill]]:
    """Instances whose listeners must stop when the test ends."""
    made: list[Memofill] = []
    yield made
    for mf in made:
        mf.local_store.attach(None)


def run_reader(hot: Any, seconds: float, served: Served, reads: Reads) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        called, session = time.monotonic(), reads.session()
        result = hot.call_with_outcome("k")
        served.append((called, session, result.outcome, result.value))


def finally_fresh(hot: Any, client: redis.Redis, key: str) -> None:
    """Once the writes stop, the reader sees the last one within near_ms (eventually)."""
    last = client.get(key)
    deadline = time.monotonic() + NEAR_MS / 1000 + 5
    while orjson.dumps(hot("k")) != last:
        assert time.monotonic() < deadline, "the last write was never seen"
        time.sleep(0.01)


# -- the fault tests ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("protocol", [2, 3])
def test_a_killed_listener_connection_drops_every_copy_until_tracking_is_back(
    redis_server: RedisServer, stores: list[Memofill], protocol: int
) -> None:
    mf = Memofill(
        redis_server.client(protocol=protocol),
        prefix=f"kill{protocol}:",
        policies=POLICIES,
        near=NEAR,
    )
    stores.append(mf)
    hot = mf.cached_dataset("hot:{name}")(lambda name: {"v": -1})
    admin = redis_server.client()
    reads = Reads(mf)
    key = mf.final_key("hot:{name}", name="k")
    admin.set(key, orjson.dumps({"v": 0}))
    wait_live(mf, lambda: hot("k"))
    served: Served = []
    with Writer(admin, key, every_s=0.05):
        killer = threading.Thread(
            target=lambda: [
                (time.sleep(0.2), admin.client_kill_filter(_type="pubsub")) for _ in range(4)
            ]
        )
        killer.start()
        run_reader(hot, 1.5, served, reads)
        killer.join()
    listener = listener_of(mf)
    assert listener.sessions >= 2  # it came back after the kills
    assert check_contract(served, reads) > 0
    finally_fresh(hot, admin, key)
    # Tracking is on again, broadcast, on the subscribed connection it redirects to.
    clients = {int(c["id"]): c for c in admin.client_list()}
    assert set(clients[listener.client_id]["flags"]) >= set("PtB")


@pytest.mark.slow
def test_a_paused_listener_thread_stops_its_copies_within_near_ms(
    redis_server: RedisServer, stores: list[Memofill]
) -> None:
    mf, hot = make(redis_server, "paused:")
    stores.append(mf)
    admin = redis_server.client()
    reads = Reads(mf)
    key = mf.final_key("hot:{name}", name="k")
    admin.set(key, orjson.dumps({"v": 0}))
    wait_live(mf, lambda: hot("k"))
    listener = listener_of(mf)
    running = threading.Event()
    running.set()
    original = listener._apply

    def paused_apply(*args: Any) -> None:
        running.wait()  # the thread stops here while the test holds it
        original(*args)

    listener._apply = paused_apply  # type: ignore[method-assign]
    served: Served = []
    with Writer(admin, key):
        pauser = threading.Thread(
            target=lambda: (time.sleep(0.2), running.clear(), time.sleep(0.8), running.set())
        )
        pauser.start()
        run_reader(hot, 1.5, served, reads)
        pauser.join()
    assert check_contract(served, reads) > 0
    # While paused, no copy was served past two heartbeats of the last answered ping.
    finally_fresh(hot, admin, key)


@pytest.mark.slow
def test_a_blocked_event_loop_serves_no_copy_past_near_ms(
    redis_server: RedisServer, stores: list[Memofill]
) -> None:
    client = redis.asyncio.Redis(port=redis_server.port)
    mf = Memofill(
        async_client=client,
        prefix="loop:",
        policies=POLICIES,
        near=NEAR,
    )
    stores.append(mf)

    @mf.cached_dataset("hot:{name}")
    async def hot(name: str) -> dict[str, Any]:
        return {"v": -1}

    admin = redis_server.client()
    reads = Reads(mf, is_async=True)
    key = mf.final_key("hot:{name}", name="k")
    admin.set(key, orjson.dumps({"v": 0}))
    served: Served = []

    async def scenario() -> None:
        try:
            await hot("k")
            while mf.local_store.live_until <= time.monotonic():
                await asyncio.sleep(0.005)
            end = time.monotonic() + 1.5
            blocked = False
            while time.monotonic() < end:
                called, session = time.monotonic(), reads.session()
                result = await hot.call_with_outcome("k")
                served.append((called, session, result.outcome, result.value))
                if not blocked and time.monotonic() > end - 1.0:
                    blocked = True
                    time.sleep(0.6)  # the point: the loop is blocked
            # The writer goes on: catch up with a version written now, or any later one.
            written = orjson.loads(admin.get(key) or b"null")["v"]
            deadline = time.monotonic() + NEAR_MS / 1000 + 5
            while (await hot("k"))["v"] < written:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        finally:
            await client.aclose()

    with Writer(admin, key):
        asyncio.run(scenario())
    assert check_contract(served, reads) > 0


@pytest.mark.slow
def test_a_redis_restart_and_a_flush_drop_every_copy(
    own_redis_server: RedisServer, stores: list[Memofill]
) -> None:
    mf, hot = make(own_redis_server, "restart:", breaker_cooldown_s=0.05)
    stores.append(mf)
    admin = own_redis_server.client()
    reads = Reads(mf)
    key = mf.final_key("hot:{name}", name="k")
    admin.set(key, orjson.dumps({"v": 0}))
    wait_live(mf, lambda: hot("k"))
    served: Served = []
    with Writer(admin, key, every_s=0.03):
        faults = threading.Thread(
            target=lambda: (
                time.sleep(0.2),
                own_redis_server.restart(),
                time.sleep(0.3),
                admin.flushdb(),
            )
        )
        faults.start()
        run_reader(hot, 2.0, served, reads)
        faults.join()
    assert listener_of(mf).sessions >= 2
    assert check_contract(served, reads) > 0
    finally_fresh(hot, admin, key)


def test_a_flush_is_seen_at_once_and_the_next_call_fetches(
    redis_server: RedisServer, stores: list[Memofill]
) -> None:
    mf = Memofill(redis_server.client(), prefix="flush:", policies=POLICIES, near=NearCache())
    stores.append(mf)
    calls = []

    @mf.cached_dataset("hot:{name}")
    def hot(name: str) -> dict[str, Any]:
        calls.append(name)
        return {"v": len(calls)}

    wait_live(mf, lambda: hot("k"))
    hot("k")
    assert hot.call_with_outcome("k").outcome == "near_hit"
    epoch = mf.local_store.epoch
    redis_server.client().flushdb()
    wait_until(lambda: mf.local_store.epoch > epoch)
    assert hot("k") == {"v": 2}


def test_a_write_elsewhere_drops_the_copy_long_before_near_ms(
    redis_server: RedisServer, stores: list[Memofill]
) -> None:
    policies = {"hot:{name}": Dataset("hot:{name}", ttl_s=600, near_ms=300_000)}
    mf = Memofill(redis_server.client(), prefix="inv:", policies=policies)
    stores.append(mf)
    hot = mf.cached_dataset("hot:{name}")(lambda name: {"v": 0})
    wait_live(mf, lambda: hot("k"))
    # A copy is made by a read while the listener is live (a busy machine may need a few).
    wait_until(lambda: hot.call_with_outcome("k").outcome == "near_hit", timeout_s=10)
    redis_server.client().set("inv:hot:k", orjson.dumps({"v": 1}))
    wait_until(lambda: hot("k") == {"v": 1}, timeout_s=10)  # not near_ms: 5 minutes


def test_reads_of_a_hot_key_are_at_most_one_per_near_ms_plus_one_per_write(
    redis_server: RedisServer, stores: list[Memofill]
) -> None:
    # Heartbeats of 1 s: a busy machine delaying the listener must not be what is counted.
    mf = Memofill(
        redis_server.client(),
        prefix="reads:",
        policies=POLICIES,
        near=NearCache(heartbeat_ms=1000),
    )
    stores.append(mf)
    hot = mf.cached_dataset("hot:{name}")(lambda name: {"v": 0})
    wait_live(mf, lambda: hot("k"))
    reads = Reads(mf)
    admin = redis_server.client()
    started = time.monotonic()
    writes = 0
    calls = 0
    while time.monotonic() - started < 1.5:
        hot("k")
        calls += 1
        if calls % 20_000 == 0:
            admin.set("reads:hot:k", orjson.dumps({"v": calls}))
            writes += 1
    elapsed = time.monotonic() - started
    assert calls > 1000
    assert len(reads.log) <= elapsed / (NEAR_MS / 1000) + 1 + writes


def test_a_forked_child_starts_its_own_listener(
    redis_server: RedisServer, stores: list[Memofill]
) -> None:
    mf, hot = make(redis_server, "fork:")
    stores.append(mf)
    redis_server.client().set("fork:hot:k", orjson.dumps({"v": 7}))
    wait_live(mf, lambda: hot("k"))
    hot("k")  # read while the listener is live: kept
    assert hot.call_with_outcome("k").outcome == "near_hit"
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_child_near_hits, args=(mf, hot, results))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        child.start()
    got = results.get(timeout=60)
    child.join(timeout=10)
    assert got == {"first": "hit", "later": "near_hit", "own_listener": True}
    assert hot.call_with_outcome("k").outcome == "near_hit"  # the parent's is untouched


def _child_near_hits(mf: Memofill, hot: Any, results: Any) -> None:  # pragma: no cover - child
    pid = os.getpid()
    first = hot.call_with_outcome("k").outcome  # no copy trusted from the parent
    deadline = time.monotonic() + 30
    while mf.local_store.live_until <= time.monotonic() and time.monotonic() < deadline:
        hot("k")
        time.sleep(0.01)
    hot("k")
    later = hot.call_with_outcome("k").outcome
    listener = listener_of(mf)
    results.put({"first": first, "later": later, "own_listener": listener._pid == pid})


def test_near_tracking_on_redis_cluster_is_refused_with_the_reason(
    redis_cluster: Any,
) -> None:
    mf = Memofill(redis_cluster.client(), prefix="c:", policies=POLICIES)
    hot = mf.cached_dataset("hot:{name}")(lambda name: {"v": 0})
    with pytest.raises(ConfigurationError, match="not supported on Redis Cluster"):
        hot("k")
    cold = mf.cached_dataset("cold:{name}")(lambda name: {"v": 0})
    assert cold("k") == {"v": 0}  # datasets without near_ms are unaffected
    ttl = Memofill(
        redis_cluster.client(),
        prefix="c:",
        policies=POLICIES,
        near=NearCache(invalidation="ttl"),
    )
    hot_ttl = ttl.cached_dataset("hot:{name}")(lambda name: {"v": 0})
    hot_ttl("k")  # fills: a fill's own value is not kept near (its write invalidates it)
    hot_ttl("k")  # read: kept
    assert hot_ttl.call_with_outcome("k").outcome == "near_hit"


def test_an_instance_without_near_datasets_runs_no_listener_and_a_hit_is_one_get(
    own_redis_server: RedisServer,
) -> None:
    admin = own_redis_server.client()
    policies = {"cold:{name}": POLICIES["cold:{name}"]}
    mf = Memofill(own_redis_server.client(), prefix="plain:", policies=policies)  # default near=
    cold = mf.cached_dataset("cold:{name}")(lambda name: {"v": 0})
    assert cold("k") == {"v": 0}
    admin.config_resetstat()
    started = time.monotonic()
    for _ in range(200):
        assert cold.call_with_outcome("k").outcome == "hit"
    seconds = time.monotonic() - started
    stats = admin.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(data["calls"]) for name, data in stats.items()}
    calls.pop("config|resetstat", None)
    # The dataset generations are read once per meta_check_ms (1 s), whatever the near cache.
    assert calls.pop("hgetall", 0) <= seconds + 1
    assert calls == {"get": 200}
    assert mf.local_store.listener is None
    clients = admin.client_list()
    assert len(clients) == 2  # the instance's one connection, and this one
    assert not any("t" in client["flags"] or client["sub"] != "0" for client in clients)


def test_a_near_copy_is_never_served_past_the_values_freshness(
    redis_server: RedisServer,
) -> None:
    fill = CacheFill(
        lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200, refresh_retry_ms=1_000
    )
    dataset = Dataset("fresh:{name}", ttl_s=3, stale_s=30, near_ms=3_000, cache_fill=fill)
    mf = Memofill(
        redis_server.client(),
        prefix="freshness:",
        policies={dataset.key: dataset},
        near=NearCache(invalidation="ttl"),
    )
    fresh = mf.cached_dataset(dataset.key)(lambda name: {"v": 0})
    assert fresh.call_with_outcome("k").outcome == "leader_fill"
    header = read_header(redis_server.client().get(mf.final_key(dataset.key, name="k")) or b"")
    assert header is not None

    def wait_for_wall_ms(ms: float) -> None:
        while time.time() * 1000 < ms:
            time.sleep(0.01)

    # Read half-way through its freshness: near_ms alone would keep the copy 1.5 s past it.
    wait_for_wall_ms(header.fetch_start_ms + 1_500)
    assert fresh.call_with_outcome("k").outcome == "hit"  # read from Redis, kept near
    assert fresh.call_with_outcome("k").outcome == "near_hit"
    wait_for_wall_ms(header.soft_until_ms + 100)
    assert fresh.call_with_outcome("k").outcome == "stale_hit"  # Redis decides, not the copy


def test_the_near_gauges_say_whether_copies_are_served_and_count_flushes(
    redis_server: RedisServer, stores: list[Memofill]
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    from memofill.contrib.prometheus import MemofillCollector  # noqa: PLC0415

    mf, hot = make(redis_server, "gauges:")
    stores.append(mf)
    registry = CollectorRegistry()
    registry.register(MemofillCollector(mf))

    def sample(name: str) -> float:
        value = registry.get_sample_value(name)
        assert value is not None, generate_latest(registry).decode()
        return value

    wait_live(mf, lambda: hot("k"))
    hot("k")  # a Redis hit, kept near
    assert hot.call_with_outcome("k").outcome == "near_hit"
    assert sample("memofill_near_serving") == 1.0
    assert sample("memofill_local_store_entries") >= 1
    flushes = sample("memofill_near_flushes_total")
    assert redis_server.client().client_kill_filter(_type="pubsub") >= 1
    wait_until(lambda: sample("memofill_near_flushes_total") > flushes)
    wait_live(mf, lambda: hot("k"))  # tracking is back
    assert sample("memofill_near_serving") == 1.0
    # An invalidation drops every copy too, and is counted apart: it is not a lost listener.
    flushes, clears = (
        sample("memofill_near_flushes_total"),
        sample("memofill_local_store_clears_total"),
    )
    mf.invalidate_dataset("hot:{name}")
    # (Its own clear, and one more each time the listener hears the marks change.)
    assert sample("memofill_local_store_clears_total") > clears
    assert sample("memofill_near_flushes_total") == flushes
    near_hits = registry.get_sample_value(
        "memofill_calls_total", {"dataset": "hot:{name}", "outcome": "near_hit"}
    )
    assert near_hits is not None
    assert near_hits >= 1


def test_without_near_datasets_there_is_no_near_serving_sample(redis_server: RedisServer) -> None:
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from memofill.contrib.prometheus import MemofillCollector  # noqa: PLC0415

    mf = Memofill(
        redis_server.client(), prefix="nonear:", policies={"cold:{name}": POLICIES["cold:{name}"]}
    )
    registry = CollectorRegistry()
    registry.register(MemofillCollector(mf))
    assert registry.get_sample_value("memofill_near_serving") is None
    assert registry.get_sample_value("memofill_near_flushes_total") == 0.0


class _WritesBeforeSubscribe:
    """A socket that, before it sends ``SUBSCRIBE``, has another client write ``key``.

    Redis tells the listener of that write at once (tracking is on), so the
    invalidation reaches it ahead of the subscription's confirmation: the race
    a busy prefix makes on every reconnection.
    """

    def __init__(self, sock: Any, write: Callable[[], object]) -> None:
        self._sock, self._write = sock, write

    def sendall(self, data: bytes) -> None:
        if b"SUBSCRIBE" in data:
            self._write()
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_an_invalidation_ahead_of_the_subscription_is_applied_not_taken_for_a_loss(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """RESP3 pushes an invalidation as soon as tracking is on (RESP2 drops it until the
    subscription, which no copy needs: none is kept until the subscription is confirmed)."""
    from memofill.listener import connection_factory  # noqa: PLC0415
    from memofill.near import LocalStore  # noqa: PLC0415

    caplog.set_level(logging.DEBUG, logger="memofill")
    writer = redis_server.client()
    store = LocalStore(max_entries=100, max_bytes=1 << 20)
    told = threading.Event()
    store.watch = {"race:#meta": told.set}
    opened = connection_factory(redis_server.client(protocol=3), 5.0)
    assert opened is not None

    def connect() -> Any:
        connection = opened()
        connection._sock = _WritesBeforeSubscribe(
            connection._sock, lambda: writer.set("race:#meta", "1")
        )
        return connection

    listener = Listener(store, connect, ("race:",), heartbeat_ms=1_000)
    store.attach(listener)
    listener.ensure_running()
    try:
        assert told.wait(PATIENCE_S), "the write ahead of the subscription was not applied"
        wait_until(lambda: listener.sessions >= 1)
        assert not [r for r in caplog.records if "SUBSCRIBE answered" in r.getMessage()]
    finally:
        listener.stop()
        writer.close()


def test_a_lost_listener_is_told_once_and_each_later_loss_counted(
    redis_server: RedisServer, stores: list[Memofill], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="memofill")
    mf, hot = make(redis_server, "lost:")
    stores.append(mf)
    wait_live(mf, lambda: hot("k"))
    listener = listener_of(mf)
    flushes = mf.local_store.flushes
    for kill in range(1, 4):
        assert redis_server.client().client_kill_filter(_type="pubsub") >= 1
        wait_until(lambda kill=kill: listener.sessions == 1 + kill)  # back each time
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1
    assert "told once: later losses are logged at DEBUG" in warned[0].getMessage()
    later = [r for r in caplog.records if r.getMessage().startswith("near-cache listener:")]
    assert len(later) >= 2  # the later kills (a loaded machine may lose a ping too)
    assert {r.levelno for r in later} == {logging.DEBUG}
    assert mf.local_store.flushes >= flushes + 3
