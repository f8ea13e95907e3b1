"""Whether a stored value is fresh, stale, or due for an early refresh: decisions only, no I/O.

These are the only run-time decisions that read the wall clock: a value's
header says when its fetch began in wall-clock ms, so that every process, on
any host, reads the same deadline from it (give or take the hosts' clock skew).
Waits, leases, the breaker and the local store keep to monotonic clocks.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

from memofill.codec import DELTA, SOFT_UNTIL

#: The wall clock, in seconds: what stored headers are written and judged against.
wall_clock = time.time

#: What a read of a value with a header means, once :func:`late_rule` said it is not a
#: plain fresh hit. ``EARLY``: fresh, but the XFetch draw fired: serve it and refresh.
EARLY = "early"
#: Past its soft deadline, within ``stale_s``: serve it at once and refresh.
STALE = "stale"
#: Past ``stale_s``, within ``stale_if_error_s``: a miss that serves it if the fill fails.
STALE_IF_ERROR = "stale_if_error"
#: Past every window, a plain miss (Redis keeps such a value a fetch's duration longer).
EXPIRED = "expired"


def xfetch_fires(
    now_ms: float, soft_until_ms: float, delta_ms: float, beta: float, u: float
) -> bool:
    """XFetch's rule: refresh early when ``now − δ·β·ln(u) ≥ soft deadline``, ``u`` in (0, 1].

    The draw ``−δ·β·ln(u)`` is exponential with mean ``δβ``, so the chance that
    one read fires is ``exp(−(time left)/(δβ))``: nil far from the deadline, 37 %
    one ``δβ`` before it. Being memoryless, many readers together fire about
    ``e^(1/β)`` times per refresh cycle whatever their number, and each firing
    only *tries* the lock: one of them refreshes.
    """
    return now_ms - delta_ms * beta * math.log(u) >= soft_until_ms


#: The largest ``-ln(u)`` a draw of ``random.random()`` can give: ``-ln(2**-53)`` ≈ 36.7.
_MAX_DRAW = 37.0


def late_rule(
    beta: float,
    clock: Callable[[], float] = wall_clock,
    draw: Callable[[], float] = random.random,
) -> Callable[[bytes], bool]:
    """The hit path's one question about stored bytes with a header: not a plain fresh hit?

    ``True`` when the value is past its soft deadline, or (``beta > 0``) when the
    XFetch draw fires. Reads only the header's hex fields it needs, one
    ``int(..., 16)`` each. ``draw`` returns a number in [0, 1).
    """
    if beta <= 0:

        def late(raw: bytes) -> bool:
            return clock() * 1000 >= int(raw[SOFT_UNTIL], 16)

        return late

    # -ln(u) never exceeds 37 for the u a float draw gives (u >= 2**-53): a value whose
    # time left is more than 37·δβ cannot fire, so most reads skip the draw.
    reach = beta * _MAX_DRAW
    log = math.log

    def late_or_early(raw: bytes) -> bool:
        now_ms = clock() * 1000
        left_ms = int(raw[SOFT_UNTIL], 16) - now_ms
        if left_ms <= 0:
            return True
        delta_ms = int(raw[DELTA], 16)
        if left_ms > delta_ms * reach:
            return False
        return -delta_ms * beta * log(1.0 - draw()) >= left_ms  # xfetch_fires, inlined

    return late_or_early


def verdict(now_ms: float, soft_until_ms: int, stale_ms: float, if_error_ms: float) -> str:
    """What a read that :func:`late_rule` found late means: one of the constants above.

    ``soft_until_ms`` is the header's: until when the value is fresh.
    """
    past_ms = now_ms - soft_until_ms
    if past_ms < 0:
        return EARLY
    if past_ms < stale_ms:
        return STALE
    if past_ms < if_error_ms:
        return STALE_IF_ERROR
    return EXPIRED
