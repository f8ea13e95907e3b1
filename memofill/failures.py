"""What a Redis error means to memofill: failed, unreachable, slow, or this process's own pool.

Rules:

- No Redis error ever reaches a caller unless it asked; these predicates sort
  what the client raised, and the callers decide how to degrade
  (:mod:`memofill.coordinator`, :mod:`memofill.fallback`).
- A full connection pool is this process's congestion, never Redis failing:
  it opens no breaker and sends nobody to the origin.
- One time-out is not proof that Redis is gone (a busy event loop or CPU is
  enough); a refused connection or a cluster that cannot route is.
"""

from __future__ import annotations

from redis.exceptions import (
    ClusterDownError,
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as _ConnectionError
from redis.exceptions import TimeoutError as _TimeoutError

__all__ = [
    "REDIS_ERRORS",
    "RedisUnavailable",
    "is_pool_exhausted",
    "is_pool_refusal",
    "is_timeout",
    "is_unreachable",
]

#: Every error that means "Redis failed" to memofill, none of which may reach a caller:
#: redis-py's RedisError, and the cluster client's RedisClusterException, which is not one
#: (it is raised when the client cannot reach the cluster or route a slot: "Redis Cluster
#: cannot be connected", "All slots are not covered").
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


class RedisUnavailable(_ConnectionError):
    """Raised instead of sending a command while the breaker says Redis is unreachable."""


#: What redis-py's pools say when they are out of connections (before redis-py 7 raised
#: :class:`~redis.exceptions.MaxConnectionsError`, a plain ``ConnectionError`` said so).
_POOL_EXHAUSTED = frozenset({"Too many connections", "No connection available."})


def is_pool_exhausted(error: BaseException) -> bool:
    """Whether ``error`` is the client's pool out of connections: no sign of Redis failing.

    A full pool says this process has more callers than connections at this
    moment, not that Redis failed, so it never opens the breaker.
    """
    return isinstance(error, MaxConnectionsError) or str(error) in _POOL_EXHAUSTED


def is_pool_refusal(error: BaseException) -> bool:
    """Whether a plain pool refused a connection at once: the command may be sent again.

    A blocking pool raises "No connection available." only after waiting its
    own ``timeout``; a plain pool refuses the moment it is full, so the caller
    waits for a connection itself (:func:`memofill.coordinator.fill`) rather
    than fetch from the origin.
    """
    return isinstance(error, MaxConnectionsError) or str(error) == "Too many connections"


def is_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a time-out: a slow reply, not yet proof that Redis is gone.

    One time-out may be this process's busy event loop or CPU, not Redis; the
    breaker opens on a few in a row (:meth:`memofill.fallback.Breaker.failed`).
    """
    return isinstance(error, (_TimeoutError, TimeoutError))


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says Redis could not be reached (as opposed to an error it answered).

    A cluster that answers CLUSTERDOWN, or that the cluster client cannot route to,
    serves no key until it recovers: that counts as unreachable too (and redis-py
    sleeps 0.25 s on every CLUSTERDOWN, a cost the breaker then spares the callers).
    A full connection pool is not Redis failing: it says this process has more
    callers than connections, and skipping Redis would send them all upstream.
    """
    if is_pool_exhausted(error):
        return False
    unreachable = (
        _ConnectionError,
        _TimeoutError,
        OSError,
        ClusterDownError,
        RedisClusterException,
    )
    return isinstance(error, unreachable)
