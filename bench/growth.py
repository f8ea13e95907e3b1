"""Scenario 3: how a stampede's cost grows with the number of callers (10 -> 100 -> 1000).

A lock whose waiters poll the lock, or one caller per process that waits while
the rest retry, can look fine at 10 callers and melt at 1000. Each level runs
stampedes on new cold keys from a fleet of worker processes (see
:mod:`bench.stampede`), with the callers spread over the processes as evenly as
possible.
"""

from __future__ import annotations

from typing import Any

from bench.libraries import Library
from bench.stampede import repeat, split, summarise


def measure(
    library: Library, port: int, processes: int, levels: list[int], repeats: int
) -> dict[str, Any]:
    """For each caller count in ``levels``: ``repeats`` stampedes, summarised (median and worst).

    Each level gets a fresh fleet, so callers left over from a level that hung
    cannot reach into the next one.
    """
    results: dict[str, Any] = {}
    for callers in levels:
        per_process = split(callers, processes)
        runs = repeat(library, port, per_process, repeats)
        results[str(callers)] = {
            "per_process": per_process,
            "runs": runs,
            "summary": summarise(runs),
        }
    return {"processes": processes, "levels": results}
