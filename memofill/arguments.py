"""How a call's arguments become its Redis key: decided once, when a function is decorated.

Rules:

- The key sees every argument that can change the result: each parameter is a
  field of the dataset's key template or named in ``ignore=`` (a method's first
  ``self`` or ``cls`` aside). Anything else is refused at decoration, with the fix.
- Each field's argument is read by position or by name, the way the call binds it,
  and written as one exact text (:class:`~memofill.keys.FieldText`); a field whose
  annotation names a type with no exact text is refused at decoration too.
- The builder :func:`compile_key` returns is specialised for its fields: a key with
  no field is a constant, and the commonest key, with one field, costs one call.
- A page of ``many()`` items that are each a ``str`` or ``int`` value of a key's
  only field, which the function takes first, has its keys built by one loop
  (:func:`compile_page_keys`), the same texts the builder writes.
- The builder refuses the arguments the function itself would refuse, with the
  ``TypeError`` Python raises for them (:class:`Shape`): a call is refused the same
  way on a hit as on a miss, which calls the function. A call with positional
  arguments only, within the signature's range, is judged by one comparison.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from memofill.errors import KeyTemplateError
from memofill.keys import FieldText, KeyTemplate, annotation_problem

_NO_DEFAULT: Any = inspect.Parameter.empty


@attrs.frozen
class Field:
    """One key field: the parameter it reads, its position when passed by position, its default."""

    name: str
    position: int | None
    default: Any


def compile_fields(
    template: KeyTemplate, function: Callable[..., Any], ignore: Iterable[str] = ()
) -> tuple[Field, ...]:
    """Where each key field comes from in a call of ``function``, once the key is known to fit.

    The key must see every argument that can change the result: each
    parameter is a field of ``template`` or named in ``ignore`` (a method's
    first ``self`` or ``cls`` aside), else two calls that differ only in it
    would share one cached value. Fields whose annotation (when it resolves)
    names a type without an exact key text are refused here too, at import
    time rather than at the first call.
    """
    signature = inspect.signature(function)
    parameters = signature.parameters
    where = f"key {template.source!r} on {_name(function)}{signature}"
    ignored = _ignored_names(ignore, where)
    for name in ignored:
        if name not in parameters:
            raise KeyTemplateError(f"{where}: ignore= names {name!r}, which is not a parameter")
        if name in template.fields:
            raise KeyTemplateError(
                f"{where}: ignore= names {name!r}, which is a key field; "
                f"drop it from ignore= or {{{name}}} from the registry key"
            )
    positional = [
        name
        for name, p in parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    hints = _type_hints(function)
    fields = []
    for name in template.fields:
        source = parameters.get(name)
        if source is None or source.kind in (source.VAR_POSITIONAL, source.VAR_KEYWORD):
            raise KeyTemplateError(f"{where}: field {{{name}}} is not a named parameter")
        problem = annotation_problem(hints[name]) if name in hints else None
        if problem:
            raise KeyTemplateError(
                f"{where}: field {{{name}}}: {problem}; annotate it str, int, bool, None, "
                "an enum, UUID, date, datetime or Decimal (convert before the call), "
                f"or drop {{{name}}} from the key and pass ignore=({name!r},)"
            )
        position = positional.index(name) if name in positional else None
        fields.append(Field(name, position, source.default))
    _check_every_parameter_is_keyed(parameters, template.fields, ignored, where)
    return tuple(fields)


def _check_every_parameter_is_keyed(
    parameters: Mapping[str, inspect.Parameter],
    fields: tuple[str, ...],
    ignored: frozenset[str],
    where: str,
) -> None:
    """Refuse a parameter that is neither a key field nor ignored: it would go unseen."""
    first = next(iter(parameters.values()), None)
    for parameter in parameters.values():
        name = parameter.name
        if name in fields or name in ignored:
            continue
        if (
            parameter is first
            and name in ("self", "cls")
            and parameter.kind != parameter.KEYWORD_ONLY
        ):
            continue  # a method's instance or class: the method, not the call, picks it
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise KeyTemplateError(
                f"{where}: {parameter} takes arguments the key cannot see; "
                f"list it as ignore=({name!r},) if they never change the result, "
                "or replace it with named parameters that the key holds"
            )
        raise KeyTemplateError(
            f"{where}: parameter {name!r} is not in the key, so calls that differ only in it "
            f"would share one cached value; add {{{name}}} to the registry key, "
            f"or pass ignore=({name!r},) if it never changes the result"
        )


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", type(function).__qualname__)


def _ignored_names(ignore: Iterable[str], where: str) -> frozenset[str]:
    if isinstance(ignore, str):
        raise KeyTemplateError(
            f"{where}: ignore= takes a tuple of parameter names, such as ignore=({ignore!r},), "
            "not a str"
        )
    names = tuple(ignore)
    odd = [name for name in names if not isinstance(name, str)]
    if odd:
        raise KeyTemplateError(f"{where}: ignore= holds {odd[0]!r}; it takes parameter names")
    return frozenset(names)


def _type_hints(function: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of ``function``, or none when they do not resolve.

    A name only imported under ``TYPE_CHECKING``, say, leaves the check to
    call time rather than failing a decoration that would work.
    """
    try:
        return typing.get_type_hints(inspect.unwrap(function), include_extras=True)
    except Exception:  # any failure to resolve: skip the early check
        return {}


