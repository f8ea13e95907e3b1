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
from flask import Flask, Response
from memofill.contrib.otel import instrument
from memofill.contrib.prometheus import MemofillCollector
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import upstream_calls

#: Connections per worker process: one per request thread (gunicorn.conf.py), and a few
#: spare. A thread that finds none free waits for one (a blocking pool), up to 5 s.
MAX_CONNECTIONS = 16 + 4
#: How long a command may take before memofill falls back: a stalled Redis costs a request
#: this long. 2 s, not the helper's 1 s: CI serves these apps on a small, busy machine.
SOCKET_TIMEOUT_S = 2.0

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
    # A blocking pool (a thread that finds every connection busy waits up to 5 s), one
    # retry on a fresh connection: memofill.redis_client's settings (docs: deployment).
    client = memofill.redis_client(
        redis_url or os.environ["REDIS_URL"],
        max_connections=MAX_CONNECTIONS,
        socket_timeout=SOCKET_TIMEOUT_S,
    )
    memofill.configure(client, prefix="weather-web:")

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
