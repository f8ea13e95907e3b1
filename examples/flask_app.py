"""A Flask service whose forecasts come from a slow weather service, cached with memofill.

Served by gunicorn, with the settings of ``gunicorn.conf.py`` (2 workers x 16 threads)::

    REDIS_URL=redis://localhost:6379/0 gunicorn -c gunicorn.conf.py "flask_app:create_app()"

gunicorn forks its workers first and then loads the app in each of them (no
``preload_app``), so ``create_app`` runs, and memofill is configured, after the
fork: every worker has its own connections.
"""

from __future__ import annotations

import os
import time
from typing import Any

import memofill
import redis
from flask import Flask, Response
from memofill.contrib.otel import instrument
from memofill.contrib.prometheus import MemofillCollector
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.backoff import NoBackoff
from redis.retry import Retry

import upstream_calls

#: Connections per worker process: one per request thread (gunicorn.conf.py), and a few
#: spare. A thread that finds none free waits for one (a blocking pool), up to 5 s.
MAX_CONNECTIONS = 16 + 4

# This worker's numbers for Prometheus (read at /metrics when scraped), and OpenTelemetry's
# instruments and spans, no-ops until the application sets up the SDK. Once per process.
METRICS = CollectorRegistry()
METRICS.register(MemofillCollector())
instrument()


@memofill.cached_dataset("flask:forecasts:{city}")
def fetch_forecast(city: str) -> dict[str, Any]:
    """The slow upstream: a weather service that takes a fifth of a second."""
    upstream_calls.record(f"forecast {city}")
    time.sleep(0.2)
    return {"city": city, "high_c": high_of(city)}


def high_of(city: str) -> int:
    """The weather service's answer: made up, but the same in every process."""
    return sum(map(ord, city)) % 35


def create_app(redis_url: str | None = None) -> Flask:
    """The application, with memofill configured on ``redis_url`` (default: ``REDIS_URL``)."""
    app = Flask(__name__)
    pool = redis.BlockingConnectionPool.from_url(
        redis_url or os.environ["REDIS_URL"],
        max_connections=MAX_CONNECTIONS,
        timeout=5.0,  # how long a command waits for a free connection
        socket_timeout=2.0,  # a stalled Redis costs a command this long...
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 1),  # ...at most twice
    )
    memofill.configure(redis.Redis.from_pool(pool), prefix="weather-web:")

    @app.get("/forecasts/<city>")
    def forecast(city: str) -> dict[str, Any]:
        return fetch_forecast(city)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(METRICS), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
