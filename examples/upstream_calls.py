"""Count the calls that reach the slow upstreams, across every process of a deployment.

Each call appends one line to the file named by ``UPSTREAM_CALLS_FILE``, when it
is set. An append of a short line is atomic, so processes need no lock. The
repository's smoke tests read the file to check that a stampede on a cold key
called the upstream once; a real service would count with its metrics instead.
"""

from __future__ import annotations

import os


def record(call: str) -> None:
    """Note one upstream call, such as ``"quote ACME"``."""
    path = os.environ.get("UPSTREAM_CALLS_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as calls:
            calls.write(call + "\n")
