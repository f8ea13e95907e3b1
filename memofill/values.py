"""How one function's values become bytes and back, chosen once from its return annotation.

A function returning plain JSON data (no annotation, ``Any``, ``object``,
``dict``, ``list``, ``dict[str, Any]`` ...) gets :data:`JSON`: ``orjson.dumps``
and ``orjson.loads`` alone, the cheapest hit there is. Any other annotation
gets a :class:`TypedCodec`, which hands back a value of the annotated type in
every process: pydantic's ``TypeAdapter`` when a pydantic model is involved,
else a cattrs converter (dataclasses, attrs classes, ``TypedDict``,
``NamedTuple``, ``datetime``/``date``/``UUID``/``Decimal``, tuples, sets,
nested generics, ``Optional``). A ``codec=`` given to ``cached_dataset`` wins
over both (any object with ``encode`` and ``decode``, see :class:`Codec`). An
annotation neither can store is refused at decoration with a
:class:`~memofill.errors.ConfigurationError` that says so and names ``codec=``.

Stored markers (``None``, a failed fill) keep their NUL-prefixed form from
``memofill.codec``, whatever the codec: :func:`decode_stored` tells them
apart before the codec sees the bytes.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

import attrs
import orjson
from cattrs.cols import is_namedtuple
from cattrs.errors import StructureHandlerNotFoundError
from cattrs.preconf.orjson import make_converter

from memofill.codec import (
    CORRUPT,
    HEADED,
    HEADER_LEN,
    NEGATIVE_MARKER,
    decode_any,
    decode_special,
)
from memofill.errors import ConfigurationError

_MARKER_START = NEGATIVE_MARKER[:10]  # b"\x00memofill:", shared by every marker


@runtime_checkable
class Codec(Protocol):
    """What ``cached_dataset(key, codec=...)`` accepts: bytes out, the same value back.

    ``decode(encode(v)) == v`` for every value the function returns. An
    exception from ``encode`` makes the value unstorable (a WARNING, and the
    caller still gets it); one from ``decode`` makes the stored bytes a miss,
    overwritten by the fill.
    """

    def encode(self, value: Any) -> bytes:
        """The bytes stored for ``value`` (never ``None``: the fill stores that itself)."""

    def decode(self, data: bytes) -> Any:
        """The value ``data`` was encoded from."""


class NonFiniteFloatError(ValueError):
    """A value holds NaN or an infinity, which JSON cannot carry: it is not stored."""


def _check_finite(payload: bytes, data: Any) -> bytes:
    """``payload``, unless ``data`` held a NaN or an infinity that JSON turned into ``null``.

    orjson writes those as ``null``: the caller of the fill would get ``nan`` and
    every other process ``None``. Only a payload containing ``null`` is examined,
    so a fill pays one search of its bytes.
    """
    # rfind: CPython's backward search skips further than ``in`` on digit-heavy payloads.
    if payload.rfind(b"null") != -1 and _has_non_finite(data):
        raise NonFiniteFloatError(
            "the value holds NaN or an infinity, which JSON stores as null: "
            "return None or a string instead, or pass codec="
        )
    return payload


_ATOMS = frozenset({str, int, bool, type(None)})


def _has_non_finite(data: Any) -> bool:
    stack = [data]
    pop, extend = stack.pop, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind in _ATOMS:
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif kind is dict:
            extend(item.values())
        elif kind is list or kind is tuple:
            extend(item)
        elif isinstance(item, dict):
            extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            extend(getattr(item, field.name) for field in dataclasses.fields(item))
    return False


class _Json:
    """Plain JSON data, as returned: ``orjson.dumps`` / ``orjson.loads``."""

    decode = staticmethod(orjson.loads)

    def encode(self, value: Any) -> bytes:
        return _check_finite(orjson.dumps(value), value)

    def __repr__(self) -> str:
        return "JSON"


#: The codec of unannotated and plain-JSON functions.
JSON: Codec = _Json()

_PLAIN = (Any, object, dict, list, str, int, float, bool, type(None))


def _is_plain(annotation: Any) -> bool:
    """Whether orjson alone round-trips values of ``annotation`` (JSON data, of any shape)."""
    if annotation in _PLAIN:
        return True
    origin = typing.get_origin(annotation)
    if origin in (dict, list):
        return all(_is_plain(arg) for arg in typing.get_args(annotation))
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return all(_is_plain(arg) for arg in typing.get_args(annotation))
    return False


def _uses_pydantic(annotation: Any) -> bool:
    """Whether ``annotation`` names a pydantic model anywhere (pydantic imported only if so)."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None:  # no model can exist without pydantic imported
        return False
    seen: list[Any] = [annotation]
    while seen:
        item = seen.pop()
        if isinstance(item, type) and issubclass(item, pydantic.BaseModel):
            return True
        seen.extend(typing.get_args(item))
    return False


