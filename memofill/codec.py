"""Values to bytes and back: orjson for data, and two markers that no JSON document can equal.

Markers start with a NUL byte, which never starts a JSON document, so a hit
costs exactly one ``orjson.loads``; only bytes that fail to parse are examined
further. Bytes that are neither JSON nor a marker are :data:`CORRUPT`: a miss,
never an exception, so a bad entry is overwritten by the next fill.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

#: What the fetch's ``None`` is stored as, so that other processes need not ask again.
NEGATIVE_MARKER = b"\x00memofill:none"
_ERROR_PREFIX = b"\x00memofill:error:"

#: Errors a fetch result can raise on encoding (not JSON-serialisable).
EncodeError = orjson.JSONEncodeError
#: Errors raised by decoding bytes that are not JSON.
DecodeError = orjson.JSONDecodeError

encode = orjson.dumps
decode = orjson.loads


@attrs.frozen
class ErrorMarker:
    """A recent fill failed; ``error`` is the exception's type name (never its message)."""

    error: str


class _Corrupt:
    def __repr__(self) -> str:
        return "CORRUPT"


class _Negative:
    def __repr__(self) -> str:
        return "NEGATIVE"


#: Bytes under a key that are neither JSON nor a marker.
CORRUPT: Any = _Corrupt()
#: The decoded form of :data:`NEGATIVE_MARKER`.
NEGATIVE: Any = _Negative()


def error_marker(error_type: str) -> bytes:
    """The bytes stored when a fill fails, naming only the exception type."""
    return _ERROR_PREFIX + error_type.encode("ascii", "replace")[:200]


def decode_special(raw: bytes) -> Any:
    """What non-JSON bytes mean: :data:`NEGATIVE`, an :class:`ErrorMarker` or :data:`CORRUPT`."""
    if raw == NEGATIVE_MARKER:
        return NEGATIVE
    if raw.startswith(_ERROR_PREFIX):
        return ErrorMarker(raw[len(_ERROR_PREFIX) :].decode("ascii", "replace"))
    return CORRUPT


def decode_any(raw: bytes) -> Any:
    """Stored bytes decoded: a value, :data:`NEGATIVE`, :class:`ErrorMarker` or :data:`CORRUPT`."""
    try:
        return decode(raw)
    except DecodeError:
        return decode_special(raw)
