"""Values to bytes and back: orjson for data, the stored header, and two markers.

Markers start with a NUL byte, which never starts a JSON document, so a hit
costs exactly one ``orjson.loads``; only bytes that fail to parse are examined
further. Bytes that are neither JSON nor a marker are :data:`CORRUPT`: a miss,
never an exception, so a bad entry is overwritten by the next fill.

Every value a fill stores (never a marker) starts with a fixed-width
:class:`Header`: type byte ``0x01`` (it never starts a JSON document either,
and differs from the markers' NUL), version byte ``1``, then four fields as
fixed-width lower-case hex text: when the fetch started and until when the
value is fresh (wall-clock ms, 12 digits each), how long the fetch took and a
generation number (8 digits each). Text, so that a transport that carries
strings only can carry it, and an operator can read it with ``GETRANGE key 0
41``. Hex rather than base64 of a packed struct: a hit reads only the fields it
needs, one ``int(..., 16)`` each (about 0.13 µs; the struct form costs 0.27 µs
for all four and for one alike). Bytes without a header (written by a release
before it) still read as before: fresh until Redis expires them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


#: The first two bytes of a stored value with a header: type ``0x01``, version ``1``.
HEADED = b"\x011"
#: The header's length in bytes; the payload starts here.
HEADER_LEN = 42
#: Where each field's hex digits lie in the stored bytes, ``[start, end)``.
FETCH_START = slice(2, 14)
SOFT_UNTIL = slice(14, 26)
DELTA = slice(26, 34)
SEQ = slice(34, 42)
_MAX_MS = 16**12 - 1  # year 10889
_MAX_U32 = 16**8 - 1


class Header(NamedTuple):
    """What a fill stored in front of a value.

    ``fetch_start_ms`` is the wall-clock ms when the fetch began (not when it was
    written: a fill that started before an invalidation is older than it);
    ``soft_until_ms`` until when the value is fresh (start + ``ttl_s``);
    ``delta_ms`` how long the fetch took, which early refresh (XFetch) draws
    against; ``seq`` the dataset generation its process knew when the fetch began
    (:mod:`memofill.generations`).
    """

    fetch_start_ms: int
    soft_until_ms: int
    delta_ms: int
    seq: int


def header_bytes(header: Header) -> bytes:
    """The 42 bytes that go in front of a payload; fields are clamped to their widths."""
    start, soft, delta, seq = header
    return b"%s%012x%012x%08x%08x" % (
        HEADED,
        min(max(start, 0), _MAX_MS),
        min(max(soft, 0), _MAX_MS),
        min(max(delta, 0), _MAX_U32),
        min(max(seq, 0), _MAX_U32),
    )


def read_header(raw: bytes) -> Header | None:
    """The header of stored bytes, or ``None`` when they have none (or a malformed one)."""
    if raw[:2] != HEADED or len(raw) < HEADER_LEN:
        return None
    try:  # one int() per field, spelled out: a stale hit reads every header
        start, soft = int(raw[FETCH_START], 16), int(raw[SOFT_UNTIL], 16)
        return Header(start, soft, int(raw[DELTA], 16), int(raw[SEQ], 16))
    except ValueError:
        return None


#: Payloads at least this large are decoded from a ``memoryview`` of the stored bytes
#: rather than a copy: below it the copy is cheaper than making the view.
VIEW_FROM_BYTES = 64 * 1024


def payload(raw: bytes) -> bytes | memoryview:
    """The stored bytes after a header (all of them when there is none), for ``orjson.loads``."""
    if raw[:2] != HEADED:
        return raw
    if len(raw) >= VIEW_FROM_BYTES:
        return memoryview(raw)[HEADER_LEN:]
    return raw[HEADER_LEN:]


def payload_size(raw: bytes) -> int:
    """How many bytes of ``raw`` are the value's own (its header left out)."""
    return len(raw) - HEADER_LEN if raw[:2] == HEADED else len(raw)


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
    """Stored bytes decoded: a value, :data:`NEGATIVE`, :class:`ErrorMarker` or :data:`CORRUPT`.

    A header is skipped; what follows it must be JSON (a marker never has one).
    """
    try:
        return decode(payload(raw))
    except DecodeError:
        return CORRUPT if raw[:2] == HEADED else decode_special(raw)
