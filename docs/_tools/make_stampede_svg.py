"""Make the docs' picture of a real stampede: docs/_static/stampede-trace.json and stampede.svg.

Run from the repository root::

    python docs/_tools/make_stampede_svg.py                 # run a stampede, then draw it
    python docs/_tools/make_stampede_svg.py --trace FILE    # draw a trace made elsewhere

Without ``--trace``, it starts a private ``redis-server`` on a free loopback
port (never the machine's own Redis), then runs ``--procs`` processes of
``--threads`` threads each. Every thread waits for one common release moment,
then calls the same cold, coordinated dataset (``demo:stampede:{run}`` from the
project's registry) whose fetch sleeps ``--origin-ms``, and records when its
call started and ended and the outcome :meth:`memofill.CachedDataset.call_with_outcome`
reported. Times are ms after the release. ``landed_ms`` is when the leader's
origin call returned (its value is written to Redis a fraction of a ms later).

The output is committed: building the docs never runs Redis.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "docs" / "_static"
if str(ROOT) not in sys.path:  # gen.cache_fill_registry and tests.redis_servers
    sys.path.insert(0, str(ROOT))

from memofill.timeline import render_svg  # noqa: E402  # needs ROOT on sys.path first

DATASET = "demo:stampede:{run}"
PREFIX = "docs:"


def _worker(proc: int, job: dict[str, Any]) -> None:
    """One process of the stampede: ``threads`` callers released together by ``go``."""
    import redis  # noqa: PLC0415  # imported in the child, after the spawn

    from memofill import CachedDataset, Memofill  # noqa: PLC0415

    threads, port, origin_ms = job["threads"], job["port"], job["origin_ms"]
    ready, go, origin_calls, results = job["ready"], job["go"], job["origin_calls"], job["results"]

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    client.ping()  # connect before the release, as a warm server process would have
    cache = Memofill(client, prefix=PREFIX, policies="gen.cache_fill_registry")
    landed: list[float] = []

    def origin(run: str) -> dict[str, Any]:
        with origin_calls.get_lock():
            origin_calls.value += 1
        time.sleep(origin_ms / 1000)
        landed.append(time.monotonic())
        return {"run": run, "rows": list(range(100))}

    fetch = cast("CachedDataset", cache.cached_dataset(DATASET)(origin))

    callers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def call(thread: int) -> None:
        go.wait()
        start = time.monotonic()
        result = fetch.call_with_outcome(run="docs")
        end = time.monotonic()
        record = {
            "proc": proc,
            "thread": thread,
            "start": start,
            "end": end,
            "outcome": result.outcome,
            "led": result.led,
        }
        with lock:
            callers.append(record)

    workers = [threading.Thread(target=call, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    ready.wait()
    for worker in workers:
        worker.join()
    results.put({"callers": callers, "landed": landed})
    client.close()


def run_stampede(procs: int, threads: int, origin_ms: int) -> dict[str, Any]:
    """Run one stampede against a private redis-server and return its trace."""
    from tests.redis_servers import running_server  # noqa: PLC0415  # only for a live run

    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(procs + 1)
    go = context.Event()
    origin_calls = context.Value("i", 0)
    results = context.Queue()
    with running_server() as server:
        job = {
            "threads": threads,
            "port": server.port,
            "origin_ms": origin_ms,
            "ready": ready,
            "go": go,
            "origin_calls": origin_calls,
            "results": results,
        }
        children = [context.Process(target=_worker, args=(proc, job)) for proc in range(procs)]
        for child in children:
            child.start()
        ready.wait(timeout=60)
        time.sleep(0.2)  # every thread is now blocked on the release
        released = time.monotonic()
        go.set()
        reports = [results.get(timeout=60) for _ in children]
        for child in children:
            child.join(timeout=60)

    def ms(moment: float) -> float:
        return round((moment - released) * 1000, 1)

    callers = [
        {
            "proc": c["proc"],
            "thread": c["thread"],
            "start_ms": ms(c["start"]),
            "end_ms": ms(c["end"]),
            "outcome": c["outcome"],
            "led": c["led"],
        }
        for report in reports
        for c in report["callers"]
    ]
    callers.sort(key=lambda c: (c["proc"], c["thread"]))
    landed = sorted(moment for report in reports for moment in report["landed"])
    trace: dict[str, Any] = {"origin_ms": origin_ms, "origin_calls": origin_calls.value}
    if landed:
        trace["landed_ms"] = ms(landed[0])
    trace["callers"] = callers
    return trace


def dump_trace(trace: dict[str, Any]) -> str:
    """The trace as JSON with one caller a line, so a re-run diffs readably."""
    head = {key: value for key, value in trace.items() if key != "callers"}
    lines = [json.dumps(caller) for caller in trace["callers"]]
    body = ",\n    ".join(lines)
    opening = json.dumps(head)[:-1]
    return f'{opening}, "callers": [\n    {body}\n]}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, help="draw this trace instead of running one")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--origin-ms", type=int, default=200)
    parser.add_argument("--out", type=Path, default=STATIC, help="directory to write into")
    args = parser.parse_args(argv)
    if args.trace:
        trace = json.loads(args.trace.read_text())
    else:
        trace = run_stampede(args.procs, args.threads, args.origin_ms)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stampede-trace.json").write_text(dump_trace(trace))
    (args.out / "stampede.svg").write_text(render_svg(trace))
    counts: dict[str, int] = {}
    for caller in trace["callers"]:
        counts[caller["outcome"]] = counts.get(caller["outcome"], 0) + 1
    print(f"origin calls: {trace.get('origin_calls')}; outcomes: {counts}")
    print(f"wrote {args.out / 'stampede-trace.json'} and {args.out / 'stampede.svg'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
