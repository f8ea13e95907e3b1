"""Typed return values that a spawned process fills and the test's process reads back.

They live in a module of their own so that a spawned interpreter imports the
very same classes by name, as two deployments of one application do.
"""

from __future__ import annotations

import dataclasses
import datetime
from decimal import Decimal
from typing import Any

import attrs
import pydantic
import redis

from memofill import CacheFill, Dataset, Memofill

DATASET = Dataset(
    "typed:{kind}",
    ttl_s=60,
    cache_fill=CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200),
)
WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass
class Quote:
    symbol: str
    bid: float
    tags: frozenset[str]


@attrs.frozen
class Trade:
    symbol: str
    at: datetime.datetime
    amount: Decimal


class Account(pydantic.BaseModel):
    name: str
    roles: list[str]
    opened: datetime.date


VALUES: dict[str, Any] = {
    "dataclass": Quote("ACME", 1.25, frozenset({"a", "b"})),
    "attrs": Trade("ACME", WHEN, Decimal("10.10")),
    "pydantic": Account(name="ann", roles=["user"], opened=WHEN.date()),
}


def functions(mf: Memofill, fetch: Any) -> dict[str, Any]:
    """One cached function per kind, each annotated with its type, all calling ``fetch``."""

    def quote(kind: str) -> Quote:
        return fetch(kind)  # type: ignore[no-any-return]

    def trade(kind: str) -> Trade:
        return fetch(kind)  # type: ignore[no-any-return]

    def account(kind: str) -> Account:
        return fetch(kind)  # type: ignore[no-any-return]

    decorate = mf.cached_dataset(DATASET.key)
    return {"dataclass": decorate(quote), "attrs": decorate(trade), "pydantic": decorate(account)}


def fill_in_this_process(port: int, prefix: str) -> None:
    """Runs in a spawned interpreter: fill every kind's entry, then exit."""
    client = redis.Redis(port=port)
    mf = Memofill(client, prefix=prefix, policies={DATASET.key: DATASET})
    for kind, function in functions(mf, VALUES.__getitem__).items():
        outcome = function.call_with_outcome(kind).outcome
        if outcome != "leader_fill":
            raise AssertionError(f"{kind}: {outcome}")
    client.close()
