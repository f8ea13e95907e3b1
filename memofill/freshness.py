"""Whether a stored value is fresh, stale, or due for an early refresh: decisions only, no I/O.

These are the only run-time decisions that read the wall clock: a value's
header says when its fetch began in wall-clock ms, so that every process, on
any host, reads the same deadline from it (give or take the hosts' clock skew).
Waits, leases, the breaker and the local store keep to monotonic clocks.
"""

from __future__ import annotations

import time

#: The wall clock, in seconds: what stored headers are written and judged against.
wall_clock = time.time
