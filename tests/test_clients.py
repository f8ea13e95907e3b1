"""``memofill.redis_client``: the recommended client, and that memofill works through it."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

import memofill
from memofill import ConfigurationError, Memofill
from tests.conftest import POLICIES
from tests.support.redis_servers import RedisCluster, RedisServer


def test_a_blocking_client_on_a_blocking_pool_with_the_documented_settings() -> None:
    client = memofill.redis_client("redis://127.0.0.1:1/0", max_connections=7)
    pool = client.connection_pool
    assert type(client) is redis.Redis
    assert type(pool) is redis.BlockingConnectionPool
    assert (pool.max_connections, pool.timeout) == (7, 5.0)
    kwargs = pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (1.0, 1.0)
    assert kwargs["retry"].get_retries() == 1
    assert not client.get_encoder().decode_responses
    client.close()


async def test_an_asyncio_client_on_the_asyncio_blocking_pool() -> None:
    client = memofill.redis_client(
        "redis://127.0.0.1:1/0", asyncio=True, socket_timeout=2.0, pool_timeout=3.0, retries=0
    )
    pool = client.connection_pool
    assert type(client) is redis.asyncio.Redis
    assert type(pool) is redis.asyncio.BlockingConnectionPool
    assert (pool.max_connections, pool.timeout) == (50, 3.0)
    assert pool.connection_kwargs["socket_timeout"] == 2.0
    assert pool.connection_kwargs["retry"].get_retries() == 0
    await client.aclose()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_connections": 0}, "max_connections=0"),
        ({"socket_timeout": 0}, "socket_timeout"),
        ({"pool_timeout": -1}, "pool_timeout"),
        ({"retries": -1}, "retries=-1"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        memofill.redis_client("redis://127.0.0.1:1/0", **kwargs)


@pytest.mark.redis_server
def test_memofill_fills_and_hits_through_it(redis_server: RedisServer) -> None:
    client = memofill.redis_client(redis_server.url, max_connections=4)
    mf = Memofill(client, prefix="clients:", policies=POLICIES)
    calls: list[str] = []

    @mf.cached_dataset("item:{name}")
    def fetch(name: str) -> dict[str, str]:
        calls.append(name)
        return {"name": name}

    assert fetch.call_with_outcome("a").outcome == "leader_fill"
    assert fetch.call_with_outcome("a").outcome == "hit"
    assert calls == ["a"]
    client.close()


@pytest.mark.redis_server
def test_a_cluster_url_gives_a_cluster_client(redis_cluster: RedisCluster) -> None:
    url = f"redis://127.0.0.1:{redis_cluster.nodes[0].port}/0"
    client = memofill.redis_client(url, cluster=True, max_connections=5)
    assert type(client) is redis.cluster.RedisCluster
    mf = Memofill(client, prefix="{clients}:", policies=POLICIES)

    @mf.cached_dataset("item:{name}")
    def fetch(name: str) -> dict[str, str]:
        return {"name": name}

    assert fetch("a") == {"name": "a"}
    assert fetch.call_with_outcome("a").outcome == "hit"
    client.close()
