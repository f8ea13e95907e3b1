"""``memofill inspect``: one dataset entry as Redis holds it now, for an operator at a terminal."""

from __future__ import annotations

import contextlib
import datetime
import decimal
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import redis

from memofill.codec import (
    CORRUPT,
    HEADED,
    HEADER_LEN,
    NEGATIVE,
    OLD_HEADED,
    ErrorMarker,
    Header,
    decode_any,
    decode_special,
    is_marker,
    read_header,
)
from memofill.commands import Commands
from memofill.errors import ConfigurationError, KeyArgumentError
from memofill.freshness import EXPIRED, STALE, STALE_IF_ERROR, verdict
from memofill.generations import BORN, Generations, Marks
from memofill.keys import SEPARATORS, lock_key, meta_key, tags_key
from memofill.policy import Dataset
from memofill.scripts import TOMB_MS
from memofill.tags import MARK_PREFIX
from memofill.tags import read_marks as tag_marks


def _none(text: str) -> None:
    if text:
        raise ValueError("takes no value: write name:none=")


def _bool(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError("takes true or false")
    return text == "true"


def _datetime(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


#: The types a ``name:type=value`` word gives a field, parsed from the command line's text.
TYPED_WORDS: dict[str, Callable[[str], object]] = {
    "str": str,
    "int": int,
    "bool": _bool,
    "none": _none,
    "uuid": uuid.UUID,
    "date": datetime.date.fromisoformat,
    "datetime": _datetime,
    "decimal": decimal.Decimal,
}


def field_values(dataset: Dataset, arguments: list[str]) -> dict[str, object]:
    """Key fields from ``name=value`` words, or plain values in the template's field order.

    Command-line values are text, so they name ``str`` arguments; a field the
    function takes as another type is given as ``name:type=value``, such as
    ``page:int=42`` (see :data:`TYPED_WORDS`), since ``42`` and ``"42"`` are
    two keys.
    """
    fields = dataset.template.fields
    values: dict[str, object] = {}
    positional = [word for word in arguments if "=" not in word]
    for word in arguments:
        if "=" in word:
            spec, _, text = word.partition("=")
            name, _, kind = spec.partition(":")
            if name not in fields:
                raise KeyArgumentError(
                    f"{dataset.key!r} has no field {name!r} (fields: {', '.join(fields) or 'none'})"
                )
            values[name] = _typed(name, kind, text) if kind else text
    remaining = [name for name in fields if name not in values]
    if len(positional) > len(remaining):
        raise KeyArgumentError(f"{dataset.key!r} takes {len(fields)} field value(s), got more")
    values.update(zip(remaining, positional, strict=False))
    missing = [name for name in fields if name not in values]
    if missing:
        raise KeyArgumentError(f"{dataset.key!r} needs a value for {', '.join(missing)}")
    return values


def _typed(name: str, kind: str, text: str) -> object:
    parse = TYPED_WORDS.get(kind)
    if parse is None:
        raise KeyArgumentError(
            f"{name}:{kind}=: unknown type {kind!r} (types: {', '.join(TYPED_WORDS)})"
        )
    try:
        return parse(text)
    except (ValueError, decimal.InvalidOperation) as exc:
        message = f"{name}:{kind}={text!r}: cannot be read as {kind} ({exc})"
        raise KeyArgumentError(message) from None


def _ttl(milliseconds: int) -> str:
    if milliseconds == -2:
        return "absent"
    if milliseconds == -1:
        return "no expiry"
    return f"{milliseconds / 1000:.3f} s"


#: The bytes a JSON document can begin with, after any whitespace.
_JSON_STARTS = frozenset(b'{["-0123456789tfn')


def _special(head: bytes, size: int) -> Any:
    """What stored bytes are, from their first few: a marker, ``CORRUPT``, or ``None`` (a value).

    A value with a header is a fill's, in whatever its codec wrote. Bytes without
    one are an older release's JSON, or foreign: read whole when the bytes read are
    all of them, else told by their first byte.
    """
    if head[:1] == b"\0" or is_marker(head):
        return decode_special(head)
    if head[:2] == HEADED:
        return None
    if size <= len(head):
        return CORRUPT if decode_any(head) is CORRUPT else None
    first = head.lstrip(b" \t\r\n")[:1]
    return None if first and first[0] in _JSON_STARTS else CORRUPT


def _kind(head: bytes, size: int) -> str:
    if size == 0:
        return "none"
    if head[:2] == OLD_HEADED:
        return "value of a release before stamps (header version 1)"
    special = _special(head, size)
    if special is NEGATIVE:
        return "negative marker (the fetch returned None)"
    if isinstance(special, ErrorMarker):
        return f"error marker (the last fill raised {special.error})"
    if special is CORRUPT:
        return "not a memofill value (corrupt or foreign bytes)"
    return "JSON value"


def _header_len(head: bytes) -> int:
    return HEADER_LEN if read_header(head) is not None else 0


def describe_header(head: bytes, now_ms: int) -> str:
    """The stored header in words: when the fetch began, until when the value is fresh, δ, stamp."""
    if head[:2] == OLD_HEADED:
        return "version 1, of a release before stamps (read as a miss and refilled)"
    header = read_header(head)
    if header is None:
        return "none (fresh until Redis expires it)"

    def when(ms: int) -> str:
        moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
        text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        ago = (now_ms - ms) / 1000
        return f"{text} ({ago:.3f} s ago)" if ago >= 0 else f"{text} (in {-ago:.3f} s)"

    return (
        f"fetched {when(header.fetch_start_ms)}, fresh until {when(header.soft_until_ms)}, "
        f"fetch took {header.delta_ms} ms, stamped {stamp_text(header.stamp)}"
    )


def stamp_text(stamp_us: int) -> str:
    """A stamp or mark (Redis's clock in µs) as a UTC time an operator can compare."""
    moment = datetime.datetime.fromtimestamp(stamp_us / 1_000_000, datetime.timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def read_marks(client: redis.Redis, prefix: str, dataset: str) -> tuple[Marks, str | None]:
    """``dataset``'s invalidation marks under ``prefix``, as the next call will judge by them.

    One ``HGETALL <prefix>#meta``, taken in by
    :meth:`~memofill.generations.Generations.loaded`, so that a field the run
    time would skip is skipped here too. A hash that is missing, or that another
    run of the server made, is made anew by the next read of any process
    (``_META_PRELUDE`` in :mod:`memofill.scripts`), and no value stamped before
    that is served: its marks then count from Redis's clock now, and why is
    returned beside them (``None`` while the hash stands).
    """
    generations = Generations(check_s=0.0)
    fields = client.hgetall(meta_key(prefix))  # read only: an inspection writes nothing
    generations.loaded([0, "read", fields], now=time.monotonic())
    marks = generations.of(dataset)
    renewed = _renewed(client, fields)
    if renewed is not None:
        seconds, micros = client.time()
        marks.set(seconds * 1_000_000 + micros, 0, marks.explicit)
    return marks, renewed


def _renewed(client: redis.Redis, fields: Mapping[bytes | str, bytes | str]) -> str | None:
    """Why the next read makes the meta hash anew, as ``_META_PRELUDE`` decides; else ``None``.

    The server's ``run_id`` comes from ``INFO server``; a user who may not run
    it gets ``None`` for a hash that stands, as the scripts notice no restart
    without it.
    """
    text = {_text(name): _text(value) for name, value in fields.items()}
    if BORN not in text:
        return "missing (never made, or lost)"
    try:
        run = str(client.info("server").get("run_id", ""))
    except redis.ResponseError:
        return None
    if run and text.get("run") != run:
        return "from an earlier run of the server (a restart)"
    return None


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def _marks_text(marks: Marks, renewed: str | None) -> str:
    floor = f"values stamped at or before {stamp_text(marks.hard)} are not served"
    if renewed is not None:
        return f"{floor} (the next read makes them anew: the marks are {renewed})"
    if not marks.explicit:
        born = f"; {floor} (when the marks were born)" if marks.hard else ""
        return f"none (never invalidated under this prefix){born}"
    soft = f", stale until stamped after {stamp_text(marks.soft)}" if marks.soft else ""
    return f"{floor}{soft}"


def read_tomb(raw: bytes | None) -> int | str | None:
    """The time a key's tomb holds (Redis's clock, µs); its bytes as text if not a number."""
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return repr(raw[:64])


def _tomb_text(tomb: int | str | None, tomb_ttl: int, head: bytes) -> str:
    """The key's tomb in words: when ``invalidate()`` ran, and for how long it still counts.

    A tomb refuses the writes of fills whose fetch began before it, so a value
    stamped at or before it was not written by a fill; the hit path does not
    read tombs, so such a value is served as its header says, and the line
    says so rather than leave the two times to be compared by eye.
    """
    if tomb is None:
        return f"none (no invalidate() of this key in the last {TOMB_MS // 60_000} minutes)"
    if isinstance(tomb, str):
        return f"not a number ({tomb}): the next fill of this key fails to write"
    lasts = f"for another {_ttl(tomb_ttl)}" if tomb_ttl >= 0 else "with no expiry"
    text = (
        f"invalidate() at {stamp_text(tomb)}: a fill whose fetch began before it is not "
        f"written ({lasts})"
    )
    header = read_header(head)
    if header is not None and header.stamp <= tomb:
        text += "; the stored value is stamped before it, so no fill wrote it"
    return text


def _marker_servable(special: Any, header: Header | None, marks: Marks, whose: str) -> str:
    """:func:`servable` of a marker: until it expires, unless a mark is at or after its stamp."""
    if header is not None and header.stamp <= marks.top:
        return (
            f"no: cached before {whose} was invalidated, or before its marks were lost "
            f"(stamped {stamp_text(header.stamp)}, not after {stamp_text(marks.top)}); a call "
            "fetches anew"
        )
    unstamped = "" if header is not None else "; it carries no stamp, so no mark rejects it"
    if special is NEGATIVE:
        return f"yes: as None (a negative hit) until it expires{unstamped}"
    return (
        f"no: callers raise FillError (the last fill raised {special.error}) until it "
        f"expires{unstamped}"
    )


def servable(
    dataset: Dataset,
    head: bytes,
    size: int,
    marks: Marks,
    now_ms: int,
    *,
    tomb: int | str | None = None,
    own_top: int | None = None,
) -> str:
    """Whether a call is served the stored bytes now, and why not, as the run time decides.

    The value's stamp (the header's Redis clock) against the marks that judge it
    (:meth:`~memofill.generations.Marks.behind`: its dataset's, raised to its
    tags'), then its header's clock against ``ttl_s``, ``stale_s`` and
    ``stale_if_error_s``: below a hard mark a value is never served, below a soft
    one only stale, while one caller refreshes it. ``own_top``: the dataset's own
    top mark, where tags raised ``marks``, which tells whose mark a value is
    behind. An absent value beside a ``tomb`` was deleted by ``invalidate()``.
    """
    if size == 0 and isinstance(tomb, int):
        return (
            f"no: invalidated (deleted by invalidate() at {stamp_text(tomb)}); the next call "
            "fetches anew"
        )
    if size == 0:
        return "no: nothing stored (the next call fetches)"
    if head[:2] == OLD_HEADED:
        return "no: stored by a release before stamps; a call fetches anew and overwrites it"
    header = read_header(head)
    stamp = 0 if header is None else header.stamp
    whose = "one of its tags" if own_top is not None and stamp > own_top else "the dataset"
    special = _special(head, size)
    if special is NEGATIVE or isinstance(special, ErrorMarker):
        return _marker_servable(special, header, marks, whose)
    if special is CORRUPT:
        return "no: not a memofill value (a call fetches and overwrites it)"
    if header is None:
        if marks.explicit:
            return (
                "no: written without a stamp (by hand or an older release) and the dataset "
                "was invalidated; a call fetches anew"
            )
        return "yes: fresh until Redis expires it"
    behind = marks.behind(stamp, dataset.stale_s > 0)
    if behind == EXPIRED and stamp <= marks.hard:
        return (
            f"no: fetched before {whose} was invalidated, or before its marks were lost "
            f"(stamped {stamp_text(stamp)}, not after {stamp_text(marks.hard)}); a call "
            "fetches anew"
        )
    if behind == EXPIRED:
        return (
            f"no: fetched before {whose} was invalidated softly (stamped "
            f"{stamp_text(stamp)}, not after {stamp_text(marks.soft)}), and it has no stale_s "
            "to serve it stale; a call fetches anew"
        )
    fresh = now_ms < header.soft_until_ms
    stale_ms, if_error_ms = dataset.stale_s * 1000, dataset.stale_if_error_s * 1000
    kind = verdict(now_ms, header.soft_until_ms, stale_ms, if_error_ms)
    if behind == STALE and fresh:
        return (
            f"stale: fetched before {whose} was invalidated softly (stamped "
            f"{stamp_text(stamp)}, not after {stamp_text(marks.soft)}); served stale while one "
            "caller refreshes it"
        )
    if fresh:
        return "yes: fresh"
    if kind == STALE:
        return "stale: past fresh until, within stale_s; served while one caller refreshes it"
    if kind == STALE_IF_ERROR:
        return "only if the fill fails: past stale_s, within stale_if_error_s; a call fetches"
    return "no: past fresh until and every stale window; a call fetches anew"


def _final_key_pattern(dataset: Dataset) -> re.Pattern[str]:
    """A regex for the final keys (without prefix) of ``dataset``, a group per field.

    An argument never holds a separator (see :mod:`memofill.keys`), so each
    field matches a run of anything else; the registry refuses overlapping
    templates, so at most one dataset matches a key.
    """
    stop = re.escape("".join(sorted(SEPARATORS)))
    parts = dataset.template.parts
    return re.compile(
        "".join(
            f"([^{stop}]*)" if index % 2 else re.escape(part) for index, part in enumerate(parts)
        )
    )


def tags_of_final(dataset: Dataset, prefix: str, final: str) -> tuple[str, ...]:
    """The tags the value under ``final`` bears: its dataset's templates filled with the
    texts its key holds (as a call builds them), or none for a key that is not the dataset's."""
    found = _final_key_pattern(dataset).fullmatch(final[len(prefix) :])
    if found is None or not dataset.tag_templates:
        return ()
    texts = dict(zip(dataset.template.parts[1::2], found.groups(), strict=True))
    tags = []
    for template in dataset.tag_templates:
        pieces = [template.literals[0]]
        for name, literal in zip(template.fields, template.literals[1:], strict=True):
            pieces += [texts[name], literal]
        tags.append("".join(pieces))
    return tuple(tags)


def read_tag_marks(
    client: redis.Redis, prefix: str, tags: tuple[str, ...]
) -> tuple[tuple[int, int, bool], str]:
    """The marks of ``tags`` (:func:`memofill.tags.read_marks`) and a line that tells them.

    A hash without ``born`` is made anew by the next tagged read: every value
    stamped before then is refilled, which the marks then say (Redis's clock now).
    """
    fields = [MARK_PREFIX + tag for tag in tags]
    read, *marks = client.hmget(tags_key(prefix), [BORN, *fields])  # read only
    renewed = read is None
    if read is None:
        seconds, micros = client.time()
        born = seconds * 1_000_000 + micros
    else:
        born = int(read)
    told = []
    for tag, mark in zip(tags, marks, strict=True):
        hard, soft, _ = tag_marks(0, [mark])
        if mark is None:
            told.append(f"{tag} (never invalidated)")
        else:
            soft_text = f", soft {stamp_text(soft)}" if soft else ""
            told.append(f"{tag} (invalidated {stamp_text(hard)}{soft_text})")
    hash_text = (
        f"{tags_key(prefix)} missing: the next tagged read makes it anew, and no value "
        "stamped before then is served"
        if renewed
        else f"{tags_key(prefix)} born {stamp_text(born)}"
    )
    return tag_marks(born, marks), "; ".join([*told, hash_text])


def match_final_key(policies: Mapping[str, Dataset], prefix: str, key: str) -> Dataset | None:
    """The dataset whose final keys under ``prefix`` include ``key``, as the logs print it."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    for dataset in policies.values():
        if _final_key_pattern(dataset).fullmatch(rest):
            return dataset
    return None


def prefix_hint(policies: Mapping[str, Dataset], prefix: str, key: str) -> str:
    """``; ...`` naming the prefix that would make ``key`` match a dataset, else ``""``.

    Tries every leading part of ``key`` (shortest first) as the prefix, so a
    final key logged by a service with a prefix the command was not told about
    gets a pointer rather than a bare "no dataset".
    """
    for end in range(1, len(key)):
        dataset = match_final_key(policies, key[:end], key)
        if dataset is not None and key[:end] != prefix:
            return (
                f"; it is a key of {dataset.key!r} under the prefix {key[:end]!r}: "
                f"pass --prefix {key[:end]!r} or set prefix in [tool.memofill]"
            )
    return ""


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _other_prefix(client: redis.Redis, final: str) -> str | None:
    """A key that ends with ``final`` under some longer prefix, from one cheap SCAN step.

    One ``SCAN 0 MATCH *<final> COUNT 1000`` only: a hint, not a search, so it
    costs the same on a large keyspace and may find nothing where a key exists.
    A user whose ACL does not grant ``SCAN`` (the least-privilege user memofill
    documents) gets no hint rather than an error.
    """
    try:
        _, keys = client.scan(0, match="*" + glob_escape(final), count=1000)
    except redis.ResponseError:
        return None
    for raw in keys:
        found = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        if found != final:
            return found
    return None


#: The most of a stored value ``--value`` fetches, and the most of its JSON it prints.
MAX_VALUE_BYTES = 1 << 20
MAX_VALUE_LINES = 200


def describe_value(raw: bytes | None) -> str:
    """A stored value as an operator wants to read it: pretty JSON, or what the bytes are.

    Markers and foreign bytes are named, never decoded into an exception; long
    JSON is cut at :data:`MAX_VALUE_LINES` lines with a note saying so.
    """
    if raw is None:
        return "(no value: the key does not exist)"
    value = decode_any(raw)
    if value is NEGATIVE:
        return "(negative marker: the fetch returned None; callers get None until it expires)"
    if isinstance(value, ErrorMarker):
        return f"(error marker: the last fill raised {value.error}; callers retry after it expires)"
    if value is CORRUPT:
        return f"(not a memofill value; the first bytes are {raw[:64]!r})"
    lines = orjson.dumps(value, option=orjson.OPT_INDENT_2).decode().splitlines()
    if len(lines) > MAX_VALUE_LINES:
        cut = len(lines) - MAX_VALUE_LINES
        lines = [*lines[:MAX_VALUE_LINES], f"... ({cut} more lines not shown)"]
    return "\n".join(lines)


def inspect_entry(
    url: str, dataset: Dataset, final: str, *, prefix: str, show_value: bool = False
) -> tuple[list[tuple[str, str]], str | None]:
    """The lines ``memofill inspect`` prints, as ``(label, value)`` pairs, and the value text.

    ``prefix`` is the one ``final`` was made under (required: another prefix's
    meta hash holds other marks): the dataset's invalidation marks are read
    from its meta hash, and the ``servable`` line says whether a
    call is served the stored bytes (see :func:`servable`). The value text is
    ``None`` unless ``show_value``; a value larger than :data:`MAX_VALUE_BYTES`
    is described, not fetched.
    """
    lock = lock_key(final)
    fill = dataset.fill_in_force  # refresh_retry_ms as the fills use it
    policy = (
        "none (legacy: process-local singleflight)"
        if fill is None
        else (
            f"lease_ms={fill.lease_ms} wait_ms={fill.wait_ms} "
            f"poll_min_ms={fill.poll_min_ms} poll_max_ms={fill.poll_max_ms}"
            f" early_beta={fill.early_beta} refresh_retry_ms={fill.refresh_retry_ms}"
        )
    )
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    except ValueError as exc:  # the URL is not quoted: it may hold a password
        raise ConfigurationError(f"bad Redis URL: {exc}") from None
    value: str | None = None
    with contextlib.closing(client):
        reply = Commands(client).describe(final, lock)
        data_ttl, size, head, lock_ttl, holder, tomb_ttl, tomb_raw = reply
        marks: Marks | str
        try:
            marks, renewed = read_marks(client, prefix, dataset.key)
        except redis.ResponseError as exc:  # an ACL without HGETALL on the meta key, say
            marks, renewed = f"unknown: cannot read {meta_key(prefix)} ({exc})", None
        tags, tags_text, own_top = tags_of_final(dataset, prefix, final), None, None
        if tags:
            (hard, soft, marked), tags_text = read_tag_marks(client, prefix, tags)
            if isinstance(marks, Marks):  # a value is judged by its tags' marks too
                own_top = marks.top
                marks.set(hard, soft, marked)
        elsewhere = _other_prefix(client, final) if data_ttl == -2 else None
        if show_value and size > MAX_VALUE_BYTES:
            value = f"(not shown: {size} bytes is more than {MAX_VALUE_BYTES})"
        elif show_value:
            raw = client.get(final)
            value = describe_value(raw if raw is None or isinstance(raw, bytes) else raw.encode())
    token: Any = holder.decode(errors="replace") if holder else "none"
    now_ms = round(time.time() * 1000)
    tomb = read_tomb(tomb_raw)
    if isinstance(marks, str):
        marks_text = verdict_text = marks
    else:
        marks_text = _marks_text(marks, renewed)
        verdict_text = servable(dataset, head, size, marks, now_ms, tomb=tomb, own_top=own_top)
    lines = [
        ("dataset", dataset.key),
        (
            "ttl",
            f"{dataset.ttl_s} s, negative {dataset.negative_ttl_s} s, "
            f"error {dataset.error_ttl_s} s"
            + (
                f", stale {dataset.stale_s} s, stale if error {dataset.stale_if_error_s} s"
                if dataset.window_s
                else ""
            ),
        ),
        ("fill policy", policy),
        ("final key", final),
        ("lock key", lock),
        ("data ttl left", _ttl(data_ttl)),
        ("payload", f"{size - _header_len(head)} bytes, {_kind(head, size)}"),
        ("header", describe_header(head, now_ms) if size else "none"),
        ("marks", marks_text),
        *([("tags", tags_text)] if tags_text is not None else []),
        ("tomb", _tomb_text(tomb, tomb_ttl, head)),
        ("servable", verdict_text),
        ("lock ttl left", _ttl(lock_ttl)),
        ("lock holder", token),
    ]
    if elsewhere is not None:
        missing = elsewhere[: -len(final)] if elsewhere.endswith(final) else elsewhere
        lines.append(
            (
                "hint",
                f"{final!r} is absent but {elsewhere!r} exists: is the prefix {missing!r} missing?",
            )
        )
    return lines, value