def _converter() -> Any:
    """A cattrs converter for orjson, plus ``Decimal`` and ``UUID`` as strings.

    NamedTuples are read through :func:`typing.get_type_hints`, so that a module
    with ``from __future__ import annotations`` declares them as any other.
    """
    converter = make_converter()
    converter.register_unstructure_hook(Decimal, str)
    converter.register_structure_hook(Decimal, lambda data, _: Decimal(data))
    converter.register_unstructure_hook(uuid.UUID, str)
    converter.register_structure_hook(uuid.UUID, lambda data, _: uuid.UUID(data))

    def structure_namedtuple(cl: Any) -> Callable[[Any, Any], Any]:
        hints = typing.get_type_hints(cl)
        as_tuple: Any = tuple.__class_getitem__(tuple(hints[name] for name in cl._fields))
        items = converter.get_structure_hook(as_tuple)
        return lambda data, _: cl(*items(data, as_tuple))

    def unstructure_namedtuple(cl: Any) -> Callable[[Any], Any]:
        hints = typing.get_type_hints(cl)
        hooks = [converter.get_unstructure_hook(hints[name]) for name in cl._fields]
        return lambda value: [hook(item) for hook, item in zip(hooks, value, strict=True)]

    converter.register_structure_hook_factory(is_namedtuple, structure_namedtuple)
    converter.register_unstructure_hook_factory(is_namedtuple, unstructure_namedtuple)
    return converter


class TypedCodec:
    """Values of one return annotation: structured back into that type on every read."""

    def __init__(self, annotation: Any) -> None:
        self.annotation = annotation
        self.encode: Callable[[Any], bytes]
        self.decode: Callable[[bytes], Any]
        if _uses_pydantic(annotation):
            # Imported already, or no model could be in the annotation.
            adapter: Any = sys.modules["pydantic"].TypeAdapter(annotation)

            def encode_pydantic(value: Any) -> bytes:
                # A value that is not of the annotated type is refused, not guessed at.
                payload: bytes = adapter.dump_json(value, warnings="error")
                return _check_finite(payload, adapter.dump_python(value))

            self.encode = encode_pydantic
            self.decode = adapter.validate_json
        else:
            converter = _converter()
            unstructure = converter.get_unstructure_hook(annotation)
            structure = converter.get_structure_hook(annotation)
            for inner in _nested_types(annotation):  # cattrs makes some hooks on first use only
                converter.get_structure_hook(inner)

            def encode_cattrs(value: Any) -> bytes:
                data = unstructure(value)
                return _check_finite(orjson.dumps(data), data)

            def decode_cattrs(raw: bytes) -> Any:
                return structure(orjson.loads(raw), annotation)

            self.encode, self.decode = encode_cattrs, decode_cattrs

    def __repr__(self) -> str:
        return f"TypedCodec({self.annotation!r})"


def _nested_types(annotation: Any) -> Iterator[Any]:
    """``annotation`` and the types inside it, some of which cattrs meets only on a first read.

    The members of unions (an ``Optional`` one's too, together), the arguments
    of generics, and the fields of dataclasses, attrs classes, ``TypedDict`` and
    ``NamedTuple`` classes, all the way down. Type variables, ``Literal`` values,
    ``Annotated`` metadata, ``None`` and ``...`` are not types to structure, and
    are skipped.
    """
    seen: set[int] = set()
    stack = [annotation]
    while stack:
        item = stack.pop()
        if item is Ellipsis or item is type(None) or isinstance(item, (typing.TypeVar, list)):
            continue  # in ``tuple[int, ...]``, ``X | None``, ``Callable[[], X]``: no types
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        origin = typing.get_origin(item)
        if origin is typing.Literal:
            continue
        args = typing.get_args(item)
        if origin is typing.Annotated:  # the type, not its metadata
            stack.append(args[0])
            continue
        if (origin is typing.Union or isinstance(item, types.UnionType)) and type(None) in args:
            others = tuple(arg for arg in args if arg is not type(None))
            if len(others) > 1:  # the union an Optional value is structured with
                stack.append(typing.Union[others])  # noqa: UP007  # from a tuple of members
        stack.extend(args or _field_types(item))


def _field_types(cl: Any) -> list[Any]:
    """The field types of a dataclass, attrs class, ``TypedDict`` or ``NamedTuple`` (else none)."""
    if not isinstance(cl, type):
        return []
    if dataclasses.is_dataclass(cl):
        names = [field.name for field in dataclasses.fields(cl)]
    elif attrs.has(cl):
        names = [field.name for field in attrs.fields(cl)]
    elif typing.is_typeddict(cl) or is_namedtuple(cl):
        names = None
    else:
        return []
    try:
        hints = typing.get_type_hints(cl)
    except Exception:  # an unresolved name: cattrs says so itself when it gets there
        return []
    return list(hints.values()) if names is None else [hints[n] for n in names if n in hints]


