"""``memofill inspect``: one dataset entry as Redis holds it now, for an operator at a terminal."""

from __future__ import annotations

import contextlib
from typing import Any

import redis

from memofill.codec import CORRUPT, NEGATIVE, ErrorMarker, decode_special
from memofill.commands import Commands
from memofill.errors import ConfigurationError, KeyArgumentError
from memofill.keys import lock_key, parse_template
from memofill.policy import Dataset


def field_values(dataset: Dataset, arguments: list[str]) -> dict[str, str]:
    """Key fields from ``name=value`` words, or plain values in the template's field order."""
    fields = dataset.template.fields
    values: dict[str, str] = {}
    positional = [word for word in arguments if "=" not in word]
    for word in arguments:
        if "=" in word:
            name, _, value = word.partition("=")
            if name not in fields:
                raise KeyArgumentError(
                    f"{dataset.key!r} has no field {name!r} (fields: {', '.join(fields) or 'none'})"
                )
            values[name] = value
    remaining = [name for name in fields if name not in values]
    if len(positional) > len(remaining):
        raise KeyArgumentError(f"{dataset.key!r} takes {len(fields)} field value(s), got more")
    values.update(zip(remaining, positional, strict=False))
    missing = [name for name in fields if name not in values]
    if missing:
        raise KeyArgumentError(f"{dataset.key!r} needs a value for {', '.join(missing)}")
    return values


def _ttl(milliseconds: int) -> str:
    if milliseconds == -2:
        return "absent"
    if milliseconds == -1:
        return "no expiry"
    return f"{milliseconds / 1000:.3f} s"


def _kind(head: bytes, size: int) -> str:
    if size == 0:
        return "none"
    special = decode_special(head) if head[:1] == b"\0" else None
    if special is NEGATIVE:
        return "negative marker (the fetch returned None)"
    if isinstance(special, ErrorMarker):
        return f"error marker (the last fill raised {special.error})"
    if special is CORRUPT:
        return "not a memofill value (corrupt or foreign bytes)"
    return "JSON value"


def inspect_entry(
    url: str, prefix: str, dataset: Dataset, arguments: list[str]
) -> list[tuple[str, str]]:
    """The lines ``memofill inspect`` prints, as ``(label, value)`` pairs."""
    final = prefix + parse_template(dataset.key).render(field_values(dataset, arguments))
    lock = lock_key(final)
    fill = dataset.cache_fill
    policy = (
        "none (legacy: process-local singleflight)"
        if fill is None
        else (
            f"lease_ms={fill.lease_ms} wait_ms={fill.wait_ms} "
            f"poll_min_ms={fill.poll_min_ms} poll_max_ms={fill.poll_max_ms}"
        )
    )
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    except ValueError as exc:
        raise ConfigurationError(f"bad Redis URL {url!r}: {exc}") from None
    with contextlib.closing(client):
        data_ttl, size, head, lock_ttl, holder = Commands(client).describe(final, lock)
    token: Any = holder.decode(errors="replace") if holder else "none"
    return [
        ("dataset", dataset.key),
        (
            "ttl",
            f"{dataset.ttl_s} s, negative {dataset.negative_ttl_s} s, "
            f"error {dataset.error_ttl_s} s",
        ),
        ("fill policy", policy),
        ("final key", final),
        ("lock key", lock),
        ("data ttl left", _ttl(data_ttl)),
        ("payload", f"{size} bytes, {_kind(head, size)}"),
        ("lock ttl left", _ttl(lock_ttl)),
        ("lock holder", token),
    ]
