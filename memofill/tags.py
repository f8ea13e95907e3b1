"""Tags: one name for values of several datasets, invalidated by one command whatever their number.

Rules:

- A dataset declares tag templates over its own key's fields
  (``Dataset("profile:{user_id}", ttl_s=600, tags=("user:{user_id}",))``), or fixed
  tags without a field (``"orders"``). A template is written as a key template is
  (``memofill.keys.template_problems``): ``A-Z a-z 0-9 _ . - : /`` outside its
  ``{field}`` markers, two fields apart by ``:`` or ``/``, so that no whitespace, brace
  or ``#`` reaches the tags hash and a concrete tag can be traced back to its
  templates. Each field is one of the key's; a dataset names a tag once.
  :func:`tag_problems` lists every rule broken.
- A value bears its dataset's templates filled with the texts its key holds
  (:class:`memofill.keys.FieldText`): ``user_id=42`` bears ``user:42``, and
  ``user_id="42"`` bears ``user:%342``, exactly as in the key. A value's tags are
  thus known from its key, never stored with it.
- Every mark of one prefix lives in one Redis hash, ``<prefix>#tags``
  (``memofill.keys.tags_key``), which ``INVALIDATE_TAG_SCRIPT``
  (:mod:`memofill.commands`) writes. Its fields: ``born``, Redis's clock (µs, text)
  when the hash was made, and ``run``, the server's run id then: a hash lost or
  restored from an older snapshot is born again, and every tagged value stamped
  at or before ``born`` is behind, so losing marks never revives a value;
  ``t:<tag>``, the text ``"<hard> <soft> <keep_until>"``: the hard and soft marks
  (Redis µs, 0 for none), which never go backward, and until when the field is
  kept; ``cursor``, where the next clean-up resumes its ``HSCAN``.
- A mark is kept as long as a value that could bear it may live
  (:meth:`TagIndex.keep_ms`): after that, no value it would reject is left. Every
  invalidation removes a bounded number of fields past their time, so the hash
  holds the live marks and little more.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence

import attrs

from memofill.errors import Problem, UnknownTagError
from memofill.keys import FieldText, parse_template, template_problems

#: How a tag's field is named in the tags hash: ``t:`` and the tag.
MARK_PREFIX = "t:"
#: What a filled field of a concrete tag can hold: the characters an argument's text is
#: written in (:func:`memofill.keys.format_argument`), perhaps none (an empty ``str``).
_FIELD_TEXT = "[A-Za-z0-9_.~%-]*"
#: Added to the longest life of a value that could bear a tag: what separates Redis's
#: clock on two Cluster nodes, and the rounding of TTLs to ms.
KEEP_MARGIN_MS = 5_000


@attrs.frozen
class TagTemplate:
    """One tag template, compiled once: filled from a call's fields, or matched by a tag."""

    source: str
    #: The literal text around the fields, one more than ``fields``.
    literals: tuple[str, ...]
    fields: tuple[str, ...]
    #: Matches every concrete tag the template can produce, and no other.
    pattern: re.Pattern[str] = attrs.field(eq=False, repr=False)
    #: Each field's text, with the memo of the values seen (shared by every call).
    texts: tuple[FieldText, ...] = attrs.field(eq=False, repr=False)

    def render(self, values: Mapping[str, object]) -> str:
        """The concrete tag for these field values (raw values, escaped as keys escape them)."""
        if not self.fields:
            return self.source
        out = [self.literals[0]]
        for text_of, name, literal in zip(self.texts, self.fields, self.literals[1:], strict=True):
            out.append(text_of(values[name]))
            out.append(literal)
        return "".join(out)


def compile_tag(source: str) -> TagTemplate:
    """A well-formed template, compiled (:class:`~memofill.errors.KeyTemplateError` if not)."""
    parts = parse_template(source).parts
    literals, fields = parts[0::2], parts[1::2]
    pattern = _FIELD_TEXT.join(re.escape(literal) for literal in literals)
    return TagTemplate(
        source=source,
        literals=literals,
        fields=fields,
        pattern=re.compile(pattern),
        texts=tuple(FieldText(name) for name in fields),
    )


