"""Key templates, argument texts, and the lock and wake keys derived from a final key.

A registry key such as ``market:quotes:{symbol}`` is parsed once into literal
text and fields. Every parameter of a decorated function is either a field or
listed in ``ignore=`` (the decorator checks that when it decorates); at call time each
field is filled with the canonical text of its argument:

=====================  ==========================================  =========================
type                   text                                        example
=====================  ==========================================  =========================
``str``                kept: ``A-Z a-z 0-9 _ . -``; else ``%XX``   ``"EUR/USD"`` -> ``EUR%2FUSD``
``str`` of digits      first character percent-encoded too         ``"42"`` -> ``%342``
``int``                its digits                                  ``42`` -> ``42``
``bool``               ``~t`` / ``~f``                             ``True`` -> ``~t``
``None``               ``~n``
enum member            the text of its value                       ``Color.RED`` -> ``red``
``uuid.UUID``          ``~u`` and 32 hex digits                    ``~u12345678...``
``datetime.date``      ``~d`` and the ISO date                     ``~d2024-01-31``
naive ``datetime``     ``~d``, date, ``T``, time with dots         ``~d2024-01-31T09.30.00``
aware ``datetime``     ``~D``, the same in UTC, ``Z``              ``~D2024-01-31T08.30.00Z``
``decimal.Decimal``    ``~m`` and its exact value, no trailing 0   ``Decimal("1.50")`` -> ``~m1.5``
=====================  ==========================================  =========================

Why these rules:

* each value has exactly one text, and no two values of different types share
  one: ``42`` and ``"42"``, ``None``, ``"None"`` and ``""``, ``True``, ``1``
  and ``"True"`` are all different keys. An escaped ``str`` never holds a raw
  ``~`` (it is escaped), so the ``~``-tagged texts of other types cannot be
  forged by a string; a ``str`` that looks like an ``int`` has its first
  character encoded, which plain escaping never does to a digit or ``-``;
* equal values share their text: an aware ``datetime`` is written in UTC, so
  equal instants in two time zones name one entry; a naive one never meets an
  aware one. A ``Decimal`` drops trailing zeros (``1.5`` and ``1.50`` are equal);
* an enum member names the entry of its value: ``StrEnum`` and ``IntEnum``
  members equal their values, and a handler that receives ``"red"`` from a URL
  and a worker that passes ``Color.RED`` should meet;
* ``float`` (``0.1 + 0.2``), ``bytes``, containers and other objects have no
  exact, canonical text and are refused with
  :class:`~memofill.errors.KeyArgumentError`: pass a ``str``, ``int`` or
  ``Decimal`` instead, or keep the argument out of the key with ``ignore=``;
* literal text in a registry key uses only ``A-Z a-z 0-9 _ . - : /`` and no
  argument text holds ``:``, ``/``, a brace or whitespace, so arguments never
  act as separators and two fields are always separated by ``:`` or ``/``:
  every template renders each argument tuple to its own key;
* an argument whose text would be longer than :data:`MAX_FIELD_CHARS` is
  replaced by ``~h`` and a SHA-256 digest of its type and raw value. A long
  ``str`` is digested from its UTF-8 bytes without being escaped first, so a
  megabyte argument costs one hash per call, not a walk over each character.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import re
import types
import typing
import uuid
from collections.abc import Mapping

import attrs

from memofill.errors import KeyArgumentError, KeyTemplateError

#: The characters a registry key may hold outside its ``{field}`` markers.
LITERAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-:/")
#: The characters an argument keeps as they are; every other one is percent-encoded.
ARGUMENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
#: Separators: arguments never contain them, so they split a key unambiguously.
SEPARATORS = frozenset(":/")
#: An argument whose text would be longer than this is replaced by a digest.
MAX_FIELD_CHARS = 200
#: The classes whose values have a canonical key text (besides enums of them).
KEY_TYPES: tuple[type, ...] = (
    str,
    int,
    bool,
    type(None),
    uuid.UUID,
    datetime.date,
    decimal.Decimal,
)

LOCK_SUFFIX = "#lock"
WAKE_SUFFIX = "#wake"
TOMB_SUFFIX = "#tomb"

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ESCAPES = {c: f"%{c:02X}" for c in range(256)}
for _c in ARGUMENT_CHARS:
    _ESCAPES[ord(_c)] = _c
#: Ints strictly between these have at most MAX_FIELD_CHARS characters of text, sign included.
_INT_LIMIT = 10 ** (MAX_FIELD_CHARS - 1)
_UTC = datetime.timezone.utc


@attrs.frozen
class KeyTemplate:
    """A parsed registry key: literal parts interleaved with field names.

    ``parts`` alternates literal, field, literal, ... and always has an odd
    length, so a key without fields is one literal.
    """

    source: str
    parts: tuple[str, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        """The field names, in the order they appear."""
        return self.parts[1::2]

    def render(self, values: Mapping[str, object]) -> str:
        """The key with every field filled from ``values`` (escaped; see the module doc)."""
        if len(self.parts) == 1:
            return self.source
        out = []
        for index, part in enumerate(self.parts):
            out.append(format_argument(part, values[part]) if index % 2 else part)
        return "".join(out)

    def segments(self) -> list[tuple[str, str | None, str]]:
        """The key split at separators into ``(before, field or None, after)`` triples."""
        pieces: list[tuple[str, str | None, str]] = []
        current: list[str] = []
        field: str | None = None
        for index, part in enumerate(self.parts):
            if index % 2:
                field, current = part, [*current, "\0"]
                continue
            for char in part:
                if char in SEPARATORS:
                    pieces.append(_segment(current, field))
                    pieces.append((char, None, ""))
                    current, field = [], None
                else:
                    current.append(char)
        pieces.append(_segment(current, field))
        return pieces


def _segment(chars: list[str], field: str | None) -> tuple[str, str | None, str]:
    text = "".join(chars)
    if field is None:
        return (text, None, "")
    before, _, after = text.partition("\0")
    return (before, field, after)


def parse_template(source: str) -> KeyTemplate:
    """Parse a registry key, raising :class:`KeyTemplateError` naming the first problem."""
    problems = template_problems(source)
    if problems:
        raise KeyTemplateError(f"key template {source!r}: {problems[0]}")
    return _split(source)


def template_problems(source: object) -> list[str]:
    """Every reason ``source`` is not a well-formed key template (empty when it is)."""
    if not isinstance(source, str):
        return [f"must be a str, not {type(source).__name__}"]
    if not source:
        return ["must not be empty"]
    problems: list[str] = []
    names: list[str] = []
    depth_open = -1
    for index, char in enumerate(source):
        if char == "{":
            if depth_open >= 0:
                problems.append(f"'{{' at {index} opens a field inside a field")
            depth_open = index
        elif char == "}":
            if depth_open < 0:
                problems.append(f"'}}' at {index} closes no field")
                continue
            name = source[depth_open + 1 : index]
            depth_open = -1
            problems.extend(_field_name_problems(name))
            if name in names:
                problems.append(f"field {{{name}}} appears twice")
            names.append(name)
        elif depth_open < 0 and char not in LITERAL_CHARS:
            problems.append(
                f"character {char!r} at {index} is not allowed (use A-Z a-z 0-9 _ . - : /)"
            )
    if depth_open >= 0:
        problems.append(f"'{{' at {depth_open} is never closed")
    if not problems:
        problems.extend(_adjacency_problems(_split(source)))
    return problems


def _field_name_problems(name: str) -> list[str]:
    if not name:
        return ["a field has an empty name"]
    if ":" in name or "!" in name:
        return [f"field {{{name}}} has a format spec or conversion; fields are plain names"]
    if not _FIELD_NAME.match(name):
        return [f"field {{{name}}} is not a valid parameter name"]
    return []


def _adjacency_problems(template: KeyTemplate) -> list[str]:
    problems = []
    for index in range(2, len(template.parts) - 1, 2):
        if not SEPARATORS.intersection(template.parts[index]):
            left, right = template.parts[index - 1], template.parts[index + 1]
            problems.append(f"fields {{{left}}} and {{{right}}} must be separated by ':' or '/'")
    return problems


def _split(source: str) -> KeyTemplate:
    parts: list[str] = []
    literal: list[str] = []
    position = 0
    while position < len(source):
        start = source.find("{", position)
        if start < 0:
            literal.append(source[position:])
            break
        end = source.index("}", start)
        literal.append(source[position:start])
        parts.extend(["".join(literal), source[start + 1 : end]])
        literal = []
        position = end + 1
    parts.append("".join(literal))
    return KeyTemplate(source=source, parts=tuple(parts))


def templates_overlap(first: KeyTemplate, second: KeyTemplate) -> bool:
    """Whether some arguments could render ``first`` and ``second`` to the same key.

    Arguments never contain separators, so two keys can only meet when their
    separators line up; each segment then holds at most one field, which can
    stand for any run of argument characters.
    """
    a, b = first.segments(), second.segments()
    if len(a) != len(b):
        return False
    return all(_segments_overlap(x, y) for x, y in zip(a, b, strict=True))


def _segments_overlap(a: tuple[str, str | None, str], b: tuple[str, str | None, str]) -> bool:
    (a_before, a_field, a_after), (b_before, b_field, b_after) = a, b
    if a_field is None and b_field is None:
        return a_before == b_before
    if a_field is None or b_field is None:
        text, (before, _, after) = (a_before, b) if a_field is None else (b_before, a)
        return (
            len(text) >= len(before) + len(after)
            and text.startswith(before)
            and text.endswith(after)
        )
    prefix_ok = a_before.startswith(b_before) or b_before.startswith(a_before)
    suffix_ok = a_after.endswith(b_after) or b_after.endswith(a_after)
    return prefix_ok and suffix_ok


_Shape = tuple[str, str | None, str]


class _Node:
    """One level of :class:`OverlapIndex`: the templates' next segment, literal or with a field."""

    __slots__ = ("ends", "fields", "literals")

    def __init__(self) -> None:
        self.literals: dict[str, _Node] = {}
        #: Keyed by ``(before, after)``: which field a segment holds does not change what
        #: it matches.
        self.fields: dict[tuple[str, str], _Node] = {}
        #: ``(order added, source)`` of the templates that end here.
        self.ends: list[tuple[int, str]] = []


