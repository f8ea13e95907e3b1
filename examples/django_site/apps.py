"""The catalogue app: configures memofill once the app registry is ready."""

from __future__ import annotations

import memofill
from django.apps import AppConfig
from django.conf import settings
from memofill.contrib.otel import instrument
from memofill.contrib.prometheus import MemofillCollector
from prometheus_client import CollectorRegistry

#: Connections per server process. Django's development server runs a thread per
#: request, unbounded: past this many, a thread waits up to 5 s for a free connection.
MAX_CONNECTIONS = 32
#: How long a command may take before memofill falls back: a stalled Redis costs a request
#: this long. 2 s, not the helper's 1 s: CI serves these apps on a small, busy machine.
SOCKET_TIMEOUT_S = 2.0
#: What views.metrics serves: memofill's numbers in this process.
METRICS = CollectorRegistry()


class CatalogueConfig(AppConfig):
    name = "django_site"

    def ready(self) -> None:
        """Runs once per process, at start-up (in each worker, under gunicorn without preload)."""
        # A blocking pool (a thread that finds every connection busy waits up to 5 s), one
        # retry on a fresh connection: memofill.redis_client's settings (docs: deployment).
        client = memofill.redis_client(
            settings.REDIS_URL, max_connections=MAX_CONNECTIONS, socket_timeout=SOCKET_TIMEOUT_S
        )
        memofill.configure(client, prefix="catalogue:")
        # Metrics for Prometheus (views.metrics serves them) and OpenTelemetry (no-ops
        # until the application sets up the SDK).
        METRICS.register(MemofillCollector())
        instrument()
