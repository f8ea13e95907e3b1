"""Values to bytes and back: orjson for data, the stored header, and two markers.

Markers start with a NUL byte, which never starts a JSON document, so a hit
costs exactly one ``orjson.loads``; only bytes that fail to parse are examined
further. Bytes that are neither JSON nor a marker are :data:`CORRUPT`: a miss,
never an exception, so a bad entry is overwritten by the next fill.

Everything a fill stores, a value or a marker, starts with a fixed-width
:class:`Header`: type byte ``0x01`` (it never starts a JSON document either,
and differs from the markers' NUL), version byte ``2``, then four fields as
fixed-width lower-case hex text: when the fetch started and until when the
value is fresh (this process's wall-clock ms, 12 digits each), how long the
fetch took (ms, 8 digits) and the fill's **stamp** (14 digits): Redis's own
clock (``TIME``, in µs) read no later than the fetch began, which every
invalidation mark is compared with (:mod:`memofill.generations`). Text, so that
a transport that carries strings only can carry it, and an operator can read it
with ``GETRANGE key 0 47``. Hex rather than base64 of a packed struct: a hit
reads only the fields it needs, one ``int(..., 16)`` each (about 0.13 µs).
A marker behind a header is judged by its stamp as a value is: an
invalidation rejects a cached ``None`` or failure fetched before it. Bytes
without a header (written by a release before headers, or by hand) still
read as before: fresh until Redis expires them, while their dataset has no
mark (a marker without one lives its TTL whatever the marks). Bytes with the
first release's header (version ``1``, no stamp) are a miss, refilled once
(``OLD_HEADED``).
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


#: The first two bytes of a stored value with a header: type ``0x01``, version ``2``.
HEADED = b"\x012"
#: The first two bytes of a value stored by a release before stamps: a miss, refilled once.
OLD_HEADED = b"\x011"
#: The header's length in bytes; the payload starts here.
HEADER_LEN = 48
#: Where each field's hex digits lie in the stored bytes, ``[start, end)``.
FETCH_START = slice(2, 14)
SOFT_UNTIL = slice(14, 26)
DELTA = slice(26, 34)
STAMP = slice(34, 48)
_MAX_MS = 16**12 - 1  # year 10889
_MAX_U32 = 16**8 - 1
_MAX_US = 16**14 - 1  # year 4253


class Header(NamedTuple):
    """What a fill stored in front of a value.

    ``fetch_start_ms`` is the wall-clock ms when the fetch began (not when it was
    written: a fill that started before an invalidation is older than it);
    ``soft_until_ms`` until when the value is fresh (start + ``ttl_s``);
    ``delta_ms`` how long the fetch took, which early refresh (XFetch) draws
    against; ``stamp`` Redis's clock in µs no later than the fetch began: an
    invalidation whose mark is at or after it rejects the value
    (:mod:`memofill.generations`), and a fill stamped earlier never writes over it.
    """

    fetch_start_ms: int
    soft_until_ms: int
    delta_ms: int
    stamp: int


def header_bytes(header: Header) -> bytes:
    """The 48 bytes that go in front of a payload; fields are clamped to their widths."""
    start, soft, delta, stamp = header
    return b"%s%012x%012x%08x%014x" % (
        HEADED,
        min(max(start, 0), _MAX_MS),
        min(max(soft, 0), _MAX_MS),
        min(max(delta, 0), _MAX_U32),
        min(max(stamp, 0), _MAX_US),
    )


def read_header(raw: bytes) -> Header | None:
    """The header of stored bytes, or ``None`` when they have none (or a malformed one)."""
    if raw[:2] != HEADED or len(raw) < HEADER_LEN:
        return None
    try:  # one int() per field, spelled out: a stale hit reads every header
        start, soft = int(raw[FETCH_START], 16), int(raw[SOFT_UNTIL], 16)
        return Header(start, soft, int(raw[DELTA], 16), int(raw[STAMP], 16))
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


def is_marker(raw: bytes) -> bool:
    """Whether stored bytes are a marker behind a header (what a fill stores for one)."""
    return raw[:2] == HEADED and raw[HEADER_LEN : HEADER_LEN + 1] == b"\0"


def decode_special(raw: bytes) -> Any:
    """What non-JSON bytes mean, a header skipped: :data:`NEGATIVE`, an
    :class:`ErrorMarker` or :data:`CORRUPT`."""
    if raw[:2] == HEADED:
        raw = raw[HEADER_LEN:]
    if raw == NEGATIVE_MARKER:
        return NEGATIVE
    if raw.startswith(_ERROR_PREFIX):
        return ErrorMarker(raw[len(_ERROR_PREFIX) :].decode("ascii", "replace"))
    return CORRUPT


def decode_any(raw: bytes) -> Any:
    """Stored bytes decoded: a value, :data:`NEGATIVE`, :class:`ErrorMarker` or :data:`CORRUPT`.

    A header is skipped; what follows it is JSON or a marker.
    """
    try:
        return decode(payload(raw))
    except DecodeError:
        return decode_special(raw)
