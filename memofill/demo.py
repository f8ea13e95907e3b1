"""``memofill demo``: a real stampede on a cold dataset, then the same burst uncoordinated.

It runs against ``REDIS_URL`` when set (touching only keys under its own random
prefix, deleted afterwards), or else against an embedded default it starts and
stops itself: a private ``redis-server`` on a free loopback port when one is on
PATH, otherwise an in-process fakeredis TCP server.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from memofill.errors import ConfigurationError
from memofill.instance import Memofill
from memofill.policy import CacheFill, Dataset

#: The registry key the demo fills; its policy comes from the generated registry when present.
DEMO_DATASET = "demo:stampede:{run}"
#: Used when the generated registry cannot be loaded (the demo run outside a project).
FALLBACK_POLICY = Dataset(
    DEMO_DATASET,
    ttl_s=60,
    negative_ttl_s=10,
    cache_fill=CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=250),
)


@attrs.frozen
class Settings:
    """One demo run's shape."""

    procs: int = 4
    threads: int = 25
    origin_ms: int = 200
    dataset: Dataset = FALLBACK_POLICY


class CountingRedis(redis.Redis):
    """A client that counts its commands: one round trip each (the demo sends no pipelines)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = 0
        self._count_lock = threading.Lock()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        with self._count_lock:
            self.sent += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_server_command(executable: str, port: int, directory: str) -> list[str]:
    """A ``redis-server`` on loopback ``port`` that keeps nothing on disk (demo and tests)."""
    return [
        executable,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        directory,
    ]


@contextlib.contextmanager
def embedded_redis() -> Iterator[tuple[str, str]]:
    """Start a private Redis for the demo; yields ``(url, kind)`` and stops it on exit."""
    server = shutil.which("redis-server")
    if server is not None:
        port, directory = _free_port(), tempfile.mkdtemp(prefix="memofill-demo-")
        process = subprocess.Popen(
            private_server_command(server, port, directory),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            _wait_for(url, process)
            yield url, "redis-server"
        finally:
            process.terminate()
            process.wait(timeout=10)
            shutil.rmtree(directory, ignore_errors=True)
        return
    try:
        from fakeredis import TcpFakeServer  # noqa: PLC0415  # only when no redis-server exists
    except ImportError:
        raise ConfigurationError(
            "no REDIS_URL, no redis-server on PATH, and fakeredis is not installed: "
            "install redis-server or `pip install 'memofill[test]'`"
        ) from None
    port = _free_port()
    fake = TcpFakeServer(("127.0.0.1", port))
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{port}/0", "fakeredis"
    finally:
        fake.shutdown()
        fake.server_close()


def _wait_for(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with contextlib.closing(redis.Redis.from_url(url, socket_timeout=0.5)) as probe:
                probe.ping()
                return
        except redis.RedisError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise ConfigurationError("the embedded redis-server did not start") from None
            time.sleep(0.02)


@attrs.frozen
class _Burst:
    """What every process of one burst shares: where, which key, and whether to coordinate."""

    url: str
    prefix: str
    settings: Settings
    coordinated: bool
    run: str


def _caller_worker(burst: _Burst, proc: int, barrier: Any, results: Any) -> None:
    """One process of the stampede: ``threads`` callers, released with every other process's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    settings, prefix, run = burst.settings, burst.prefix, burst.run
    pool = redis.ConnectionPool.from_url(burst.url, max_connections=settings.threads + 4)
    client = CountingRedis(connection_pool=pool)
    counter = redis.Redis.from_url(burst.url)  # the origin's own bookkeeping, not cache traffic
    dataset = settings.dataset
    origin_key = f"{prefix}origin-calls:{run}"

    def origin(run: str) -> dict[str, Any]:
        counter.incr(origin_key)
        time.sleep(settings.origin_ms / 1000)
        return {"run": run, "rows": list(range(50))}

    call: Callable[[str], Any]
    if burst.coordinated:
        memofill = Memofill(client, prefix=prefix, policies={dataset.key: dataset})
        call = memofill.cached_dataset(dataset.key)(origin).call_with_outcome
    else:
        key = prefix + dataset.template.render({"run": run})
        call = _cache_aside(client, key, origin, round(dataset.ttl_s * 1000))
    _warm_up(client, settings.threads)
    sent_before = client.sent
    rows: list[dict[str, Any]] = []

    def one(thread: int) -> None:
        barrier.wait()
        start = time.monotonic()
        outcome, led = "error", False
        try:
            result = call(run)
            outcome, led = result.outcome, result.led
        finally:
            end = time.monotonic()
            row = {"proc": proc, "thread": thread, "start": start, "end": end}
            rows.append({**row, "outcome": outcome, "led": led})

    threads = [threading.Thread(target=one, args=(n,)) for n in range(settings.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put({"rows": rows, "sent": client.sent - sent_before})


@attrs.frozen
class _Plain:
    value: Any
    outcome: str
    led: bool


def _cache_aside(client: redis.Redis, key: str, origin: Any, ttl_ms: int) -> Any:
    """Plain cache-aside, no coordination: what every caller does without memofill."""

    def call(run: str) -> _Plain:
        raw = client.get(key)
        if raw is not None:
            return _Plain(orjson.loads(raw), "hit", False)
        value = origin(run)
        client.set(key, orjson.dumps(value), px=ttl_ms)
        return _Plain(value, "uncoordinated_fill", True)

    return call


def _warm_up(client: redis.Redis, connections: int) -> None:
    """Open the pool's connections now, so the stampede measures commands, not handshakes."""
    pool = client.connection_pool
    opened = [pool.get_connection() for _ in range(connections)]
    for connection in opened:
        pool.release(connection)


def run_burst(url: str, prefix: str, settings: Settings, coordinated: bool) -> dict[str, Any]:
    """Release ``procs`` × ``threads`` callers at one cold key; return what they saw."""
    run = uuid.uuid4().hex[:8]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(settings.procs * settings.threads + 1)
    results = context.Queue()
    processes = [
        context.Process(
            target=_caller_worker,
            args=(_Burst(url, prefix, settings, coordinated, run), proc, barrier, results),
        )
        for proc in range(settings.procs)
    ]
    try:
        for process in processes:
            process.start()
        barrier.wait(timeout=60)
        released = time.monotonic()
        reports = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=10)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        origin_calls = int(client.get(f"{prefix}origin-calls:{run}") or 0)
    rows = sorted((row for report in reports for row in report["rows"]), key=lambda r: r["start"])
    for row in rows:
        row["start_ms"] = round((row.pop("start") - released) * 1000, 2)
        row["end_ms"] = round((row.pop("end") - released) * 1000, 2)
    return {
        "callers": len(rows),
        "origin_calls": origin_calls,
        "outcomes": dict(sorted(Counter(row["outcome"] for row in rows).items())),
        "latency_ms": _percentiles([row["end_ms"] - row["start_ms"] for row in rows]),
        "redis_round_trips": sum(report["sent"] for report in reports),
        "rows": rows,
    }


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 1)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 1)}


