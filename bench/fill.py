"""What one fill costs, this tree against an earlier commit's, in one run.

A fill is the miss path's leader: the lock's round trip, the fetch, the write
and the release. Conditional writes (stamped with Redis's clock, refused when
something newer was decided) changed what that costs; this scenario measures
it against the commit before them (or any ``--before`` commit) on the same
redis-server in the same run, so the difference is the code's alone.

The earlier tree is taken with ``git archive`` into a temporary directory;
each child process imports memofill from one of the two trees (its working
directory, first on ``sys.path``), times one caller's fills on fresh keys
(the origin returns at once, so the fill's own cost is what is timed) and
counts the requests it sends (client side, one per round trip) and the
commands Redis ran (``INFO commandstats``, the commands inside scripts
included). The children alternate, a new one per round, so drift in machine
load falls on both trees alike. Each child also times the floor of any miss,
``GET`` then ``SET`` (cache-aside without a lock), and each tree's median is
divided by the floor's median over the same rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    RequestCounter,
    async_client,
    median,
    percentile,
    server_commands,
    small_value,
    sync_client,
)

#: The last commit before conditional writes, stamps and tombs: the default ``--before``.
BEFORE = "3757d41"
ROOT = Path(__file__).resolve().parent.parent
MODES = ("sync", "asyncio")


def earlier_tree(ref: str, into: Path) -> Path:
    """The ``memofill`` package of commit ``ref``, extracted under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "memofill"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    target = into / ref
    target.mkdir(parents=True)
    with tempfile.TemporaryFile() as raw:
        raw.write(archive)
        raw.seek(0)
        with tarfile.open(fileobj=raw) as tar:
            tar.extractall(target, filter="data")  # our own repository's archive
    return target


def _child(port: int, fills: int, warmup: int) -> dict[str, Any]:
    """In a fresh process: the fills' and the floor's times (ns) and counts, per mode."""
    import memofill  # noqa: PLC0415  # from this process's tree: the working directory

    counter = RequestCounter.install()
    admin = sync_client(port)
    prefix = f"f{uuid.uuid4().hex[:8]}:"
    dataset = memofill.Dataset(
        "fill:{n}",
        ttl_s=60,
        cache_fill=memofill.CacheFill(
            lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=250
        ),
    )
    out: dict[str, Any] = {"memofill": memofill.__file__}
    for mode in MODES:
        client = sync_client(port) if mode == "sync" else async_client(port)
        cache = memofill.Memofill(client, prefix=prefix + mode, policies=[dataset])

        def origin(n: int) -> dict[str, Any]:
            return small_value(str(n))

        async def origin_async(n: int) -> dict[str, Any]:
            return small_value(str(n))

        fill = cache.cached_dataset("fill:{n}")(origin if mode == "sync" else origin_async)
        floor = _floor(client, prefix + mode + "floor:", mode)
        if mode == "sync":
            out[mode] = _time_sync(fill, floor, counter, admin, fills, warmup)
        else:
            out[mode] = asyncio.run(_time_async(fill, floor, counter, admin, fills, warmup, client))
        if mode == "sync":
            client.close()
    admin.close()
    return out


def _floor(client: Any, prefix: str, mode: str) -> Callable[[int], Any]:
    """A miss with nothing but its two round trips: ``GET`` (nothing), fetch, ``SET``."""
    if mode == "sync":

        def miss(n: int) -> Any:
            key = f"{prefix}{n}"
            raw = client.get(key)
            if raw is not None:
                return orjson.loads(raw)
            value = small_value(str(n))
            client.set(key, orjson.dumps(value), px=60_000)
            return value

        return miss

    async def miss_async(n: int) -> Any:
        key = f"{prefix}{n}"
        raw = await client.get(key)
        if raw is not None:
            return orjson.loads(raw)
        value = small_value(str(n))
        await client.set(key, orjson.dumps(value), px=60_000)
        return value

    return miss_async


def _time_sync(  # noqa: PLR0917
    fill: Any, floor: Any, counter: RequestCounter, admin: Any, fills: int, warmup: int
) -> dict[str, Any]:
    clock = time.perf_counter_ns
    for n in range(-warmup, 0):  # scripts loaded, connections made, marks read
        fill(n)
        floor(n)
    times: dict[str, list[int]] = {"memofill": [], "floor": []}
    counts: dict[str, Any] = {}
    for row, call in (("memofill", fill), ("floor", floor)):
        sent, ran = counter.snapshot(), server_commands(admin)
        for n in range(fills):
            started = clock()
            call(n)
            times[row].append(clock() - started)
        counts[row] = _counts(counter.snapshot() - sent, server_commands(admin) - ran, fills)
    return {"times": times, "counts": counts}


