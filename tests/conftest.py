"""Shared fixtures: fakeredis for unit tests, private real redis-servers for integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, settings

from memofill import CacheFill, Dataset
from memofill.repeats import REPEATS
from tests.support.helpers import close_test_clients
from tests.support.redis_servers import RedisCluster, RedisServer

# How fast a busy machine draws examples or runs one says nothing about the properties tested:
# no per-example deadline, and no failing a test because input generation was slow.
settings.register_profile("memofill", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("memofill")

#: Policies the runtime tests use, independent of the project's registry.
POLICIES = {
    "item:{name}": Dataset(
        "item:{name}",
        ttl_s=60,
        negative_ttl_s=30,
        cache_fill=CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200),
    ),
    "fast:{name}": Dataset(
        "fast:{name}",
        ttl_s=60,
        negative_ttl_s=30,
        cache_fill=CacheFill(lease_ms=1_000, wait_ms=500, poll_min_ms=5, poll_max_ms=50),
    ),
    "plain:{name}": Dataset("plain:{name}", ttl_s=60),
    "careful:{name}": Dataset(
        "careful:{name}",
        ttl_s=60,
        error_ttl_s=5,
        cache_fill=CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200),
    ),
}


@pytest.fixture(autouse=True)
def _repeats_told_within_the_test() -> Iterator[None]:
    """A test's repeated warnings are summed up when it ends, not in a later test's records."""
    yield
    REPEATS.flush(all_of_them=True)


@pytest.fixture(autouse=True)
def _clients_closed_at_the_end() -> Iterator[None]:
    """The clients a test gave :func:`~tests.support.helpers.closed_at_end` are closed."""
    yield
    close_test_clients()


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own: tests that share a redis-server never meet."""
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session (tests use their own prefixes)."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A private redis-server for one test that stops, pauses or kills it."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private three-master Redis Cluster for the session."""
    cluster = RedisCluster().start()
    yield cluster
    cluster.close()


@pytest.fixture
def real_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def fake_client(memofill_redis: redis.Redis) -> redis.Redis:
    """The plugin's per-test fakeredis client (``memofill.testing``), as the unit tests name it."""
    return memofill_redis
