"""``memofill purge``: free the memory one dataset's keys take, within one prefix and no further.

Also how any command finds one dataset's keys under a prefix: ``memofill
invalidate`` asks :func:`first_key` whether there is anything to invalidate.

Never needed for correctness (values expire by their own TTL, and a dataset
invalidation makes old ones unservable at once); it frees memory sooner. Keys
are found with ``SCAN MATCH <prefix><literal head of the key>*`` (on every
primary of a Redis Cluster) and each one is checked against the dataset's key
template before it is removed with ``UNLINK``, in batches with a pause between
them, so that a large purge neither blocks Redis nor removes a key of another
dataset or of another prefix: deleting by a pattern that was one character
too wide is how caches have wiped whole databases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs

from memofill.commands import Commands
from memofill.inspection import glob_escape, match_final_key
from memofill.policy import Dataset


@attrs.frozen
class Purged:
    """What a purge did: keys looked at, and keys removed."""

    scanned: int
    removed: int


def purge(
    client: Any,
    prefix: str,
    dataset: Dataset,
    *,
    batch: int = 1000,
    pause_s: float = 0.01,
    sleep: Callable[[float], None] = time.sleep,
) -> Purged:
    """Remove every key of ``dataset`` under ``prefix``; return what was done.

    Lock and wake keys (``{...}#lock``) are left to expire: they live for a
    lease at most, and removing a lock a leader holds would let a second one in.
    """
    commands = Commands(client)
    scanned, removed, pending = 0, 0, []
    for raw in commands.scan_keys(scan_pattern(prefix, dataset), batch):
        scanned += 1
        if is_key_of(prefix, dataset, raw):
            pending.append(raw)
        if len(pending) >= batch:
            removed += commands.unlink(pending)
            pending = []
            sleep(pause_s)
    if pending:
        removed += commands.unlink(pending)
    return Purged(scanned, removed)


def scan_pattern(prefix: str, dataset: Dataset) -> str:
    """``<prefix><literal head of the key>*``, glob-escaped: a superset of the dataset's keys."""
    template = dataset.template
    return glob_escape(prefix + template.parts[0]) + ("*" if template.fields else "")


def is_key_of(prefix: str, dataset: Dataset, raw: bytes | str) -> bool:
    """Whether the Redis key ``raw`` is a value key of ``dataset`` under ``prefix``."""
    key = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)
    return match_final_key({dataset.key: dataset}, prefix, key) is dataset


def first_key(client: Any, prefix: str, dataset: Dataset, *, count: int = 1000) -> Any:
    """A key of ``dataset`` under ``prefix``, or ``None`` when there is none.

    ``SCAN ... MATCH`` in steps of ``count`` (on every primary of a cluster),
    stopping at the first key of the dataset: one step when values are there,
    the whole keyspace only when none is.
    """
    for raw in Commands(client).scan_keys(scan_pattern(prefix, dataset), count):
        if is_key_of(prefix, dataset, raw):
            return raw
    return None