def _cleanup(url: str, prefix: str) -> None:
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        keys += list(client.scan_iter(match=f"{{{prefix}*", count=1000))
        if keys:
            client.delete(*keys)


def run_demo(settings: Settings, url: str | None, progress: Any = sys.stderr) -> dict[str, Any]:
    """Run both bursts against ``url`` or an embedded Redis; return the report."""
    with contextlib.ExitStack() as stack:
        kind = "url"
        if url is None:
            url, kind = stack.enter_context(embedded_redis())
        else:
            check_reachable(url)
        prefix = f"memofill-demo:{uuid.uuid4().hex[:8]}:"
        print(f"redis: {kind} at {redact(url)}", file=progress)
        try:
            callers = settings.procs * settings.threads
            print(
                f"burst 1/2: {callers} callers, coordinated ({settings.dataset.key}) ...",
                file=progress,
                flush=True,
            )
            coordinated = run_burst(url, prefix, settings, coordinated=True)
            print(f"burst 2/2: {callers} callers, plain cache-aside ...", file=progress, flush=True)
            plain = run_burst(url, prefix, settings, coordinated=False)
        finally:
            if kind == "url":
                _cleanup(url, prefix)
    return {**coordinated, "redis": kind, "origin_ms": settings.origin_ms, "uncoordinated": plain}


def format_table(report: dict[str, Any]) -> str:
    """The two bursts side by side, as the terminal shows them."""
    plain = report["uncoordinated"]
    lines = [
        f"{'':24}{'memofill':>14}{'cache-aside':>14}",
        f"{'callers':24}{report['callers']:>14}{plain['callers']:>14}",
        f"{'origin calls':24}{report['origin_calls']:>14}{plain['origin_calls']:>14}",
    ]
    trips = "redis_round_trips"
    lines.append(f"{'redis round trips':24}{report[trips]:>14}{plain[trips]:>14}")
    for name in ("p50", "p95", "p99", "max"):
        lines.append(
            f"{'latency ' + name + ' (ms)':24}{report['latency_ms'][name]:>14}"
            f"{plain['latency_ms'][name]:>14}"
        )
    lines.append("")
    lines.append("outcomes (memofill):")
    lines.extend(f"  {name:22}{count:>6}" for name, count in report["outcomes"].items())
    lines.append(f"origin latency: {report['origin_ms']} ms; redis: {report['redis']}")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` object: the report without per-caller rows."""
    keys = ("callers", "origin_calls", "outcomes", "latency_ms", "redis_round_trips")
    result = {key: report[key] for key in keys}
    result["redis"] = report["redis"]
    result["uncoordinated"] = {key: report["uncoordinated"][key] for key in keys}
    return result


def trace(report: dict[str, Any]) -> dict[str, Any]:
    """The coordinated burst as a timeline trace (see :mod:`memofill.timeline`)."""
    return {
        "origin_ms": report["origin_ms"],
        "origin_calls": report["origin_calls"],
        "callers": report["rows"],
    }


def redis_url_from_env() -> str | None:
    """``REDIS_URL`` when set and not empty."""
    return os.environ.get("REDIS_URL") or None


#: A URL's ``user:password@`` part (the password up to the last ``@`` of the host part).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#]*@")
#: A password passed as a query parameter, as redis-py also accepts.
_QUERY_PASSWORD = re.compile(r"(?P<name>[?&]password=)[^&\s'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``.

    Every message the command line prints goes through here, so a URL quoted
    by redis-py, by urllib or by memofill itself never shows a password.
    """
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _QUERY_PASSWORD.sub(r"\g<name>***", text)


def check_reachable(url: str) -> None:
    """Fail within seconds, with one line, when ``url`` is malformed or no Redis answers there.

    Without this the demo's caller processes would die connecting and the
    parent would wait out its 60 s start barrier; one PING with short timeouts
    and no retries tells the user at once.
    """
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )
    except ValueError as exc:
        raise ConfigurationError(f"REDIS_URL {redact(url)!r} is not a Redis URL: {exc}") from None
    try:
        with contextlib.closing(client):
            client.ping()
    except redis.RedisError as exc:
        raise ConfigurationError(f"cannot reach Redis at REDIS_URL {redact(url)}: {exc}") from None
