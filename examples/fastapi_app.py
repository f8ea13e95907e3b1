"""A FastAPI service whose quotes come from a slow pricing service, cached with memofill.

Served by uvicorn, one process or several::

    REDIS_URL=redis://localhost:6379/0 uvicorn fastapi_app:app --workers 2

Each worker process runs the lifespan: it makes its own asyncio client, hands it
to memofill, and closes it at shutdown. With ``REDIS_CLUSTER_URL`` instead, the
client is a Redis Cluster client, which learns the cluster's slots before the
first request.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import memofill
import redis.asyncio
import redis.asyncio.cluster
from fastapi import FastAPI
from memofill.contrib.otel import instrument
from memofill.contrib.prometheus import MemofillCollector
from prometheus_client import CollectorRegistry, make_asgi_app
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import upstream_calls

#: Connections per worker process. Callers of one key share one fill in the process, so
#: past the hits' GETs in flight this bounds the distinct keys being filled or waited for
#: at once, not requests; a request that finds none free waits for one (a blocking pool).
MAX_CONNECTIONS = 64
#: Connections per cluster node: redis-py's asyncio cluster client has no blocking pool, and
#: fails a command past this limit, so it must exceed the requests a worker serves at once.
CLUSTER_MAX_CONNECTIONS = 1024


@memofill.cached_dataset("fastapi:quotes:{symbol}")
async def fetch_quote(symbol: str) -> dict[str, Any]:
    """The slow upstream: a pricing service that takes a fifth of a second."""
    upstream_calls.record(f"quote {symbol}")
    await asyncio.sleep(0.2)
    return {"symbol": symbol, "price": price_of(symbol)}


def price_of(symbol: str) -> float:
    """The pricing service's answer: made up, but the same in every process."""
    return sum(map(ord, symbol)) / 10


async def connect() -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """An asyncio client on ``REDIS_URL``, or on ``REDIS_CLUSTER_URL`` for a Redis Cluster."""
    # A stalled Redis costs a command socket_timeout; an unreachable one, the connect time-out.
    timeouts = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0}
    cluster_url = os.environ.get("REDIS_CLUSTER_URL")
    if cluster_url:
        cluster = redis.asyncio.cluster.RedisCluster.from_url(
            cluster_url, max_connections=CLUSTER_MAX_CONNECTIONS, **timeouts
        )
        # Learn the slots now: a burst of first requests on a client that has not yet
        # would race its lazy set-up, and those fills would not be coordinated.
        await cluster.initialize()
        return cluster
    # A blocking pool: past MAX_CONNECTIONS a command waits up to `timeout` seconds
    # for a free connection, where a plain pool would fail it.
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        os.environ["REDIS_URL"],
        max_connections=MAX_CONNECTIONS,
        timeout=5.0,
        retry=Retry(NoBackoff(), 1),  # one retry on a fresh connection, not redis-py's ten
        **timeouts,
    )
    return redis.asyncio.Redis.from_pool(pool)  # the client owns the pool and closes it


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Configure memofill in this worker process; close its client at shutdown."""
    client = await connect()
    memofill.configure(async_client=client, prefix="quotes-api:")
    try:
        yield
    finally:
        await client.aclose()


app = FastAPI(lifespan=lifespan)
# This worker's numbers at /metrics for Prometheus, read when scraped (a hit pays nothing);
# OpenTelemetry's instruments and spans too, no-ops until the application sets up the SDK.
METRICS = CollectorRegistry()
METRICS.register(MemofillCollector())
app.mount("/metrics", make_asgi_app(registry=METRICS))
instrument()


@app.get("/quotes/{symbol}")
async def quote(symbol: str) -> dict[str, Any]:
    return await fetch_quote(symbol)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