class OverlapIndex:
    """Templates seen so far, arranged so that finding the ones a new template overlaps
    does not compare it with every other one.

    :func:`templates_overlap` is exact but pairwise, and checking every pair of a
    registry of thousands of datasets took seconds at every process start. Two
    templates can only overlap when their separators line up, so templates are
    grouped by their separators; within a group, a tree branches on each segment,
    and a literal segment looks up the equal literal directly. Only segments with
    a field are compared one by one, against the few siblings they could match.
    The answers are exactly those of :func:`templates_overlap`.
    """

    def __init__(self) -> None:
        self._groups: dict[str, _Node] = {}
        self._count = 0

    def add(self, template: KeyTemplate) -> list[str]:
        """Remember ``template``; return the earlier templates it overlaps, oldest first."""
        separators, shapes = _shapes(template)
        root = self._groups.get(separators)
        if root is None:
            root = self._groups[separators] = _Node()
        level = [root]
        for shape in shapes:
            level = [child for node in level for child in _matching(node, shape)]
        found = sorted(end for node in level for end in node.ends)
        node = root
        for before, field, after in shapes:
            if field is None:
                node = node.literals.setdefault(before, _Node())
            else:
                node = node.fields.setdefault((before, after), _Node())
        node.ends.append((self._count, template.source))
        self._count += 1
        return [source for _, source in found]


