"""``python -m bench.registry``: how long a large registry takes to generate and to load.

Every process that uses memofill validates its policies when it loads them
(:func:`memofill.load_policies`), and ``memofill gen`` validates the registry
before it writes; both check every pair of keys for overlap. This measures the
two for a registry of ``--datasets`` entries (5,000 by default) shaped like a
real one: most keys start with a literal service name, some with a field, some
are plain literals, and they mix ``:`` and ``/``. No Redis is involved.

``memofill gen`` runs as the command it is (``python -m memofill gen``), so its
time includes the interpreter's start-up and imports; the same command on a
one-dataset registry is measured beside it, as that share.

Printed as a Markdown table: the median and the worst of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

from memofill import load_policies

_FILL = "CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=250)"


def registry_source(count: int) -> str:
    """A registry file of ``count`` datasets, none of which overlaps another."""
    lines = ["from memofill import CacheFill, Dataset", "", "DATASETS = ["]
    for index in range(count):
        kind = index % 5
        if kind == 0:
            key = f"svc{index % 40}:entity{index}:{{id}}"
        elif kind == 1:
            key = f"tenant/{{tenant}}/report{index}.json"
        elif kind == 2:
            key = f"static:page{index}:v1"
        elif kind == 3:
            key = f"{{region}}:feed{index}:{{day}}"
        else:
            key = f"svc{index % 40}:list{index}:{{page}}/{{size}}"
        fill = _FILL if index % 2 else "None"
        lines.append(
            f"    Dataset({key!r}, ttl_s={60 + index % 600}, negative_ttl_s=30, cache_fill={fill}),"
        )
    lines.append("]")
    return "\n".join(lines) + "\n"


def _timed(action: Callable[[], object], repeats: int) -> list[tuple[float, float]]:
    """``(wall, cpu)`` seconds of each run: on a busy machine the CPU time is the steadier."""
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def _timed_command(command: list[str], repeats: int) -> list[tuple[float, float]]:
    """``(wall, cpu)`` seconds of each run of ``command``, the CPU time being the child's."""
    times = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        times.append((wall, cpu))
    return times


def _gen(registry: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "memofill", "gen", "--registry", str(registry), "--out", str(out)]


def measure(count: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Seconds per run: ``memofill gen`` (a process; and its start-up alone), and loading the
    module it wrote."""
    with tempfile.TemporaryDirectory(prefix="memofill-bench-registry-") as directory:
        registry, out = Path(directory, "registry.py"), Path(directory, "policies.py")
        registry.write_text(registry_source(count), encoding="utf-8")
        one, one_out = Path(directory, "one.py"), Path(directory, "one_policies.py")
        one.write_text(registry_source(1), encoding="utf-8")
        generated = _timed_command(_gen(registry, out), repeats)
        started = _timed_command(_gen(one, one_out), repeats)
        code = compile(out.read_text(encoding="utf-8"), str(out), "exec")

        def load() -> None:
            module = types.ModuleType("bench_registry_policies")
            exec(code, module.__dict__)
            policies = load_policies(module)
            assert len(policies) == count

        return {"generate": generated, "start-up": started, "load": _timed(load, repeats)}


def render(count: int, results: dict[str, list[tuple[float, float]]]) -> str:
    """The Markdown table of :func:`measure`'s results, in milliseconds."""
    rows = [
        "| registry | step | wall median | wall worst | CPU median | CPU worst |",
        "|---|---|---:|---:|---:|---:|",
    ]
    names = {
        "generate": "`memofill gen` (the command, start-up included)",
        "start-up": "of which start-up (`memofill gen` of 1 dataset)",
        "load": "`load_policies` (generated module)",
    }
    for step, times in results.items():
        walls, cpus = [t[0] * 1000 for t in times], [t[1] * 1000 for t in times]
        cells = [statistics.median(walls), max(walls), statistics.median(cpus), max(cpus)]
        numbers = " | ".join(f"{cell:.0f} ms" for cell in cells)
        size = "1 dataset" if step == "start-up" else f"{count:,} datasets"
        rows.append(f"| {size} | {names[step]} | {numbers} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.registry", description=__doc__)
    parser.add_argument("--datasets", type=int, default=5_000, help="registry size")
    parser.add_argument("--repeats", type=int, default=5, help="runs per step")
    args = parser.parse_args(argv)
    results = measure(args.datasets, args.repeats)
    print(render(args.datasets, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