def is_coroutine_function(function: Callable[..., Any]) -> bool:
    """Whether calls of ``function`` return awaitables, even behind a plain wrapper.

    A ``functools.wraps`` wrapper written as a plain ``def`` that returns the
    wrapped coroutine function's result is itself a coroutine function in all
    but name; treated as sync, it would never be cached (a coroutine object is
    not a value) and would block the event loop on Redis. So the
    ``__wrapped__`` chain decides, as does :func:`inspect.markcoroutinefunction`;
    so does an object's ``async def __call__``.
    """
    innermost = inspect.unwrap(function)
    return (
        inspect.iscoroutinefunction(function)
        or inspect.iscoroutinefunction(innermost)
        or inspect.iscoroutinefunction(inspect.getattr_static(type(innermost), "__call__", None))
    )


@attrs.frozen
class Shape:
    """Which arguments a function's signature accepts, so the key builder can refuse the rest.

    ``least <= n <= most`` positional arguments (a method's ``self`` counted)
    and no keyword is accepted at once; anything else is handed to ``stub``, a
    function with the same parameters and no body, which raises the very
    ``TypeError`` (same message) the function would, or returns ``None``.
    """

    least: int
    most: int
    stub: Callable[..., None]


def compile_shape(function: Callable[..., Any]) -> Shape:
    """The :class:`Shape` of calls of ``function``: what its signature accepts.

    The stub bears the function's qualified name, so that its messages read as
    the function's own (``get() takes 1 positional argument but 2 were given``);
    a bound method or a callable object counts its ``self`` as Python does.
    """
    bound_to: object = None
    if inspect.ismethod(function):
        bound_to, target = function.__self__, function.__func__
        signature, name = inspect.signature(target), _name(target)
    elif inspect.isroutine(function) or hasattr(function, "__wrapped__"):
        signature, name = inspect.signature(function), _name(function)
    else:  # a callable object: Python names its __call__, self included
        call = type(function).__call__
        bound_to, signature, name = function, inspect.signature(call), _name(call)
    parameters = list(signature.parameters.values())
    if bound_to is not None:
        parameters = parameters[1:]  # given as the stub's bound self, not counted below
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in parameters)
    least = sum(p.default is p.empty for p in positional)
    most = sys.maxsize if has_varargs else len(positional)
    if any(p.kind == p.KEYWORD_ONLY and p.default is p.empty for p in parameters):
        least = most + 1 if most < sys.maxsize else most  # no call without keywords fits
    stub = _stub(signature, name)
    if bound_to is not None:
        stub = types.MethodType(stub, bound_to)
    return Shape(least, most, stub)


def _stub(signature: inspect.Signature, qualname: str) -> Callable[..., None]:
    """A function with ``signature``'s parameters (defaults stood in for) that does nothing.

    Made from source, since only a real function with these parameters raises
    exactly what Python raises for a call that does not fit them.
    """
    texts, slash_after, star_done = [], False, False
    for parameter in signature.parameters.values():
        kind, name = parameter.kind, parameter.name
        if slash_after and kind != parameter.POSITIONAL_ONLY:
            texts.append("/")
        slash_after = kind == parameter.POSITIONAL_ONLY
        if kind == parameter.KEYWORD_ONLY and not star_done:
            texts.append("*")
        if kind == parameter.VAR_POSITIONAL:
            texts.append(f"*{name}")
            star_done = True
        elif kind == parameter.VAR_KEYWORD:
            texts.append(f"**{name}")
        else:
            star_done = star_done or kind == parameter.KEYWORD_ONLY
            texts.append(name if parameter.default is parameter.empty else f"{name}=_d")
    if slash_after:
        texts.append("/")
    namespace: dict[str, Any] = {"_d": None}
    exec(f"def stub({', '.join(texts)}):\n    return None\n", namespace)
    stub: Callable[..., None] = namespace["stub"]
    stub.__qualname__, stub.__name__ = qualname, qualname.rpartition(".")[2]
    return stub


#: Builds the final key of one call: ``(instance, args, kwargs) -> key``.
KeyBuilder = Callable[[Any, tuple[Any, ...], dict[str, Any]], str]