_SEPARATOR = re.compile("([:/])")


def _shapes(template: KeyTemplate) -> tuple[str, list[_Shape]]:
    """The template's separators, in order, and the segments between them.

    As :meth:`KeyTemplate.segments` gives them, but with the field's name left
    out (``""``), which matters to no overlap; a template is split this way once.
    """
    pieces = _SEPARATOR.split("\0".join(template.parts[::2]))
    shapes: list[_Shape] = []
    for piece in pieces[::2]:
        before, marker, after = piece.partition("\0")
        shapes.append((before, "" if marker else None, after))
    return "".join(pieces[1::2]), shapes


def _matching(node: _Node, shape: _Shape) -> list[_Node]:
    """The children of ``node`` whose segment can render the same text as ``shape``."""
    text, field, _ = shape
    children = []
    if field is None:
        exact = node.literals.get(text)
        if exact is not None:
            children.append(exact)
    else:
        for literal, child in node.literals.items():
            if _segments_overlap(shape, (literal, None, "")):
                children.append(child)
    for (other_before, other_after), child in node.fields.items():
        if _segments_overlap(shape, (other_before, "", other_after)):
            children.append(child)
    return children


def format_argument(field: str, value: object) -> str:
    """The canonical text of one field's value (see the module doc for the rules)."""
    if isinstance(value, str):
        return _str_text(value)
    if isinstance(value, enum.Enum):
        value = value.value
        if isinstance(value, str):
            return _str_text(value)
    if isinstance(value, bool):
        return "~t" if value else "~f"
    if isinstance(value, int):
        return _int_text(value)
    if value is None:
        return "~n"
    if isinstance(value, uuid.UUID):
        return "~u" + value.hex
    if isinstance(value, datetime.datetime):
        return _datetime_text(field, value)
    if isinstance(value, datetime.date):
        return f"~d{value.year:04d}-{value.month:02d}-{value.day:02d}"
    if isinstance(value, decimal.Decimal):
        return _decimal_text(field, value)
    raise KeyArgumentError(
        f"key field {{{field}}} takes a str or int (or bool, None, an enum, UUID, date, "
        f"datetime, Decimal), not {type(value).__name__}: convert it before the call, "
        "or keep it out of the key with ignore="
    )


