"""What every scenario shares: client options, the values the origin returns, percentiles,
child processes, and counting the requests a process sends to Redis.

Kept in one place so that every row of every table is measured under the same
conditions: one client configuration, one value shape, one percentile rule.
"""

from __future__ import annotations

import concurrent.futures
import gc
import math
import multiprocessing
import os
import random
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection

T = TypeVar("T")

#: Every client in every row uses these options, so no row wins by protocol, parser or pool:
#: RESP3 stated explicitly (redis-py 8's default), the hiredis parser (which redis-py picks
#: by itself when hiredis is installed), and room for 1000 concurrent callers per process:
#: redis-py 8's pool refuses a 101st connection with MaxConnectionsError, and cashews
#: defaults to a blocking pool of 10; either would measure the pool, not the cache.
CLIENT_OPTIONS: dict[str, Any] = {"protocol": 3, "max_connections": 1024}
HOST = "127.0.0.1"
#: TTL of every cached value: long enough that nothing expires during a measurement.
TTL_S = 60
#: multiprocessing start method: each worker is a fresh interpreter, as in a real
#: deployment, with no state inherited from the harness.
MP = multiprocessing.get_context("spawn")

#: Commands that set a connection up or belong to the harness, not to the library under test.
#: INCR is the origin's call counter (no library measured here sends INCR). PING is *not*
#: here: cashews sends ``PING`` after every failed lock attempt, so it is real traffic; the
#: client side leaves out only redis-py's own health-check PINGs, which it can tell apart.
EXCLUDED_COMMANDS = frozenset(
    {"HELLO", "CLIENT", "AUTH", "SELECT", "INFO", "CONFIG", "COMMAND", "INCR"}
)


def sync_client(port: int) -> redis.Redis:
    """A blocking client with the shared options."""
    return redis.Redis(host=HOST, port=port, **CLIENT_OPTIONS)


def async_client(port: int) -> redis.asyncio.Redis:
    """An asyncio client with the shared options."""
    return redis.asyncio.Redis(host=HOST, port=port, **CLIENT_OPTIONS)


def small_value(name: str) -> dict[str, Any]:
    """What the origin returns in the hit and stampede scenarios: a typical small API answer.

    About 400 bytes of JSON, so the hit ratio shows the per-call overhead of
    each library rather than the decoder's speed on a large document.
    """
    return {
        "name": name,
        "currency": "EUR",
        "quotes": [
            {"t": 1_700_000_000 + i, "bid": 100.0 + i / 8, "ask": 100.5 + i / 8} for i in range(8)
        ],
    }


def large_value(target_bytes: int) -> list[dict[str, Any]]:
    """A JSON-able list of dicts whose orjson encoding is about ``target_bytes`` long.

    Each item carries a 160-character text, so strings, not object headers, make
    up most of the payload, as in real documents.
    """
    text = ("lorem ipsum dolor sit amet consectetur adipiscing elit " * 3)[:150]
    item_bytes = 235  # about the encoded size of one item below
    return [
        {
            "id": i,
            "sku": f"SKU-{i:08d}",
            "price": round(i * 0.37, 2),
            "in_stock": i % 3 != 0,
            "text": f"{i:09d} {text}",
        }  # one string per item, as decoded JSON would have
        for i in range(max(1, target_bytes // item_bytes))
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (``q`` in 0..100) of already sorted ``values``."""
    if not values:
        return float("nan")
    rank = max(1, math.ceil(len(values) * q / 100))
    return float(values[min(len(values), rank) - 1])


def median(values: Sequence[float]) -> float:
    """The median of unsorted ``values`` (NaN when empty)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2


def in_child(function: Callable[..., T], **kwargs: Any) -> T:
    """Run ``function(**kwargs)`` in a fresh spawned process and return its result.

    Measurements run away from the harness process, which holds the server
    handle and earlier scenarios' garbage; ``function`` must be importable.
    """
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=MP) as pool:
        return pool.submit(function, **kwargs).result()


def current_rss_kb() -> int:
    """This process's resident set right now, in KiB (Linux ``/proc``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return peak_rss_kb()


def peak_rss_kb() -> int:
    """The peak resident set of this process so far, in KiB (``ru_maxrss`` is KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _describe(command: Any) -> str:
    """The name of the (first) command in a packed request (RESP: ``*argc``, ``$len``, name)."""
    first = command if isinstance(command, (bytes, bytearray, str)) else next(iter(command), b"")
    head = (first.encode() if isinstance(first, str) else bytes(first[:96])).split(b"\r\n", 3)
    return head[2].decode("ascii", "replace").upper() if len(head) > 2 else "?"


class RequestCounter:
    """Counts the requests this process writes to Redis, by command name (client side).

    One packed request is one round trip: a pipeline counts once, a Lua script
    counts once however many commands it runs inside Redis. That is what the
    server's INFO commandstats cannot tell apart, so the stampede tables show
    both. Installed by patching redis-py's two ``send_packed_command`` methods
    (blocking and asyncio), which every library measured here goes through.
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, command: Any, check_health: bool) -> None:
        name = _describe(command)
        if name in EXCLUDED_COMMANDS or (name == "PING" and not check_health):
            return  # connection set-up, redis-py's health check, or the origin's counter
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    @classmethod
    def install(cls) -> RequestCounter:
        """Start counting every request this process sends from now on."""
        counter = cls()
        sync_class = redis.connection.AbstractConnection
        async_class = redis.asyncio.connection.AbstractConnection
        sync_send: Any = sync_class.send_packed_command
        async_send: Any = async_class.send_packed_command

        def send_sync(self: Any, command: Any, check_health: bool = True) -> None:
            counter.record(command, check_health)
            sync_send(self, command, check_health)

        async def send_async(self: Any, command: Any, check_health: bool = True) -> None:
            counter.record(command, check_health)
            await async_send(self, command, check_health)

        sync_class.send_packed_command = send_sync  # type: ignore[method-assign]
        async_class.send_packed_command = send_async  # type: ignore[method-assign]
        return counter


def server_commands(client: redis.Redis) -> Counter[str]:
    """Commands the server has executed so far, by name, from INFO commandstats.

    Includes the commands Lua scripts run inside Redis (a release script that
    does GET and DEL adds EVALSHA, GET and DEL here), and excludes
    :data:`EXCLUDED_COMMANDS`.
    """
    stats = client.info("commandstats")
    counts: Counter[str] = Counter()
    for field, value in stats.items():
        name = field.removeprefix("cmdstat_").split("|")[0].upper()
        if name not in EXCLUDED_COMMANDS:
            counts[name] += int(value["calls"])
    return counts


def interleaved(
    rows: dict[str, Callable[[], object]], *, rounds: int, per_round: int, seed: int
) -> dict[str, list[int]]:
    """Time each row's call, ns per call, in rounds that run the rows in a new random order.

    Drift in machine load then falls on every row alike; a collection before
    each round keeps one row's garbage from being collected in another's time.
    """
    samples: dict[str, list[int]] = {name: [] for name in rows}
    order, rng, clock = list(rows), random.Random(seed), time.perf_counter_ns
    for _ in range(rounds):
        rng.shuffle(order)
        gc.collect()
        for name in order:
            call, out = rows[name], samples[name]
            for _ in range(per_round):
                started = clock()
                call()
                out.append(clock() - started)
    return samples