async def _time_async(  # noqa: PLR0917
    fill: Any, floor: Any, counter: RequestCounter, admin: Any, fills: int, warmup: int, client: Any
) -> dict[str, Any]:
    clock = time.perf_counter_ns
    for n in range(-warmup, 0):
        await fill(n)
        await floor(n)
    times: dict[str, list[int]] = {"memofill": [], "floor": []}
    counts: dict[str, Any] = {}
    for row, call in (("memofill", fill), ("floor", floor)):
        sent, ran = counter.snapshot(), server_commands(admin)
        for n in range(fills):
            started = clock()
            await call(n)
            times[row].append(clock() - started)
        counts[row] = _counts(counter.snapshot() - sent, server_commands(admin) - ran, fills)
    await client.aclose()  # on the loop its connections were made on
    return {"times": times, "counts": counts}


def _counts(sent: Any, ran: Any, fills: int) -> dict[str, Any]:
    """Per fill: requests sent (round trips) and commands Redis ran, with their names."""
    ran.pop("INFO", None)
    return {
        "round_trips": sum(sent.values()) / fills,
        "commands": sum(ran.values()) / fills,
        "sent": {name: count / fills for name, count in sorted(sent.items())},
        "ran": {name: count / fills for name, count in sorted(ran.items())},
    }


def _run_child(tree: Path, port: int, fills: int, warmup: int) -> dict[str, Any]:
    """One child on ``tree`` (its working directory; this repository next, for ``bench``)."""
    code = (
        "import json, sys; from bench.fill import _child; "
        f"json.dump(_child({port}, {fills}, {warmup}), sys.stdout)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def measure(port: int, *, before: str, rounds: int, fills: int) -> dict[str, Any]:
    """Every figure of the scenario: per tree and mode, medians, p99s and counts per fill."""
    with tempfile.TemporaryDirectory(prefix="memofill-before-") as scratch:
        trees = {f"before ({before})": earlier_tree(before, Path(scratch)), "this tree": ROOT}
        samples: dict[str, dict[str, dict[str, list[int]]]] = {
            name: {mode: {"memofill": [], "floor": []} for mode in MODES} for name in trees
        }
        counts: dict[str, dict[str, Any]] = {}
        for round_ in range(rounds):
            order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
            for name in order:
                child = _run_child(trees[name], port, fills, warmup=50)
                expected = Path(trees[name], "memofill", "__init__.py").resolve()
                if Path(child["memofill"]).resolve() != expected:
                    raise RuntimeError(f"{name}: imported {child['memofill']}, not {expected}")
                for mode in MODES:
                    for row in ("memofill", "floor"):
                        samples[name][mode][row] += child[mode]["times"][row]
                    counts.setdefault(name, {})[mode] = child[mode]["counts"]
    result: dict[str, Any] = {"before": before, "fills": fills * rounds, "rows": {}}
    for name, modes in samples.items():
        for mode, rows in modes.items():
            times, floor = sorted(rows["memofill"]), sorted(rows["floor"])
            result["rows"][f"{name}|{mode}"] = {
                "tree": name,
                "mode": mode,
                "median_us": median(times) / 1000,
                "p99_us": percentile(times, 99) / 1000,
                "floor_us": median(floor) / 1000,
                "x_floor": median(times) / median(floor),
                **counts[name][mode]["memofill"],
                "floor_round_trips": counts[name][mode]["floor"]["round_trips"],
            }
    return result


def render(data: dict[str, Any]) -> list[str]:
    """The report's section."""
    lines = [
        "",
        "## One fill, before and after conditional writes",
        "",
        f"{data['fills']:,} fills per row, one caller, on fresh keys (the origin returns at "
        f"once): this tree against commit {data['before']}, each in its own processes, "
        "alternating, on one redis-server. *× floor*: the median over the median of a "
        "lock-free cache-aside miss (`GET`, then `SET`: two round trips) timed in the same "
        "processes. *Round trips*: requests the process sent per fill (a script is one); "
        "*commands*: what Redis ran per fill, the commands inside scripts included.",
        "",
        "| tree | mode | round trips | commands | median µs | p99 µs | × floor | sent per fill |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in data["rows"].values():
        sent = ", ".join(f"{name} {count:g}" for name, count in row["sent"].items())
        lines.append(
            f"| {row['tree']} | {row['mode']} | {row['round_trips']:.2f} | "
            f"{row['commands']:.2f} | {row['median_us']:.0f} | {row['p99_us']:.0f} | "
            f"{row['x_floor']:.2f} | {sent} |"
        )
    return [*lines, ""]