def _digest(kind: bytes, payload: bytes) -> str:
    """``~h`` and the SHA-256 of a value's type and bytes: short, and unlike any other text."""
    return "~h" + hashlib.sha256(kind + payload).hexdigest()


def _str_text(value: str) -> str:
    # surrogatepass: a lone surrogate (from a filesystem name, say) still names one key.
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_FIELD_CHARS:  # every byte escapes to one character or more
        return _digest(b"s", raw)
    escaped = "".join([_ESCAPES[byte] for byte in raw])
    if len(escaped) > MAX_FIELD_CHARS:
        return _digest(b"s", raw)
    if escaped.isdigit() or (escaped[:1] == "-" and escaped[1:].isdigit()):
        # An int's text: encode the first character too, which escaping never does.
        return f"%{ord(escaped[0]):02X}{escaped[1:]}"
    return escaped


def _int_text(value: int) -> str:
    if -_INT_LIMIT < value < _INT_LIMIT:
        # int's own repr: a subclass with its own __str__ cannot take another int's key.
        return int.__repr__(value)
    # Too long for a key (and past 4,300 digits, too long for str()): digest its bytes.
    size = value.bit_length() // 8 + 1
    return _digest(b"i", int.to_bytes(value, size, "big", signed=True))


def _datetime_text(field: str, value: datetime.datetime) -> str:
    tag, suffix = "~d", ""
    if value.utcoffset() is not None:
        try:
            value = value.astimezone(_UTC)
        except OverflowError:
            raise KeyArgumentError(
                f"key field {{{field}}}: {value!r} is out of range in UTC"
            ) from None
        tag, suffix = "~D", "Z"
    text = (
        f"{tag}{value.year:04d}-{value.month:02d}-{value.day:02d}"
        f"T{value.hour:02d}.{value.minute:02d}.{value.second:02d}"
    )
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + suffix


def _decimal_text(field: str, value: decimal.Decimal) -> str:
    if not value.is_finite():
        raise KeyArgumentError(
            f"key field {{{field}}} takes a finite Decimal, not {value}: "
            "NaN and infinities name no value"
        )
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    if not any(digits):
        return "~m0"  # 0, -0 and 0.00 are equal
    stripped = len(digits)
    while digits[stripped - 1] == 0:
        stripped -= 1
    exponent += len(digits) - stripped
    # Built from the tuple, never rounded to a context's precision.
    text = str(decimal.Decimal((sign, digits[:stripped], exponent))).replace("E+", "E")
    if len(text) + 2 > MAX_FIELD_CHARS:
        return _digest(b"m", text.encode("ascii"))
    return "~m" + text


