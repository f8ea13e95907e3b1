"""Redis misbehaving on purpose, the ways a production Redis does, for one test."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from memofill.codec import HEADER_LEN, NEGATIVE_MARKER, Header, encode, header_bytes, read_header
from memofill.commands import Commands, new_token
from memofill.freshness import wall_clock
from memofill.keys import lock_key, wake_key
from memofill.policy import Dataset
from memofill.testing._harness import Harness

# Documented where memofill.testing exports it.
CORRUPT_PAYLOAD = b"\xff\xfe corrupt: not JSON, not a memofill marker"


class LockHolder:
    """A leader in another process holding the fill lock of one entry (:meth:`Faults.lock_held`).

    While it holds the lock, callers of that entry follow: they wait for its
    value and, when none comes within ``wait_ms``, fetch it themselves
    (``follower_timeout``). :meth:`fill` makes the value come (``follower_hit``).
    """

    def __init__(self, harness: Harness, dataset: Dataset, redis_key: str) -> None:
        if dataset.cache_fill is None:
            raise ValueError(f"dataset {dataset.key!r} has no cache_fill: it never takes a lock")
        self.redis_key = redis_key
        self.lock_key = lock_key(redis_key)
        self._dataset = dataset
        self._cache_fill = dataset.cache_fill
        self._commands = Commands(harness.plain_client())
        self._token = new_token()
        self._timer: threading.Timer | None = None
        self._error: Exception | None = None

    def fill(self, value: Any, *, after_ms: float = 0) -> None:
        """Write ``value`` and release the lock as that leader would, ``after_ms`` from now.

        With ``after_ms`` the leader finishes in a background thread while the
        test's own call follows, and wakes it as it would in production.
        ``None`` stores the negative marker, as a fetch that returned ``None``.
        """
        if after_ms <= 0:
            self._finish(value)
            return
        self._timer = threading.Timer(after_ms / 1000, self._finish_in_background, (value,))
        self._timer.daemon = True
        self._timer.start()

    def acquire(self) -> None:
        """Take the lock for the dataset's ``lease_ms`` (``lock_held`` does this)."""
        lease_ms = self._cache_fill.lease_ms
        acquired, *_ = self._commands.acquire(
            self.lock_key, self._token, lease_ms, self.redis_key, wake_key(self.redis_key)
        )
        if acquired != 1:
            raise RuntimeError(f"the lock {self.lock_key!r} is already held")

    def end(self) -> None:
        """No fill after this; release the lock if still ours (``lock_held`` does this).

        A fill that failed in the background raises here, in the test (once).
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
        self._release()

    def _finish(self, value: Any) -> None:
        dataset = self._dataset
        if value is None:
            payload, ttl_ms = NEGATIVE_MARKER, round(dataset.negative_ttl_s * 1000)
        else:
            payload, ttl_ms = encode(value), max(1, round(dataset.ttl_s * 1000))
        if ttl_ms > 0:
            # As another process's fill, plainly: the test decides what it writes, and when.
            self._commands.client.set(self.redis_key, payload, px=ttl_ms)
        self._release()

    def _finish_in_background(self, value: Any) -> None:
        try:
            self._finish(value)
        except Exception as exc:  # raised in the test by end(), not lost in a thread
            self._error = exc

    def _release(self) -> None:
        wake_ttl_ms = max(self._cache_fill.poll_max_ms, 100)  # as the coordinator's leader does
        wake = wake_key(self.redis_key)
        self._commands.release(self.lock_key, wake, self._token, wake_ttl_ms)


class Faults:
    """Make this test's fake Redis misbehave; the ``memofill_faults`` fixture.

    Each fault acts on the server every ``memofill_*`` fixture of the test
    shares, so it reaches the caches under test without touching their insides.
    """

    def __init__(self, harness: Harness) -> None:
        self._harness = harness

    @contextlib.contextmanager
    def redis_down(self) -> Iterator[None]:
        """Redis refuses every connection during the block.

        A miss still gets its value: the caller fetches (outcome ``lock_error``),
        and a value this process read or wrote shortly before is served from
        memory (counted as ``fallback_hit``). When the block ends Redis is back,
        and the caches' breakers are closed, so the next call uses it at once.
        """
        server = self._harness.server
        server.connected = False
        try:
            yield
        finally:
            server.connected = True
            self._harness.close_breakers()

    @contextlib.contextmanager
    def listener_lost(self) -> Iterator[None]:
        """The caches' near-cache listeners lose their connection during the block.

        No near copy is served in the block (calls read Redis, counted as
        ``hit``), and every copy made before it is dropped, as in production
        when the listener's connection breaks; after the block, copies are
        made and served again.
        """
        stores = [cache.local_store for cache in self._harness.caches]
        before = [store.live_until for store in stores]
        for store in stores:
            store.tracking(False)
        try:
            yield
        finally:
            for store, live_until in zip(stores, before, strict=True):
                store.tracking(True)
                store.heard(live_until)

    @contextlib.contextmanager
    def slow(self, ms: float, *, timeout_ms: float | None = None) -> Iterator[None]:
        """Every command takes ``ms`` longer during the block.

        With a ``timeout_ms`` lower than ``ms``, each command instead fails with
        redis-py's ``TimeoutError`` after ``timeout_ms``, as it would for a
        client whose ``socket_timeout`` is that long: a miss then ends in
        ``lock_error``. The breakers are closed when the block ends.
        """
        delay = self._harness.delay
        before = delay.seconds, delay.timeout_s
        delay.seconds = ms / 1000
        delay.timeout_s = None if timeout_ms is None else timeout_ms / 1000
        try:
            yield
        finally:
            delay.seconds, delay.timeout_s = before
            self._harness.close_breakers()

    @contextlib.contextmanager
    def lock_held(self, dataset: str, /, **fields: object) -> Iterator[LockHolder]:
        """Another process holds the fill lock of this entry during the block.

        ``fields`` fill the key template (``symbol="ACME"``). The lock lives for
        the dataset's ``lease_ms`` at most and is released when the block ends;
        the :class:`LockHolder` it yields can :meth:`~LockHolder.fill` the value.
        """
        policy, redis_key = self._harness.entry(dataset, fields)
        holder = LockHolder(self._harness, policy, redis_key)
        holder.acquire()
        try:
            yield holder
        finally:
            holder.end()

    def make_stale(self, function: Any, /, *args: Any, by_s: float = 0.001, **kwargs: Any) -> str:
        """Age the value a call of ``function`` with these arguments reads: stale by ``by_s``.

        Rewrites the stored header so that the value's soft deadline passed
        ``by_s`` seconds ago (its fetch began ``ttl_s`` before that), keeping its
        bytes and its Redis TTL: the next call serves it stale (within
        ``stale_s``), as a miss that keeps it for errors (within
        ``stale_if_error_s``), or as a plain miss (past both). Returns the Redis
        key. Raises :class:`LookupError` when no value with a header is stored.
        """
        key = function.redis_key(*args, **kwargs)
        ttl_s = function.dataset.ttl_s
        client = self._harness.plain_client()
        raw = client.get(key)
        header = read_header(raw) if isinstance(raw, bytes) else None
        if not isinstance(raw, bytes) or header is None:
            raise LookupError(f"no value with a header under {key!r}: call the function first")
        soft_until_ms = round((wall_clock() - by_s) * 1000)
        aged = Header(
            soft_until_ms - round(ttl_s * 1000), soft_until_ms, header.delta_ms, header.stamp
        )
        client.set(key, header_bytes(aged) + raw[HEADER_LEN:], keepttl=True)
        return str(key)

    def corrupt(self, dataset: str, /, **fields: object) -> str:
        """Store :data:`CORRUPT_PAYLOAD` under this entry, for its TTL; return the Redis key.

        The next call reads it as a miss (a WARNING record says so), fills the
        entry again and overwrites it.
        """
        policy, redis_key = self._harness.entry(dataset, fields)
        ttl_ms = max(1, round(policy.ttl_s * 1000))
        self._harness.plain_client().set(redis_key, CORRUPT_PAYLOAD, px=ttl_ms)
        return redis_key
