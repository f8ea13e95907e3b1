"""A background worker: a pool of processes converting invoices with a cached exchange rate.

Each job needs the rate of its invoice's currency; many jobs in many processes
need the same rate at once, and memofill makes one call to the rates service
for all of them. Run it (it prints the converted invoices as JSON)::

    REDIS_URL=redis://localhost:6379/0 python worker.py --processes 4 --invoices 100 --currency NOK

The pool's ``initializer`` configures memofill in each worker process, after
the fork (or spawn): no connection is shared between processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from typing import Any

import memofill
from memofill.contrib.otel import instrument

import upstream_calls

#: A worker process runs one job at a time: one connection, and one spare.
MAX_CONNECTIONS = 2
#: How long a command may take before memofill falls back: a stalled Redis costs a job this
#: long. 2 s, not the helper's 1 s: CI runs this pool on a small, busy machine.
SOCKET_TIMEOUT_S = 2.0


@memofill.cached_dataset("worker:rates:{currency}")
def exchange_rate(currency: str) -> float:
    """The slow upstream: a rates service that takes a fifth of a second (units per euro)."""
    upstream_calls.record(f"rate {currency}")
    time.sleep(0.2)
    return rate_of(currency)


def rate_of(currency: str) -> float:
    """The rates service's answer: made up, but the same in every process."""
    return sum(map(ord, currency)) / 20


def start_worker() -> None:
    """The pool's initializer: runs once in each worker process, before its first job."""
    # A blocking pool, one retry on a fresh connection: memofill.redis_client's settings.
    client = memofill.redis_client(
        os.environ["REDIS_URL"], max_connections=MAX_CONNECTIONS, socket_timeout=SOCKET_TIMEOUT_S
    )
    memofill.configure(client, prefix="invoicing:")
    # Short-lived processes behind no HTTP port: OpenTelemetry pushes each one's numbers
    # (OTLP) once the application sets up the SDK here; until then, no-ops.
    instrument()


def convert(invoice: dict[str, Any]) -> dict[str, Any]:
    """One job: an invoice's amount in euros."""
    rate = exchange_rate(invoice["currency"])
    return {**invoice, "eur": round(invoice["amount"] / rate, 2)}


def run(invoices: list[dict[str, Any]], processes: int) -> list[dict[str, Any]]:
    """Convert ``invoices`` on a pool of ``processes`` workers, one job at a time each."""
    with multiprocessing.Pool(processes, initializer=start_worker) as pool:
        return pool.map(convert, invoices, chunksize=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--invoices", type=int, default=100)
    parser.add_argument("--currency", default="NOK")
    args = parser.parse_args()
    invoices = [
        {"invoice": f"INV-{n}", "currency": args.currency, "amount": 10.0 * n}
        for n in range(args.invoices)
    ]
    print(json.dumps(run(invoices, args.processes)))


if __name__ == "__main__":
    main()
