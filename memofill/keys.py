"""Key templates, argument normalisation, and the lock and wake keys derived from a final key.

A registry key such as ``market:quotes:{symbol}`` is parsed once into literal
text and fields. At call time each field is filled from the function's bound
arguments, escaped so that no argument can forge another key:

* literal text in a registry key uses only ``A-Z a-z 0-9 _ . - : /``;
* an argument keeps ``A-Z a-z 0-9 _ . -`` and percent-encodes every other
  character (UTF-8), so ``:``, ``/``, braces, spaces and newlines in an argument
  never act as separators;
* an argument whose escaped form is longer than :data:`MAX_FIELD_CHARS` is
  replaced by ``~`` and a SHA-256 digest (``~`` is escaped in every other value);
* two fields are always separated by ``:`` or ``/``, so every template renders
  each argument tuple to its own key.

``str`` and ``int`` (and enums of them) name keys: ``42`` and ``"42"`` name the
same entry on purpose, because a web handler sees the text of a path parameter
where a worker sees the number. ``None``, ``bool``, ``float`` and other objects
are refused with :class:`~memofill.errors.KeyArgumentError`.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping

import attrs

from memofill.errors import KeyArgumentError, KeyTemplateError

#: The characters a registry key may hold outside its ``{field}`` markers.
LITERAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-:/")
#: The characters an argument keeps as they are; every other one is percent-encoded.
ARGUMENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
#: Separators: arguments never contain them, so they split a key unambiguously.
SEPARATORS = frozenset(":/")
#: An escaped argument longer than this is replaced by a digest.
MAX_FIELD_CHARS = 200

LOCK_SUFFIX = "#lock"
WAKE_SUFFIX = "#wake"

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ESCAPES = {c: f"%{c:02X}" for c in range(256)}
for _c in ARGUMENT_CHARS:
    _ESCAPES[ord(_c)] = _c


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
    """The escaped text of one field's value (see the module doc for the rules)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise KeyArgumentError(
            f"key field {{{field}}} takes a str or int, not {type(value).__name__}"
        )
    text = str(value) if isinstance(value, int) else value
    # surrogatepass: a lone surrogate (from a filesystem name, say) still names one key.
    escaped = "".join(_ESCAPES[byte] for byte in text.encode("utf-8", "surrogatepass"))
    if len(escaped) > MAX_FIELD_CHARS:
        return "~" + hashlib.sha256(escaped.encode("ascii")).hexdigest()
    return escaped


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
                text = format_argument(self.field, value)
                if len(value) <= self.MAX_MEMO_CHARS:
                    if len(self.known) >= self.MAX_ENTRIES:
                        self.known.clear()
                    self.known[value] = text
            return text
        if type(value) is int:
            text = str(value)  # digits and "-" only: nothing to escape
            if len(text) <= MAX_FIELD_CHARS:
                return text
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


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot start final keys, or ``None`` when it can.

    A prefix may hold no brace at all, or exactly one complete hash tag such as
    ``{tenant-7}:``; any other brace would move lock keys to another slot.
    """
    if "#" in prefix:
        return "a prefix may not hold '#', which starts the suffix of lock and wake keys"
    opens, closes = prefix.count("{"), prefix.count("}")
    if opens == closes == 0:
        return None
    start, end = prefix.find("{"), prefix.find("}")
    if opens == closes == 1 and end > start + 1:
        return None
    return "a prefix may hold braces only as one complete, non-empty hash tag such as '{app}:'"