def tag_problems(key: str, tags: object, key_fields: Collection[str] | None) -> list[Problem]:
    """Every rule the tags of dataset ``key`` break; ``key_fields`` is ``None`` for a bad key.

    One problem for each tag and rule, naming the dataset and the tag.
    """
    if isinstance(tags, str):
        rule = f"must be a tuple of str: write ({tags!r},) for one tag"
        return [Problem(key, "tags", tags, rule)]
    if not isinstance(tags, tuple):
        return [Problem(key, "tags", tags, "must be a tuple of str, such as ('user:{user_id}',)")]
    problems: list[Problem] = []
    seen: set[str] = set()
    for index, tag in enumerate(tags):
        where = f"tags[{index}]"
        if not isinstance(tag, str):
            problems.append(Problem(key, where, tag, "must be a str, such as 'user:{user_id}'"))
            continue
        rules = template_problems(tag)
        if not rules and key_fields is not None:
            fields = parse_template(tag).fields
            held = ", ".join(sorted(key_fields)) or "none"
            rules = [
                f"field {{{name}}} is not a field of the key (its fields: {held})"
                for name in fields
                if name not in key_fields
            ]
        if tag in seen:
            rules.append("is declared twice in this dataset")
        seen.add(tag)
        problems.extend(Problem(key, where, tag, rule) for rule in rules)
    return problems


class TagIndex:
    """Which datasets could bear a concrete tag, and how long a mark of it must be kept.

    Fixed tags are looked up directly; templates with fields are tried one by one,
    which is paid once per invalidation, never on a read.
    """

    def __init__(self, bearers: Iterable[tuple[str, Iterable[TagTemplate], int]]) -> None:
        """``bearers``: each dataset's key, compiled templates, and the longest (ms) that
        anything it writes stays in Redis, a late write included."""
        self._fixed: dict[str, list[tuple[str, int]]] = {}
        self._matched: list[tuple[re.Pattern[str], str, int]] = []
        sources: set[str] = set()
        for key, templates, life_ms in bearers:
            for template in templates:
                sources.add(template.source)
                if template.fields:
                    self._matched.append((template.pattern, key, life_ms))
                else:
                    self._fixed.setdefault(template.source, []).append((key, life_ms))
        #: Every template some dataset declares, sorted, as a refused tag is told them.
        self.templates = tuple(sorted(sources))

    def bearers(self, tag: str) -> list[tuple[str, int]]:
        """``(dataset key, life in ms)`` of each dataset whose templates can produce ``tag``."""
        found = list(self._fixed.get(tag, ()))
        found.extend((key, life) for pattern, key, life in self._matched if pattern.fullmatch(tag))
        return found

    def keep_ms(self, tag: object) -> int:
        """How long a mark of ``tag`` must be kept: the longest life of a value bearing it.

        Raises :class:`~memofill.errors.UnknownTagError` naming the known templates
        when no dataset's templates can produce ``tag``: invalidating it would
        change nothing, and is most likely a typing mistake.
        """
        if not isinstance(tag, str):
            raise TypeError(f"a tag is a str, such as 'user:42', not {type(tag).__name__}")
        found = self.bearers(tag)
        if not found:
            known = ", ".join(self.templates) or "none"
            raise UnknownTagError(f"no dataset bears tag {tag!r} (tag templates: {known})")
        return max(life for _, life in found) + KEEP_MARGIN_MS


def read_marks(born: object, fields: Sequence[object]) -> tuple[int, int, bool]:
    """What a tagged read found of a value's tags: ``(hard, soft, marked)``.

    ``hard``: the highest hard mark of its tags, or the hash's birth if later;
    ``soft``: the highest soft mark; ``marked``: whether one of its tags was
    invalidated (then bytes without a stamp, a marker, are behind too). A field
    that does not parse counts as a hard mark made at the hash's birth: read,
    never trusted blindly.
    """
    try:
        hard = int(born)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        hard = 0
    soft, marked = 0, False
    for field in fields:  # on every tagged hit: bytes split and parsed, no text made
        if field is None:
            continue
        marked = True
        try:
            hard_text, soft_text, _ = (
                field if isinstance(field, bytes) else str(field).encode()
            ).split(b" ")
            field_hard, field_soft = int(hard_text), int(soft_text)
        except ValueError:
            continue
        hard = max(hard, field_hard)
        soft = max(soft, field_soft)
    return hard, soft, marked
