"""The slow upstream of the catalogue, cached with memofill."""

from __future__ import annotations

import time
from typing import Any

import memofill

import upstream_calls


@memofill.cached_dataset("django:books:{isbn}")
def fetch_book(isbn: str) -> dict[str, Any] | None:
    """A catalogue that takes a fifth of a second; ``None`` for an unknown ISBN (cached 60 s)."""
    upstream_calls.record(f"book {isbn}")
    time.sleep(0.2)
    if not isbn.isdigit():
        return None
    return {"isbn": isbn, "pages": pages_of(isbn)}


def pages_of(isbn: str) -> int:
    """The catalogue's answer: made up, but the same in every process."""
    return 100 + int(isbn) % 900