#: What the error for an unsupported return annotation lists as storable.
_SUPPORTED = (
    "JSON data (dict, list, str, int, float, bool, None), dataclasses, attrs classes, "
    "pydantic models, TypedDict, NamedTuple, enums, datetime, date, UUID, Decimal, "
    "and tuples, lists, sets, dicts and Optional of these"
)


def _type_name(annotation: Any) -> str:
    """``annotation`` as it is written: ``mod.Quote``, ``list[mod.Quote]``, ``complex``."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        if annotation.__module__ == "builtins":
            return annotation.__qualname__
        return f"{annotation.__module__}.{annotation.__qualname__}"
    return repr(annotation)


def _function_name(function: Callable[..., Any]) -> str:
    wrapped = getattr(function, "__wrapped__", function)
    module = getattr(wrapped, "__module__", None)
    name = getattr(wrapped, "__qualname__", None) or repr(wrapped)
    return name if module is None else f"{module}.{name}"


def _unsupported(function: Callable[..., Any], annotation: Any, exc: Exception) -> str:
    """The one-line error for a return annotation no codec could be made for."""
    if isinstance(exc, StructureHandlerNotFoundError):
        why = f"memofill has no rule for {_type_name(exc.type_)}"
    else:
        lines = str(exc).strip().splitlines()
        why = lines[0] if lines else type(exc).__name__
    return (
        f"cached_dataset cannot store the values of {_function_name(function)}: its return "
        f"annotation {_type_name(annotation)} is not supported ({why}); supported: "
        f"{_SUPPORTED}; for any other type pass codec= to cached_dataset (an object with "
        "encode(value) -> bytes and decode(bytes) -> value)"
    )


def codec_for(annotation: Any) -> Codec:
    """The codec of a function returning ``annotation`` (:data:`JSON` for plain data)."""
    if _is_plain(annotation):
        return JSON
    return TypedCodec(annotation)


def return_annotation(function: Callable[..., Any]) -> Any:
    """The resolved return annotation of ``function``: ``Any`` when it has none.

    Raises :class:`NameError` when a forward reference cannot be resolved yet.
    """
    wrapped = getattr(function, "__wrapped__", function)
    if "return" not in getattr(wrapped, "__annotations__", {}):
        return Any
    return typing.get_type_hints(wrapped).get("return", Any)


class Values:
    """One decorated function's codec: resolved at decoration, or once on first use.

    A return annotation that names a class defined later in its module (a
    forward reference) cannot be resolved at decoration; it is resolved on the
    function's first call, and never again.
    """

    def __init__(self, function: Callable[..., Any], codec: Codec | None) -> None:
        self._function = function
        self._codec: Codec | None = codec
        if codec is None:
            try:
                annotation = return_annotation(function)
            except NameError:
                self._codec = None  # resolved on first use
            else:
                self._codec = self._codec_for(annotation)

    @property
    def resolved(self) -> Codec | None:
        """The codec if it is known already (``None`` while a forward reference waits)."""
        return self._codec

    @property
    def codec(self) -> Codec:
        """The codec; resolves a forward reference the first time it is asked for."""
        if self._codec is None:
            self._codec = self._codec_for(return_annotation(self._function))
        return self._codec

    def _codec_for(self, annotation: Any) -> Codec:
        """:func:`codec_for`, failing as memofill's own error that says what to do instead.

        Raises :class:`~memofill.ConfigurationError` when no codec can be made
        for ``annotation`` (a class cattrs has no rule for, a union it cannot
        tell apart): ``codec=`` is the way out.
        """
        try:
            return codec_for(annotation)
        except Exception as exc:  # cattrs' or pydantic's refusal, whatever its class
            raise ConfigurationError(_unsupported(self._function, annotation, exc)) from exc


def decode_stored(codec: Codec, raw: bytes) -> Any:
    """Stored bytes read with ``codec``: a value, ``NEGATIVE``, an ``ErrorMarker`` or ``CORRUPT``.

    Bytes the codec cannot read (a schema changed after a deploy) are
    ``CORRUPT``: a miss that the fill overwrites. The stored header, if any, is
    skipped: a codec sees only the bytes it encoded.
    """
    if codec is JSON:
        return decode_any(raw)
    body = raw[HEADER_LEN:] if raw[:2] == HEADED else raw
    if body.startswith(_MARKER_START):
        return decode_special(body)
    try:
        return codec.decode(body)
    except Exception:  # whatever the codec raises on bytes it cannot read
        return CORRUPT