def compile_key(
    prefix: str,
    template: KeyTemplate,
    fields: tuple[Field, ...],
    dataset: str,
    shape: Shape,
) -> KeyBuilder:
    """The key builder of one decorated function, specialised once for its fields.

    A key without fields is a constant; every field reads its argument by
    position or name, the way the call binds it, and escapes it (see
    :class:`~memofill.keys.FieldText`). A call that ``shape`` refuses raises the
    function's own ``TypeError`` before any key is built.
    """
    least, most, stub = shape.least, shape.most, shape.stub
    if not fields:
        final = prefix + template.source

        def constant(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
            if kwargs or not least <= len(args) + (instance is not None) <= most:
                _refuse(stub, instance, args, kwargs)  # raises, or the keywords fit
            return final

        def exact_constant(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
            # No parameter with a default (a function of none, say): one comparison.
            if kwargs or args or instance is not None:
                return constant(instance, args, kwargs)
            return final

        return exact_constant if least == most == 0 else constant
    literals = list(template.parts[0::2])
    literals[0] = prefix + literals[0]
    if len(fields) == 1:
        return _argument_reader(fields[0], dataset, shape, *literals)
    readers = tuple(_argument_reader(field, dataset) for field in fields)

    def build(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if kwargs or not least <= len(args) + (instance is not None) <= most:
            _refuse(stub, instance, args, kwargs)
        texts = [read(instance, args, kwargs) for read in readers]
        # One more literal than fields: the last follows the last field.
        pairs = zip(literals, texts, strict=False)
        return "".join(literal + text for literal, text in pairs) + literals[-1]

    return build


#: Builds the keys of a page of values of a key's one field, or ``None`` for another page.
PageKeyBuilder = Callable[[list[Any]], "list[str] | None"]


def compile_page_keys(
    prefix: str, template: KeyTemplate, fields: tuple[Field, ...], shape: Shape
) -> PageKeyBuilder | None:
    """The keys of a ``many()`` page whose items are each a call's one positional argument.

    ``None`` unless the key has one field, the function's first parameter, and
    the function takes one positional argument: then each ``str`` or ``int``
    item is that call, and its key is the single builder's text without a call
    per item. A page with an item of another type gets ``None`` back: it is
    built call by call, with each call's checks.
    """
    if len(fields) != 1 or fields[0].position != 0 or not shape.least <= 1 <= shape.most:
        return None
    before, after = prefix + template.parts[0], template.parts[2]
    text_of = FieldText(fields[0].name)
    known = text_of.known

    def page(values: list[Any]) -> list[str] | None:
        keys = []
        for value in values:
            if type(value) is str:
                text = known.get(value)
                keys.append(before + (text_of(value) if text is None else text) + after)
            elif type(value) is int:
                keys.append(before + text_of(value) + after)
            else:
                return None
        return keys

    return page


def _refuse(
    stub: Callable[..., None], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Raise the ``TypeError`` the function raises for these arguments, if it would."""
    if instance is None:
        stub(*args, **kwargs)
    else:
        stub(instance, *args, **kwargs)


def _argument_reader(
    field: Field, dataset: str, shape: Shape | None = None, before: str = "", after: str = ""
) -> KeyBuilder:
    """Reads one field's argument from a call: ``before`` + its escaped text + ``after``.

    A key with one field is one such reader, its literals around it, that
    checks the call against ``shape`` too: the commonest key costs one call.
    Without ``shape`` it checks nothing (:func:`compile_key`'s ``build`` has).
    """
    name, position, default = field.name, field.position, field.default
    text_of = FieldText(name)
    known = text_of.known

    def read(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        # A bound method's wrapper receives the arguments without ``self``.
        if position is not None:
            index = position if instance is None else position - 1
            if 0 <= index < len(args):
                value = args[index]
                text = known.get(value) if type(value) is str else None
                return before + (text_of(value) if text is None else text) + after
        if name in kwargs:
            return before + text_of(kwargs[name]) + after
        if default is not _NO_DEFAULT:
            return before + text_of(default) + after
        raise TypeError(f"missing argument {name!r} for key {dataset!r}")

    if shape is None:
        return read
    least, most, stub = shape.least, shape.most, shape.stub
    # The same counts for a bound method's call, whose ``self`` is not in ``args``.
    least_bound, most_bound = least - 1, most - 1 if most < sys.maxsize else most
    offset = None if position is None else position - 1

    def checked(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        # read() above with the call's shape checked first, inlined: one call for the
        # commonest key, and the shape costs a comparison, not a frame.
        count = len(args)
        if instance is None:
            if kwargs or not least <= count <= most:
                stub(*args, **kwargs)  # raises, or the keywords fit
            index = position
        else:
            if kwargs or not least_bound <= count <= most_bound:
                stub(instance, *args, **kwargs)
            index = offset
        if index is not None and 0 <= index < count:
            value = args[index]
            text = known.get(value) if type(value) is str else None
            return before + (text_of(value) if text is None else text) + after
        if name in kwargs:
            return before + text_of(kwargs[name]) + after
        if default is not _NO_DEFAULT:
            return before + text_of(default) + after
        raise TypeError(f"missing argument {name!r} for key {dataset!r}")

    if least != most or position is None or offset is None:
        return checked
    first, first_bound = position, offset  # ints, for the closure below

    def exact(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        # The commonest function, positional parameters without defaults, called with all
        # of them by position: the count is the check, and the field's position is in range.
        if instance is None:
            if kwargs or len(args) != most:
                return checked(instance, args, kwargs)  # refuses, or reads a keyword
            value = args[first]
        else:
            if kwargs or len(args) != most_bound:
                return checked(instance, args, kwargs)
            value = args[first_bound]
        text = known.get(value) if type(value) is str else None
        return before + (text_of(value) if text is None else text) + after

    return exact