def annotation_problem(annotation: object) -> str | None:
    """Why a parameter annotated ``annotation`` cannot fill a key field, or ``None`` if it can.

    ``Optional``, ``Union``, ``Literal`` and ``Annotated`` are looked through;
    ``Any``, ``object`` and type variables say nothing, and are left to the
    call-time check of each value.
    """
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return annotation_problem(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        problems = (annotation_problem(arg) for arg in typing.get_args(annotation))
        return next((p for p in problems if p), None)
    if origin is typing.Literal:
        for value in typing.get_args(annotation):
            if not isinstance(value, (*KEY_TYPES, enum.Enum)):
                return f"Literal value {value!r} has no exact key text"
        return None
    if origin is not None:  # list[str], dict[str, int]...: the container decides
        return annotation_problem(origin)
    supertype = getattr(annotation, "__supertype__", None)  # a typing.NewType
    if supertype is not None:
        return annotation_problem(supertype)
    if annotation in (None, typing.Any, object) or isinstance(annotation, typing.TypeVar):
        return None
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            odd = [m.value for m in annotation if not isinstance(m.value, (*KEY_TYPES, enum.Enum))]
            if odd:
                return f"enum {annotation.__name__} has a value {odd[0]!r} with no exact key text"
            return None
        if issubclass(annotation, KEY_TYPES):
            return None
        return f"{annotation.__name__} has no exact key text"
    return f"{annotation!r} has no exact key text"


class FieldText:
    """:func:`format_argument` for one field, with a bounded memo of the ``str`` values seen.

    Escaping walks every byte of a value; on the hit path that walk would cost
    more than the rest of the key. Services ask for the same few thousand
    values over and over, so short ``str`` values are escaped once and looked
    up after; ``int`` values never need escaping. The memo is cleared when it
    fills, which keeps it bounded whatever the callers send.
    """

    #: Values kept per field before the memo starts over.
    MAX_ENTRIES = 4096
    #: Longer values are escaped each time rather than kept.
    MAX_MEMO_CHARS = 256

    def __init__(self, field: str) -> None:
        self.field = field
        #: Escaped text by ``str`` value, for callers that look up before they call.
        self.known: dict[str, str] = {}

    def __call__(self, value: object) -> str:
        if type(value) is str:
            text = self.known.get(value)
            if text is None:
                text = _str_text(value)
                if len(value) <= self.MAX_MEMO_CHARS:
                    if len(self.known) >= self.MAX_ENTRIES:
                        self.known.clear()
                    self.known[value] = text
            return text
        if type(value) is int and -_INT_LIMIT < value < _INT_LIMIT:
            return str(value)  # digits and "-" only: nothing to escape
        return format_argument(self.field, value)


def hash_tagged(final_key: str) -> str:
    """``final_key`` if it already carries a Redis Cluster hash tag, else the key wrapped in one.

    Appending to the result keeps the slot of ``final_key``: a tagged key hashes
    only its tag, and an untagged final key holds no brace (registry keys and
    escaped arguments cannot, and the prefix is checked), so ``{key}`` hashes
    exactly ``key``.
    """
    start = final_key.find("{")
    if start >= 0:
        end = final_key.find("}", start + 1)
        if end > start + 1:
            return final_key
    return "{" + final_key + "}"


def lock_key(final_key: str) -> str:
    """The lock key of a data key: same Cluster slot, never equal to any data key."""
    return hash_tagged(final_key) + LOCK_SUFFIX


def wake_key(final_key: str) -> str:
    """The key a leader signals on when the fill lands, so followers wake without a poll."""
    return hash_tagged(final_key) + WAKE_SUFFIX


def tomb_key(final_key: str) -> str:
    """Where ``invalidate()`` leaves its mark: Redis's clock when the key was invalidated.

    A fill whose stamp is not after it is refused (``STORE_SCRIPT``),
    so a fetch that began before the invalidation never writes its value after it.
    """
    return hash_tagged(final_key) + TOMB_SUFFIX


#: The meta hash of a prefix: its dataset generations (:mod:`memofill.generations`).
META_SUFFIX = "#meta"


def meta_key(prefix: str) -> str:
    """The meta hash of ``prefix``: ``#`` occurs in no data key, so it never meets a value."""
    return prefix + META_SUFFIX


#: The tags hash of a prefix: every tag's marks (:mod:`memofill.tags`).
TAGS_SUFFIX = "#tags"


def tags_key(prefix: str) -> str:
    """The tags hash of ``prefix``: beside the meta hash, and like it never a data key."""
    return prefix + TAGS_SUFFIX


def prefix_problem(prefix: object) -> str | None:
    """Why ``prefix`` cannot start final keys, or ``None`` when it can.

    A prefix is a ``str`` that may hold no brace at all, or exactly one
    complete hash tag such as ``{tenant-7}:``; any other brace would move lock
    keys to another slot.
    """
    if not isinstance(prefix, str):
        return f"a prefix must be a str, such as 'app:', not {type(prefix).__name__}"
    if "#" in prefix:
        return "a prefix may not hold '#', which starts the suffix of lock and wake keys"
    opens, closes = prefix.count("{"), prefix.count("}")
    if opens == closes == 0:
        return None
    start, end = prefix.find("{"), prefix.find("}")
    if opens == closes == 1 and end > start + 1:
        return None
    return "a prefix may hold braces only as one complete, non-empty hash tag such as '{app}:'"
