"""Run the benchmarks: start a private redis-server, run each scenario, write the report.

Everything runs in one process tree against one redis-server started here, on
a free loopback port, and stopped at the end (the machine's own Redis is never
touched), so the rows of every table are measured against the same server in
the same run, and their ratios are comparable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import (
    expiry,
    fill,
    growth,
    hit,
    many,
    miss_cost,
    near,
    near_peers,
    payload,
    registry,
    report,
    stampede,
)
from bench.common import sync_client
from bench.libraries import EXPIRY_LIBRARIES, LIBRARIES, Library
from tests.support.redis_servers import RedisServer  # the project's private-server helper

SCENARIOS = (
    "hit",
    "near",
    "near_peers",
    "miss_cost",
    "fill",
    "many",
    "stampede",
    "growth",
    "payload",
    "registry",
    "expiry",
)
VERSIONED = (
    "memofill",
    "redis",
    "hiredis",
    "orjson",
    "dogpile.cache",
    "cashews",
    "aiocache",
    "cachetools",
    "theine",
)
DEFAULT_OUT = Path("bench/results.md")


@dataclass(frozen=True)
class Scale:
    """How much work each scenario does: the full run, or a quick smoke run."""

    hit_iterations: int
    hit_warmup: int
    hit_rounds: int
    processes: int
    threads: int
    repeats: int
    growth_levels: tuple[int, ...]
    growth_repeats: int
    payload_sizes: tuple[int, ...]
    payload_rounds: int
    payload_hits: int
    registry_datasets: int
    registry_repeats: int
    expiry_processes: int
    expiry_callers: int
    expiry_repeats: int
    near_writes: int
    fill_rounds: int
    fill_count: int


FULL = Scale(
    hit_iterations=20_000,
    hit_warmup=2_000,
    hit_rounds=100,
    processes=4,
    threads=25,
    repeats=5,
    growth_levels=(10, 100, 1000),
    growth_repeats=3,
    payload_sizes=(2_000_000, 20_000_000),
    payload_rounds=25,
    payload_hits=3,
    registry_datasets=5_000,
    registry_repeats=5,
    expiry_processes=4,
    expiry_callers=5,
    expiry_repeats=3,
    near_writes=500,
    fill_rounds=8,
    fill_count=500,
)
QUICK = Scale(
    hit_iterations=2_000,
    hit_warmup=200,
    hit_rounds=20,
    processes=2,
    threads=5,
    repeats=2,
    growth_levels=(10, 40),
    growth_repeats=1,
    payload_sizes=(500_000,),
    payload_rounds=2,
    payload_hits=2,
    registry_datasets=500,
    registry_repeats=2,
    expiry_processes=2,
    expiry_callers=3,
    expiry_repeats=1,
    near_writes=50,
    fill_rounds=2,
    fill_count=100,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="memofill side by side with the raw floor, cache-aside, dogpile.cache, "
        "cashews and aiocache, against a private redis-server; and its near hit beside "
        "functools.lru_cache, cachetools and theine.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a fast smoke run at small scale (report to stdout unless --out)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"markdown report path (default {DEFAULT_OUT} for a full run; a quick run or "
        "a subset of scenarios prints its report only)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const=Path("bench/results.json"),
        type=Path,
        metavar="PATH",
        help="also dump every figure as JSON (default path bench/results.json)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "only",
        nargs="*",
        metavar="SCENARIO",
        help="run only these scenarios (as --scenarios does), e.g. `python -m bench expiry`",
    )
    parser.add_argument(
        "--libraries",
        default="",
        help="comma-separated row slugs (default all: "
        + ", ".join(library.slug for library in (*LIBRARIES, *EXPIRY_LIBRARIES))
        + ")",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="PATH",
        help="expiry: write the first expiry of the first row's first run as a timeline trace "
        "(JSON, the data the docs' SVG timeline is drawn from)",
    )
    parser.add_argument(
        "--before",
        default=fill.BEFORE,
        metavar="REF",
        help=f"fill: the commit this tree's fills are compared with (default {fill.BEFORE}, "
        "the last before conditional writes)",
    )
    parser.add_argument(
        "--processes", type=int, help="stampede, growth and expiry worker processes"
    )
    parser.add_argument("--threads", type=int, help="stampede and expiry callers per process")
    parser.add_argument(
        "--repeats",
        type=int,
        help="stampede and expiry runs per row (at least 5 and 3 for publication)",
    )
    return parser


def _choose(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[list[str], list[Library], Scale]:
    chosen = ",".join(args.only) if args.only else args.scenarios
    scenarios = [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    slugs = [slug.strip() for slug in args.libraries.split(",") if slug.strip()]
    every = (*LIBRARIES, *EXPIRY_LIBRARIES)
    known = {library.slug for library in every}
    if set(slugs) - known:
        parser.error(
            f"unknown row(s) {', '.join(sorted(set(slugs) - known))}; "
            f"choose from {', '.join(sorted(known))}"
        )
    libraries = [library for library in every if not slugs or library.slug in slugs]
    scale = QUICK if args.quick else FULL
    overrides = {"processes": args.processes, "threads": args.threads, "repeats": args.repeats}
    for name, value in overrides.items():
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    given = {k: v for k, v in overrides.items() if v is not None}
    expiry_names = {"processes": "expiry_processes", "threads": "expiry_callers"}
    given |= {expiry_names.get(k, "expiry_repeats"): v for k, v in given.items()}
    scale = Scale(**{**scale.__dict__, **given})
    return scenarios, libraries, scale


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _commit() -> str:
    """The commit of the repository this harness lives in (whatever the working directory)."""
    here = Path(__file__).resolve().parent
    try:
        return subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def run(  # noqa: PLR0917
    scenarios: list[str],
    libraries: list[Library],
    scale: Scale,
    command: str,
    quick: bool,
    before: str = fill.BEFORE,
) -> dict[str, Any]:
    """Start a private redis-server, run the scenarios in order, and return every figure."""
    server = RedisServer().start()
    try:
        with sync_client(server.port) as admin:
            redis_version = str(admin.info("server")["redis_version"])
        results: dict[str, Any] = {
            "meta": {
                "command": command,
                "quick": quick,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "redis_server": redis_version,
                "versions": _versions(),
                "commit": _commit(),
                "load_before": _load(),
                "libraries": [library.slug for library in libraries],
                "scale": scale.__dict__,
            }
        }
        expiry_rows = [library for library in libraries if library in EXPIRY_LIBRARIES]
        libraries = [library for library in libraries if library in LIBRARIES]
        fillers = [library for library in libraries if library.fills and not library.hit_only]
        if "hit" in scenarios:  # always with both floors: every ratio needs its own
            rows = [library for library in LIBRARIES if library in libraries or not library.fills]
            _log(f"hit: {scale.hit_iterations:,} calls per row, {len(rows)} rows")
            results["hit"] = hit.measure(
                server.port,
                rows,
                iterations=scale.hit_iterations,
                warmup=scale.hit_warmup,
                rounds=scale.hit_rounds,
            )
            _log(f"hit, fresh and stale: {scale.hit_iterations:,} calls per row")
            results["hit_header"] = hit.measure_header(
                server.port,
                iterations=scale.hit_iterations,
                warmup=scale.hit_warmup,
                rounds=scale.hit_rounds,
            )
            _log(f"hit, typed values: {scale.hit_iterations:,} calls per row")
            results["hit_typed"] = hit.measure_typed(
                server.port,
                iterations=scale.hit_iterations,
                warmup=scale.hit_warmup,
                rounds=scale.hit_rounds,
            )
        if "near" in scenarios:
            _log(f"near: invalidation lag, {scale.near_writes} writes, idle and busy reader")
            results["near"] = near.measure(server.port, writes=scale.near_writes)
        if "near_peers" in scenarios:
            _log(f"near hit beside in-process caches: {scale.hit_iterations:,} calls per row")
            results["near_peers"] = near_peers.measure(
                server.port,
                iterations=scale.hit_iterations,
                warmup=scale.hit_warmup,
                rounds=scale.hit_rounds,
            )
        if "miss_cost" in scenarios:
            _log(f"miss cost: {scale.hit_iterations:,} calls per row")
            results["miss_cost"] = miss_cost.measure(iterations=scale.hit_iterations)
        if "fill" in scenarios:
            _log(f"fill: {scale.fill_rounds} x {scale.fill_count} fills per tree, against {before}")
            results["fill"] = fill.measure(
                server.port, before=before, rounds=scale.fill_rounds, fills=scale.fill_count
            )
        if "many" in scenarios:
            _log(f"many: pages of {many.PAGE} hits, {scale.hit_iterations // 20:,} per row")
            results["many"] = many.measure(server.port, iterations=scale.hit_iterations // 20)
        if "stampede" in scenarios and fillers:
            results["stampede"] = {}
            for library in fillers:
                _log(
                    f"stampede: {library.label}, {scale.processes} x {scale.threads} callers, "
                    f"{scale.repeats} runs"
                )
                results["stampede"][library.slug] = stampede.measure(
                    library, server.port, scale.processes, scale.threads, scale.repeats
                )
        if "growth" in scenarios and fillers:
            results["growth"] = {}
            for library in fillers:
                _log(f"growth: {library.label}, {' -> '.join(map(str, scale.growth_levels))}")
                results["growth"][library.slug] = growth.measure(
                    library,
                    server.port,
                    scale.processes,
                    list(scale.growth_levels),
                    scale.growth_repeats,
                )
        if "payload" in scenarios:
            _log(f"payload: {', '.join(f'{size:,}' for size in scale.payload_sizes)} bytes")
            results["payload"] = payload.measure(
                server.port,
                libraries,
                sizes=list(scale.payload_sizes),
                rounds=scale.payload_rounds,
                hits=scale.payload_hits,
            )
        if "registry" in scenarios:
            _log(f"registry: {scale.registry_datasets:,} datasets, {scale.registry_repeats} runs")
            results["registry"] = {
                "datasets": scale.registry_datasets,
                "seconds": registry.measure(scale.registry_datasets, scale.registry_repeats),
            }
        if "expiry" in scenarios and expiry_rows:
            results["expiry"] = {}
            for library in expiry_rows:
                _log(
                    f"expiry: {library.label}, {scale.expiry_processes} x "
                    f"{scale.expiry_callers} callers, {scale.expiry_repeats} runs"
                )
                results["expiry"][library.slug] = expiry.measure(
                    library, scale.expiry_processes, scale.expiry_callers, scale.expiry_repeats
                )
        results["meta"]["load_after"] = _load()
        return results
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench [--quick] [--out PATH] [--json [PATH]] ...``"""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    scenarios, libraries, scale = _choose(args, parser)
    command = shlex.join(["python", "-m", "bench", *argv])
    results = run(scenarios, libraries, scale, command, args.quick, args.before)
    document = report.render(results)
    # Only a full run replaces the published report; a quick run or a subset prints its own.
    full = not args.quick and set(scenarios) == set(SCENARIOS)
    out = args.out if args.out is not None else (DEFAULT_OUT if full else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(document, encoding="utf-8")
        _log(f"wrote {out}")
    traced = next(
        (row["trace"] for row in results.get("expiry", {}).values() if row.get("trace")), None
    )
    if traced is not None and args.trace is not None:
        args.trace.write_text(json.dumps(traced, indent=1) + "\n", encoding="utf-8")
        _log(f"wrote {args.trace}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
        _log(f"wrote {args.json}")
    print(document)
    return 0
