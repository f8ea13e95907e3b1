"""A FastAPI service whose quotes come from a slow pricing service, cached with memofill.

Served by uvicorn, one process or several::

    REDIS_URL=redis://localhost:6379/0 uvicorn fastapi_app:app --workers 2

Each worker process runs the lifespan: it makes its own clients, an asyncio one
for the ``async def`` routes and a blocking one for the ``def`` routes (which
FastAPI runs on a thread pool), hands both to memofill, and closes them at
shutdown. With ``REDIS_CLUSTER_URL`` instead, they are Redis Cluster clients,
which learn the cluster's slots before the first request.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import memofill
from fastapi import FastAPI
from memofill.contrib.otel import instrument
from memofill.contrib.prometheus import MemofillCollector
from prometheus_client import CollectorRegistry, make_asgi_app

import upstream_calls

#: Connections per worker process. Callers of one key share one fill in the process, so
#: past the hits' GETs in flight this bounds the distinct keys being filled or waited for
#: at once, not requests; a request that finds none free waits for one (a blocking pool).
MAX_CONNECTIONS = 64
#: Connections per cluster node: redis-py's asyncio cluster client has no blocking pool, and
#: fails a command past this limit, so it must exceed the requests a worker serves at once.
CLUSTER_MAX_CONNECTIONS = 1024
#: The blocking client's connections: one per thread of the pool that runs the ``def``
#: routes (AnyIO's, 40 threads by default), and a few spare.
THREAD_MAX_CONNECTIONS = 40 + 4
#: How long a command may take before memofill falls back: a stalled Redis costs a request
#: this long. 2 s, not the helper's 1 s: CI serves this app on a small, busy machine.
SOCKET_TIMEOUT_S = 2.0


@memofill.cached_dataset("fastapi:quotes:{symbol}")
async def fetch_quote(symbol: str) -> dict[str, Any]:
    """The slow upstream: a pricing service that takes a fifth of a second."""
    upstream_calls.record(f"quote {symbol}")
    await asyncio.sleep(0.2)
    return {"symbol": symbol, "price": price_of(symbol)}


def price_of(symbol: str) -> float:
    """The pricing service's answer: made up, but the same in every process."""
    return sum(map(ord, symbol)) / 10


@memofill.cached_dataset("fastapi:listings:{symbol}")
def fetch_listing(symbol: str) -> dict[str, str]:
    """A blocking upstream: a reference-data SDK without asyncio, called from a ``def`` route."""
    upstream_calls.record(f"listing {symbol}")
    time.sleep(0.1)
    return {"symbol": symbol, "exchange": exchange_of(symbol)}


def exchange_of(symbol: str) -> str:
    """The reference data's answer: made up, but the same in every process."""
    return ("NYSE", "NASDAQ", "LSE")[sum(map(ord, symbol)) % 3]


async def connect() -> tuple[Any, Any]:
    """A blocking and an asyncio client on ``REDIS_URL``, or on ``REDIS_CLUSTER_URL``.

    Both from :func:`memofill.redis_client`: on a blocking pool (past its
    connections a command waits up to 5 s for a free one, where a plain pool
    would fail it), one retry on a fresh connection, not redis-py's ten.
    """
    cluster_url = os.environ.get("REDIS_CLUSTER_URL")
    url = cluster_url or os.environ["REDIS_URL"]
    cluster = cluster_url is not None
    client = memofill.redis_client(
        url,
        cluster=cluster,
        max_connections=THREAD_MAX_CONNECTIONS,
        socket_timeout=SOCKET_TIMEOUT_S,
    )
    async_client = memofill.redis_client(
        url,
        asyncio=True,
        cluster=cluster,
        max_connections=CLUSTER_MAX_CONNECTIONS if cluster else MAX_CONNECTIONS,
        socket_timeout=SOCKET_TIMEOUT_S,
    )
    if cluster:
        # Learn the slots now: a burst of first requests on a client that has not yet
        # would race its lazy set-up, and those fills would not be coordinated.
        await async_client.initialize()
    return client, async_client


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Configure memofill in this worker process; close its clients at shutdown.

    Both clients: the asyncio one serves the coroutine functions (``fetch_quote``),
    the blocking one the plain ones (``fetch_listing``), which fail with a
    ``ConfigurationError`` on an instance that has no blocking client.
    """
    client, async_client = await connect()
    memofill.configure(client, async_client=async_client, prefix="quotes-api:")
    try:
        yield
    finally:
        await async_client.aclose()
        client.close()


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


@app.get("/listings/{symbol}")
def listing(symbol: str) -> dict[str, str]:
    # A def route: FastAPI runs it on its thread pool, so it may block, on the blocking client.
    return fetch_listing(symbol)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
