"""A Redis client made the way memofill's bounds assume, from a URL.

:func:`redis_client` builds a blocking or asyncio redis-py client whose pool
makes a caller wait for a connection rather than fail, whose time-outs bound a
sick Redis without cutting healthy commands short on a busy process, and whose
retry policy does not multiply those time-outs. :doc:`/deployment` explains
each setting and when to change it.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from memofill.errors import ConfigurationError

__all__ = ["redis_client"]

#: How long one command may take: a stalled Redis costs a caller about this before
#: memofill falls back. Under about 1 s, a busy event loop or CPU-bound thread times out
#: replies from a healthy Redis.
SOCKET_TIMEOUT_S = 1.0
#: How long opening a connection may take: what a Redis that does not answer costs.
CONNECT_TIMEOUT_S = 1.0
#: How long a command waits for a free connection from a full pool.
POOL_TIMEOUT_S = 5.0
#: Connections per process (per node, for a cluster).
MAX_CONNECTIONS = 50


def redis_client(
    url: str,
    *,
    asyncio: bool = False,
    cluster: bool = False,
    max_connections: int = MAX_CONNECTIONS,
    socket_timeout: float = SOCKET_TIMEOUT_S,
    socket_connect_timeout: float = CONNECT_TIMEOUT_S,
    pool_timeout: float = POOL_TIMEOUT_S,
    retries: int = 1,
) -> Any:
    """A redis-py client for ``url`` with the settings memofill's bounds assume.

    ``redis.Redis`` (or ``redis.asyncio.Redis`` with ``asyncio=True``) on a
    blocking connection pool of ``max_connections``: past that, a command waits
    up to ``pool_timeout`` seconds for a free connection. Commands time out
    after ``socket_timeout``, connections after ``socket_connect_timeout``, and
    a failed command is retried ``retries`` times at once, on a fresh
    connection. Values come back as bytes, as memofill needs.

    With ``cluster=True``: ``redis.cluster.RedisCluster`` (or its asyncio
    twin), whose pools per node are plain ones of ``max_connections``
    (redis-py has no blocking pool for them; memofill waits for a connection
    itself when one is full). Await ``initialize()`` on the asyncio cluster
    client at start-up, before the first request.

    Make the client in each process, after a pre-forking server forks
    (:doc:`/deployment`).
    """
    if max_connections < 1:
        raise ConfigurationError(
            f"max_connections={max_connections!r}: give at least 1, sized to the callers "
            "one process serves at once"
        )
    if min(socket_timeout, socket_connect_timeout, pool_timeout) <= 0:
        raise ConfigurationError(
            "socket_timeout, socket_connect_timeout and pool_timeout must be positive seconds"
        )
    if retries < 0:
        raise ConfigurationError(f"retries={retries!r}: give 0 or more")
    retry = AsyncRetry(NoBackoff(), retries) if asyncio else Retry(NoBackoff(), retries)
    settings: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "retry": retry,
        "max_connections": max_connections,
    }
    if cluster:
        kind: Any = redis.asyncio.cluster.RedisCluster if asyncio else redis.cluster.RedisCluster
        return kind.from_url(url, **settings)
    if asyncio:
        pool: Any = redis.asyncio.BlockingConnectionPool.from_url(
            url, timeout=pool_timeout, **settings
        )
        return redis.asyncio.Redis.from_pool(pool)
    pool = redis.BlockingConnectionPool.from_url(url, timeout=pool_timeout, **settings)
    return redis.Redis.from_pool(pool)
