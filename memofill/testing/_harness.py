"""One test's fake Redis: the server, the clients and caches made on it, the records they logged."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from memofill.instance import Memofill
from memofill.policy import Dataset

if TYPE_CHECKING:
    import redis
    import redis.asyncio

C = TypeVar("C")
_INSTALL_HINT = "pip install 'memofill[test]'"


class _Delay:
    """How slow the fake Redis is right now (see :meth:`Faults.slow`); its clients share it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.timeout_s: float | None = None

    def pause(self) -> tuple[float, bool]:
        """How long the next command takes, and whether it then fails with a time-out."""
        if self.timeout_s is not None and self.seconds > self.timeout_s:
            return self.timeout_s, True
        return self.seconds, False


def _timed_out() -> RedisTimeoutError:
    return RedisTimeoutError("Timeout reading from socket (memofill.testing: Faults.slow)")


def _slowed(client: C, delay: _Delay) -> C:
    """Make every command of ``client`` wait as ``delay`` says, as on a slow server.

    Every single command goes through ``execute_command`` (scripts too), and
    every pipeline through its ``execute``: wrapping them on this one client
    object slows exactly the clients the fixtures made.
    """
    execute = client.execute_command  # type: ignore[attr-defined]
    pipeline = client.pipeline  # type: ignore[attr-defined]
    if inspect.iscoroutinefunction(execute):

        def slowed_async(run: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def slow_run(*args: Any, **options: Any) -> Any:
                seconds, fails = delay.pause()
                if seconds:
                    await asyncio.sleep(seconds)
                if fails:
                    raise _timed_out()
                return await run(*args, **options)

            return slow_run

        def pipeline_async(*args: Any, **options: Any) -> Any:
            pipe = pipeline(*args, **options)
            pipe.execute = slowed_async(pipe.execute)
            return pipe

        client.execute_command = slowed_async(execute)  # type: ignore[attr-defined]
        client.pipeline = pipeline_async  # type: ignore[attr-defined]
        return client

    def slowed(run: Callable[..., Any]) -> Callable[..., Any]:
        def slow_run(*args: Any, **options: Any) -> Any:
            seconds, fails = delay.pause()
            if seconds:
                time.sleep(seconds)
            if fails:
                raise _timed_out()
            return run(*args, **options)

        return slow_run

    def pipeline_sync(*args: Any, **options: Any) -> Any:
        pipe = pipeline(*args, **options)
        pipe.execute = slowed(pipe.execute)
        return pipe

    client.execute_command = slowed(execute)  # type: ignore[attr-defined]
    client.pipeline = pipeline_sync  # type: ignore[attr-defined]
    return client


class _MissRecords(logging.Handler):
    """Keeps the miss records (those with an ``outcome``) the ``memofill`` logger emits."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        #: The warnings that a dataset's values cannot be stored.
        self.unstorable: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "outcome"):
            self.records.append(record)
        elif hasattr(record, "unstorable"):
            self.unstorable.append(record)


def _import_fakeredis() -> Any:
    """fakeredis, or a failure that says how to install it (and lupa, which runs the Lua)."""
    try:
        fakeredis = importlib.import_module("fakeredis")  # optional: only the fixtures need it
    except ImportError:
        fakeredis = None  # failed below, outside the except: the ImportError adds nothing
    if fakeredis is None:
        pytest.fail(f"memofill's test fixtures need fakeredis: {_INSTALL_HINT}", pytrace=False)
    if importlib.util.find_spec("lupa") is None:
        pytest.fail(
            f"memofill's test fixtures need lupa (fakeredis runs Lua with it): {_INSTALL_HINT}",
            pytrace=False,
        )
    return fakeredis


class Harness:
    """What one test's ``memofill_*`` fixtures share; the ``memofill_harness`` fixture.

    A new in-memory fakeredis server (``server``), clients on it, the caches
    the fixtures made (``caches``), and the miss records the ``memofill`` logger
    emitted during the test (``records``). :class:`Outcomes` counts what those
    caches did; :class:`Faults` acts on the server. A test that builds its own
    :class:`~memofill.Memofill` passes it to :meth:`adopt` to be counted too.
    """

    def __init__(self) -> None:
        self._fakeredis = _import_fakeredis()
        self.server = self._fakeredis.FakeServer()
        self.caches: list[Memofill] = []
        self.delay = _Delay()
        self._handler = _MissRecords()
        #: Undone when the test ends, last first.
        self.cleanup = contextlib.ExitStack()
        logger = logging.getLogger("memofill")
        logger.addHandler(self._handler)
        self.cleanup.callback(logger.removeHandler, self._handler)
        if not logger.isEnabledFor(logging.INFO):  # miss records are INFO: keep them for the test
            self.cleanup.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.INFO)

    @property
    def records(self) -> list[logging.LogRecord]:
        """The miss records logged since the test began, oldest first."""
        return self._handler.records

    @property
    def unstorable(self) -> list[logging.LogRecord]:
        """The warnings, logged since the test began, that a dataset's values cannot be stored."""
        return self._handler.unstorable

    def client(self) -> redis.Redis:
        """A new blocking client on this test's server; :meth:`Faults.slow` slows it."""
        return _slowed(self.plain_client(), self.delay)

    def plain_client(self) -> redis.Redis:
        """A blocking client on this test's server that no fault slows (another process's)."""
        client: redis.Redis = self._fakeredis.FakeRedis(server=self.server)
        return client

    def async_client(self) -> redis.asyncio.Redis:
        """A new asyncio client on this test's server; :meth:`Faults.slow` slows it."""
        client: redis.asyncio.Redis = self._fakeredis.FakeAsyncRedis(server=self.server)
        return _slowed(client, self.delay)

    def adopt(self, cache: Memofill) -> Memofill:
        """Count ``cache`` in :class:`Outcomes` and let faults reach it; returns it."""
        self.caches.append(cache)
        return cache

    def close_breakers(self) -> None:
        """Redis is back: every cache uses it at once, not after its breaker's cool-down."""
        for cache in self.caches:
            cache.breaker.reset()

    def entry(self, dataset: str, fields: dict[str, object]) -> tuple[Dataset, str]:
        """The policy of ``dataset`` and the Redis key of the entry ``fields`` name."""
        for cache in self.caches:
            if dataset in cache.policies:
                return cache.policy(dataset), cache.final_key(dataset, **fields)
        known = sorted({key for cache in self.caches for key in cache.policies})
        hint = ", ".join(known) or "none; request memofill_cache or memofill_default"
        raise LookupError(f"no cache in this test declares dataset {dataset!r} (known: {hint})")
