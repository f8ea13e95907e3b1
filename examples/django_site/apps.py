"""The catalogue app: configures memofill once the app registry is ready."""

from __future__ import annotations

import memofill
import redis
from django.apps import AppConfig
from django.conf import settings
from memofill.contrib.otel import instrument
from memofill.contrib.prometheus import MemofillCollector
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

#: Connections per server process. Django's development server runs a thread per
#: request, unbounded: past this many, a thread waits up to 5 s for a free connection.
MAX_CONNECTIONS = 32
#: What views.metrics serves: memofill's numbers in this process.
METRICS = CollectorRegistry()


class CatalogueConfig(AppConfig):
    name = "django_site"

    def ready(self) -> None:
        """Runs once per process, at start-up (in each worker, under gunicorn without preload)."""
        pool = redis.BlockingConnectionPool.from_url(
            settings.REDIS_URL,
            max_connections=MAX_CONNECTIONS,
            timeout=5.0,  # how long a command waits for a free connection
            socket_timeout=2.0,  # a stalled Redis costs a command this long...
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 1),  # ...at most twice
        )
        memofill.configure(redis.Redis.from_pool(pool), prefix="catalogue:")
        # Metrics for Prometheus (views.metrics serves them) and OpenTelemetry (no-ops
        # until the application sets up the SDK).
        METRICS.register(MemofillCollector())
        instrument()
