"""Small helpers several test modules share."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import redis.exceptions

from memofill import Memofill
from memofill.codec import HEADER_LEN, read_header

#: Clients made by the test that runs now, closed when it ends (``tests/conftest.py``).
_open_clients: list[Any] = []

T = TypeVar("T")


def closed_at_end(client: T) -> T:
    """``client``, closed when the test that made it ends."""
    _open_clients.append(client)
    return client


def close_test_clients() -> None:
    """Close the clients :func:`closed_at_end` was given (the conftest's autouse fixture)."""
    while _open_clients:
        _open_clients.pop().close()


def notify_after_acquire(mf: Memofill) -> threading.Event:
    """An event set once ``mf`` has tried to take a lock, so it is past its hit path.

    A test that must have a caller follow (not hit) waits for this before it lets
    the leader finish.
    """
    tried = threading.Event()
    commands: Any = mf._async or mf._sync
    original = commands.acquire
    if mf._async:

        async def acquire_async(*args: Any) -> Any:
            try:
                return await original(*args)
            finally:
                tried.set()

        commands.acquire = acquire_async
    else:

        def acquire(*args: Any) -> Any:
            try:
                return original(*args)
            finally:
                tried.set()

        commands.acquire = acquire
    return tried


class FakeClock:
    """A monotonic clock that moves only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@attrs.frozen
class Refresh:
    """A stand-in for a refresh record: only what metrics and exporters read of one."""

    dataset: str
    trigger: str
    outcome: str
    elapsed_ms: float
    delta_ms: float | None
    stale_age_ms: float | None


#: The kinds of Redis failure the contract tells apart, most specific first. An outcome's
#: ``error`` names the class redis-py raised; a release of redis-py may raise a new subclass
#: (8.2 narrowed RedisClusterException to RedisClusterUnreachableError), which is the same
#: failure to memofill and to its users.
FAILURE_KINDS: tuple[type[Exception], ...] = (
    redis.exceptions.NoPermissionError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.ResponseError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
)


def failure(error: str | None) -> str | None:
    """The kind of Redis failure an outcome's ``error`` names: the name of its kind in
    :data:`FAILURE_KINDS`, so ``"RedisClusterUnreachableError"`` is ``"RedisClusterException"``.

    A name that is not one of redis-py's exceptions (``None``, or memofill's own words such
    as ``LeaseExpired`` and ``RedisUnavailable``) is returned as it is.
    """
    raised = getattr(redis.exceptions, error, None) if error else None
    if not (isinstance(raised, type) and issubclass(raised, Exception)):
        return error
    return next((kind.__name__ for kind in FAILURE_KINDS if issubclass(raised, kind)), error)


def failures(logged: Mapping[tuple[str, str | None], int]) -> Counter[tuple[str, str | None]]:
    """``(outcome, error)`` counts with each error read as its :func:`failure` kind."""
    kinds: Counter[tuple[str, str | None]] = Counter()
    for (outcome, error), count in logged.items():
        kinds[outcome, failure(error)] += count
    return kinds


def stored_marker(stored: bytes | None) -> bytes:
    """The marker a fill stored, once its header is checked: a marker is stamped as a value is."""
    assert stored is not None, "nothing stored"
    header = read_header(stored)
    assert header is not None, f"a marker without a header: {stored!r}"
    assert header.stamp > 0
    return stored[HEADER_LEN:]


class HeldOrigin:
    """An upstream whose values count up; a call may be held until let go (events, not sleeps).

    ``value`` makes a call's value of its arguments and version: by default
    ``{"args": [...], "version": n}``.
    """

    def __init__(
        self,
        value: Callable[[tuple[Any, ...], int], Any] | None = None,
        patience_s: float = 10.0,
    ) -> None:
        self.versions = itertools.count(1)
        self.entered = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.value = value or (lambda args, version: {"args": list(args), "version": version})
        self.patience_s = patience_s

    def hold(self) -> None:
        """Hold the next calls once they have begun (``entered``), until ``go`` is set."""
        self.entered.clear()
        self.go.clear()

    def __call__(self, *args: Any) -> Any:
        version = next(self.versions)
        self.entered.set()
        assert self.go.wait(self.patience_s)
        return self.value(args, version)
