"""The hit scenario's value as typed data: a dataclass and a pydantic model of the same shape."""

from __future__ import annotations

import dataclasses

import pydantic

from bench.common import small_value


@dataclasses.dataclass
class Tick:
    t: int
    bid: float
    ask: float


@dataclasses.dataclass
class Quote:
    name: str
    currency: str
    quotes: list[Tick]


class TickModel(pydantic.BaseModel):
    t: int
    bid: float
    ask: float


class QuoteModel(pydantic.BaseModel):
    name: str
    currency: str
    quotes: list[TickModel]


def quote(name: str) -> Quote:
    """:func:`~bench.common.small_value` as a :class:`Quote`."""
    value = small_value(name)
    ticks = [Tick(**tick) for tick in value["quotes"]]
    return Quote(value["name"], value["currency"], ticks)
