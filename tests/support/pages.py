"""Several spawned processes paging over overlapping windows of one cold set of keys at once.

Each process runs ``target(port, prefix, window, barrier, out)``: it makes its
own instance, waits on the barrier so that all call together, and puts whether
its page came back right on ``out``. The caller asserts what Redis recorded.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

#: Seconds a process may take to start, page and answer.
PATIENCE_S = 60.0

#: The windows of the 40-key cold set the bulk tests page over: each key in one to four.
SYMBOLS = [f"K{n}" for n in range(40)]
WINDOWS = [SYMBOLS[0:20], SYMBOLS[10:30], SYMBOLS[20:40], SYMBOLS[5:35]]


def page_together(target: Callable[..., None], port: int, prefix: str) -> list[bool]:
    """Run ``target`` in one spawned process per window of :data:`WINDOWS`; their answers."""
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(len(WINDOWS)), context.Queue()
    processes = [
        context.Process(target=target, args=(port, prefix, window, barrier, out))
        for window in WINDOWS
    ]
    for process in processes:
        process.start()
    try:
        return [out.get(timeout=PATIENCE_S) for _ in processes]
    finally:
        for process in processes:
            process.join(PATIENCE_S)


def fetched(client: Any, prefix: str) -> dict[str, int]:
    """How often each key was fetched, as the processes counted in ``<prefix>fetched``."""
    return {k.decode(): int(v) for k, v in client.hgetall(prefix + "fetched").items()}
