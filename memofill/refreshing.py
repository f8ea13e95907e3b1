"""Handing refreshes off without blocking the caller: one per key in flight, a bounded pool, tasks.

A stale read hands its refresh to :class:`Refreshes` and returns at once. The
refresh itself (:func:`memofill.coordinator.refresh`) is run by a worker
thread of a small pool for blocking code, or by a task for asyncio; in
``inline`` mode the caller runs it itself (for hosts that freeze a process
after its response, where a background refresh would never finish).

Three rules keep a hot key from flooding Redis or the origin:

* at most one refresh per key in flight in a process (:meth:`Refreshes.claim`);
* after another process was found holding the lock, no attempt on that key
  before the lease or ``refresh_retry_ms`` says it may be free (the busy memo),
  unless a newer value has been read since (a new cycle: its refresh is due);
* a pool whose queue is full drops the refresh (counted as ``refresh_dropped``)
  rather than queue it: a mass expiry must not build a hidden backlog, and the
  next stale read asks again.

A refresh in flight never holds the process's exit: the pool's threads are
daemon threads that nothing joins (a ``ThreadPoolExecutor``'s are joined at
exit, so a 20 s fetch held the exit 20 s, and a hung one for ever), and an
asyncio refresh is a task that :func:`asyncio.run` cancels at shutdown. A
refresh cut short so leaves its lock to expire with its lease, and the value
is refreshed by the next stale read in another process.

A forked child (a pre-forking server) starts with none of this: the parent's
pool threads and tasks do not run in it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

logger = logging.getLogger("memofill")

#: ``background``: refresh in a worker thread or task; ``inline``: in the caller that wins.
RefreshMode = Literal["background", "inline"]
REFRESH_MODES = ("background", "inline")
#: Refreshes waiting for a worker, per worker, beyond which new ones are dropped.
QUEUE_PER_WORKER = 2
#: Past this many keys in the busy memo, the entries whose time has passed are dropped.
BUSY_PRUNE_AT = 4096


class Refreshes:
    """One instance's refreshes in flight in this process, and how they are run.

    Args:
        mode: ``"background"`` (a bounded thread pool, or a task) or ``"inline"``.
        workers: the pool's threads, made on first use (and again in a forked child).
    """

    def __init__(self, mode: RefreshMode = "background", workers: int = 4) -> None:
        self.mode = mode
        self.workers = workers
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        #: key -> (no attempt before this monotonic time, for the value fetched at this ms)
        self._busy: dict[str, tuple[float, int]] = {}
        self._pool: DaemonPool | None = None
        self._queued = 0
        #: The asyncio refresh tasks running, kept referenced until they end.
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def inline(self) -> bool:
        """Whether the caller that hands a refresh off runs it itself."""
        return self.mode == "inline"

    def _forked(self) -> None:
        """In a forked child: nothing of the parent's is in flight, and its pool is gone."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._in_flight, self._busy, self._pool, self._queued = set(), {}, None, 0
        self.tasks = set()

    def claim(self, key: str, version: int) -> bool:
        """Whether this caller may refresh ``key`` now; if so it is in flight until :meth:`done`.

        ``version`` is the fetch start of the value read: the busy memo holds back
        only refreshes of the value it was set for.
        """
        if self._pid != os.getpid():
            self._forked()
        now = time.monotonic()
        # Read first without the lock (a dict read is atomic): most stale hits end here,
        # while another caller or process refreshes.
        busy = self._busy.get(key)
        if key in self._in_flight or (busy is not None and busy[0] > now and busy[1] == version):
            return False
        with self._lock:
            until, seen = self._busy.get(key, (0.0, 0))
            if key in self._in_flight or (until > now and seen == version):
                return False
            self._busy.pop(key, None)
            self._in_flight.add(key)
            return True

    def done(self, key: str, busy_for_s: float = 0.0, version: int = 0) -> None:
        """``key``'s refresh ended; with ``busy_for_s``, none of ``version`` is tried that long."""
        with self._lock:
            self._in_flight.discard(key)
            if busy_for_s > 0:
                if len(self._busy) >= BUSY_PRUNE_AT:
                    now = time.monotonic()
                    self._busy = {k: v for k, v in self._busy.items() if v[0] > now}
                self._busy[key] = (time.monotonic() + busy_for_s, version)

    def submit(self, keys: list[str], job: Callable[[], object]) -> bool:
        """Run ``job``, the refresh of ``keys``, on the pool; ``False`` (``keys`` no longer
        in flight) if its queue is full."""
        with self._lock:
            if self._queued >= self.workers * (1 + QUEUE_PER_WORKER):
                self._in_flight.difference_update(keys)
                return False
            self._queued += 1
            if self._pool is None:
                self._pool = DaemonPool(self.workers, "memofill-refresh")
            pool = self._pool

        def run() -> None:
            try:
                job()
            finally:
                with self._lock:
                    self._queued -= 1

        pool.submit(run)
        return True

    def spawn(self, coroutine: Coroutine[Any, Any, object]) -> None:
        """Run ``coroutine`` as a task of the running loop, kept referenced until it ends.

        :func:`asyncio.run` cancels it if the loop shuts down first; the refresh
        then releases its lock token-safely (:func:`memofill.coordinator.refresh`).
        """
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # recorded by the refresh itself; retrieved so asyncio logs nothing

    def in_flight(self) -> int:
        """How many refreshes are in flight (or queued) in this process."""
        with self._lock:
            return len(self._in_flight)

    def shutdown(self) -> None:
        """Let the pool's threads end once their refreshes are done (a replaced configuration)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()


class DaemonPool:
    """Up to ``workers`` daemon threads that run jobs in turn, started as jobs arrive.

    Daemon threads, and never joined: the interpreter exits without waiting
    for a job in flight, which is cut off where it is (see the module's rules).
    A job's exception is logged, and its thread goes on to the next job.
    """

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: Threads waiting for a job, and jobs queued that no thread has taken yet.
        self._idle = 0
        self._pending = 0

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job``; start one more thread if the idle ones are too few and there is room."""
        with self._lock:
            self._pending += 1
            if self._pending > self._idle and len(self._threads) < self.workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is not None:
                    self._pending -= 1
            if job is None:
                return
            try:
                job()
            except Exception:  # the refresh records its own outcome; this is a bug in it
                logger.exception("a background refresh raised")

    def shutdown(self) -> None:
        """Let each thread end once the jobs queued before this are done."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
