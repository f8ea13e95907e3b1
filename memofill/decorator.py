"""``@cached_dataset``: resolve the policy and compile the key once, then serve hits inline.

Everything that can be decided when a function is decorated is decided then:
the dataset's policy (an unknown key fails at import time, not at the first
call), how each key field is read from the call's arguments, and whether the
function is sync or a coroutine function. A call then costs one ``GET`` and
one decode on a hit; only a miss enters :mod:`memofill.coordinator`.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
import random
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, overload

import attrs
import wrapt

from memofill.codec import (
    CORRUPT,
    FETCH_START,
    HEADED,
    HEADER_LEN,
    NEGATIVE,
    NEGATIVE_MARKER,
    SEQ,
    SOFT_UNTIL,
    VIEW_FROM_BYTES,
    ErrorMarker,
    Header,
    decode_special,
    payload,
    read_header,
)
from memofill.commands import Commands, acl_rule, is_timeout, is_unreachable
from memofill.coordinator import Plan, Result, fill, refresh, run_async, run_sync
from memofill.errors import ConfigurationError, FillError, KeyTemplateError
from memofill.fallback import Breaker
from memofill.freshness import (
    EARLY,
    EXPIRED,
    STALE,
    STALE_IF_ERROR,
    late_rule,
    verdict,
    wall_clock,
)
from memofill.generations import Generations, Marks, mark_field
from memofill.keys import FieldText, KeyTemplate, annotation_problem, meta_key
from memofill.metrics import Metrics
from memofill.near import LocalStore, entry_bytes
from memofill.outcomes import (
    DISABLED,
    FALLBACK_HIT,
    HIT,
    NEAR_HIT,
    STALE_HIT,
    Counters,
    MissRecord,
    Outcome,
    RefreshRecord,
    refused_by_acl,
)
from memofill.policy import Dataset
from memofill.refreshing import Refreshes
from memofill.singleflight import TaskFlights, ThreadFlights
from memofill.values import JSON, Codec, Values, decode_stored

if TYPE_CHECKING:
    from memofill.instance import Memofill, State

P = ParamSpec("P")
R = TypeVar("R")
_P2 = ParamSpec("_P2")
_R2 = TypeVar("_R2")
_T = TypeVar("_T")

logger = logging.getLogger("memofill")
_NO_DEFAULT: Any = inspect.Parameter.empty
_rng = random.Random()

#: ``True`` inside ``memofill.disabled()``: calls go straight to the function.
bypassing: contextvars.ContextVar[bool] = contextvars.ContextVar("memofill_disabled", default=False)
#: How many ``disabled()`` blocks are open in the process, any thread or task; while there
#: is one, bindings are built gated, so that only then does a call read :data:`bypassing`.
open_blocks = 0
#: Held while a function's snapshot is swapped, so that two swaps never undo each other.
_swapping = threading.Lock()
#: Ticks once per call that runs without a client: only the first logs the warning.
_no_client_calls = itertools.count()


@attrs.frozen
class CallResult:
    """A value with how it was obtained: ``hit``, ``fallback_hit``, or a miss :class:`Outcome`."""

    value: Any
    outcome: str
    led: bool


@attrs.frozen
class _Field:
    name: str
    position: int | None
    default: Any


def compile_fields(
    template: KeyTemplate, function: Callable[..., Any], ignore: Iterable[str] = ()
) -> tuple[_Field, ...]:
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
        fields.append(_Field(name, position, source.default))
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


#: Builds the final key of one call: ``(instance, args, kwargs) -> key``.
KeyBuilder = Callable[[Any, tuple[Any, ...], dict[str, Any]], str]


def compile_key(
    prefix: str, template: KeyTemplate, fields: tuple[_Field, ...], dataset: str
) -> KeyBuilder:
    """The key builder of one decorated function, specialised once for its fields.

    A key without fields is a constant; every field reads its argument by
    position or name, the way the call binds it, and escapes it (see
    :class:`~memofill.keys.FieldText`).
    """
    if not fields:
        final = prefix + template.source
        return lambda instance, args, kwargs: final
    literals = list(template.parts[0::2])
    literals[0] = prefix + literals[0]
    if len(fields) == 1:
        return _argument_reader(fields[0], dataset, *literals)
    readers = tuple(_argument_reader(field, dataset) for field in fields)

    def build(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        texts = [read(instance, args, kwargs) for read in readers]
        # One more literal than fields: the last follows the last field.
        pairs = zip(literals, texts, strict=False)
        return "".join(literal + text for literal, text in pairs) + literals[-1]

    return build


def _argument_reader(field: _Field, dataset: str, before: str = "", after: str = "") -> KeyBuilder:
    """Reads one field's argument from a call: ``before`` + its escaped text + ``after``.

    A key with one field is one such reader, its literals around it: the
    commonest key costs one call.
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

    return read


class _Bypass:
    def __repr__(self) -> str:
        return "BYPASS"


#: What :meth:`_Binding.gate` returns when caching is off for this call.
BYPASS: Any = _Bypass()


@attrs.frozen
class _Binding:
    """What one decorated function's calls read: one immutable snapshot of its configuration.

    Reconfiguring the instance builds a new snapshot and swaps one reference, so
    a call that took a snapshot sees one configuration from start to end, never
    a prefix of one and a client of another. The calls hold this object, not
    the wrapper: attributes of a slotted class are read several times faster
    than a wrapt proxy's, and the hit path reads them on every call. Nothing
    in it changes: what calls accumulate (counts, sets of datasets already
    warned of) are objects of the instance's state that it points to, and a
    codec resolved on first use is swapped in as a new snapshot.
    """

    key: str
    is_async: bool
    #: The decorated function as it is now (``__wrapped__`` may be replaced after decoration).
    current_function: Callable[[], Callable[..., Any]]
    #: How this function's values are stored and read.
    values: Values
    #: The codec's ``decode``, read by every hit (``orjson.loads`` for plain JSON data).
    decode: Callable[[bytes], Any]
    #: The payload of a large headered value: a ``memoryview`` (no copy) when the codec is
    #: orjson's, which reads one; bytes for any other codec.
    view: Callable[[bytes], Any]
    dataset: Dataset
    key_of: KeyBuilder
    count_hit: Callable[[], object]
    ttl_s: float
    #: The client's commands, or ``None`` (no client, or a client of the wrong kind).
    commands: Commands | None
    #: Whether a call must ask :meth:`gate` first (``False`` on the common, cached path).
    gated: bool
    #: Why ``commands`` is ``None`` when that is a mistake, raised at every call.
    misconfigured: str | None
    #: Caching is off for the whole process (``MEMOFILL_DISABLED``).
    disabled: bool
    prefix: str
    counters: Counters
    metrics: Metrics
    local_store: LocalStore
    #: The store's near copies serve this function (its dataset has ``near_ms``), or ``None``.
    near: LocalStore | None
    #: ``near_ms`` in seconds.
    near_s: float
    #: Near copies are kept as stored bytes and decoded for each hit (``copy_on_hit``).
    near_copy: bool
    #: What a near copy this function may be served was decoded by (``None``: stored bytes).
    near_owner: object
    count_near: Callable[[], object]
    #: The dataset generations the process knows, and where they are kept in Redis.
    generations: Generations
    meta_key: str
    #: This dataset's marks (whole-dataset invalidation), changed in place as they change.
    marks: Marks
    breaker: Breaker
    thread_flights: ThreadFlights[Result]
    task_flights: TaskFlights[Result]
    #: The instance's datasets already warned of as unstorable (see :func:`_warn_unstorable`).
    unstorable_warned: set[str]
    #: Its datasets whose refusal by an ACL was logged since the client was configured.
    told_permission: set[str]
    #: Whether headered bytes are not a plain fresh hit (stale, or due early): ``None`` for a
    #: dataset with no stale window and no early refresh, whose values are fresh until
    #: Redis expires them.
    late: Callable[[bytes], bool] | None
    refreshes: Refreshes

    @classmethod
    def build(
        cls,
        state: State,
        key: str,
        *,
        fields: tuple[_Field, ...],
        is_async: bool,
        values: Values,
        decode: Callable[[bytes], Any],
        current_function: Callable[[], Callable[..., Any]],
    ) -> _Binding:
        """The snapshot of ``state`` (the instance's configuration) for one function."""
        dataset = state.policy(key)
        try:
            commands, misconfigured = state.commands_for(is_async), None
            near_problem = state.near_problem(dataset) if commands is not None else None
            if near_problem is not None:
                raise ConfigurationError(near_problem)
        except ConfigurationError as exc:
            commands, misconfigured = None, str(exc)
        near_copy = state.near is not None and state.near.copy_on_hit
        near_on = commands is not None and state.near is not None and dataset.near_ms > 0
        return cls(
            key=key,
            is_async=is_async,
            current_function=current_function,
            values=values,
            decode=decode,
            view=payload if values.resolved is JSON else _after_header,
            dataset=dataset,
            key_of=compile_key(state.prefix, dataset.template, fields, key),
            count_hit=state.counters.hit_tally(key).add,
            ttl_s=dataset.ttl_s,
            commands=commands,
            gated=misconfigured is not None or state.disabled or open_blocks > 0,
            misconfigured=misconfigured,
            disabled=state.disabled,
            prefix=state.prefix,
            counters=state.counters,
            metrics=state.metrics,
            local_store=state.local_store,
            near=state.local_store if near_on else None,
            near_s=dataset.near_ms / 1000,
            near_copy=near_copy,
            near_owner=None if near_copy else values,
            count_near=state.counters.tally(key, NEAR_HIT).add,
            generations=state.generations,
            meta_key=meta_key(state.prefix),
            marks=state.generations.of(key),
            breaker=state.breaker,
            thread_flights=state.thread_flights,
            task_flights=state.task_flights,
            unstorable_warned=state.unstorable_warned,
            told_permission=state.told_permission,
            late=_late_rule(dataset),
            refreshes=state.refreshes,
        )

    def gate(self) -> Commands | None:
        """:data:`BYPASS` when caching is off for this call, else :attr:`commands`.

        Raises the configuration mistake that left ``commands`` out.
        """
        if self.disabled or bypassing.get():
            return BYPASS  # type: ignore[no-any-return]
        if self.misconfigured is not None:
            raise ConfigurationError(self.misconfigured)
        return self.commands


def _late_rule(dataset: Dataset) -> Callable[[bytes], bool] | None:
    """The late rule (see :mod:`memofill.freshness`) of a dataset with a stale window or β."""
    fill = dataset.cache_fill
    if fill is None or not (dataset.stale_s or dataset.stale_if_error_s or fill.early_beta):
        return None
    return late_rule(fill.early_beta)


class CachedDataset(wrapt.FunctionWrapper[P, R]):
    """The callable ``@cached_dataset`` returns: the function, cached per its dataset policy.

    Besides being called, it offers :meth:`invalidate`, :meth:`invalidate_dataset`,
    :meth:`refresh` and :meth:`call_with_outcome`.
    """

    #: The calls' snapshot of the configuration now (see :class:`_Binding`).
    _self_snapshot: Callable[[], _Binding]
    _self_rebind: Callable[[State], None]

    def __new__(
        cls,
        wrapped: Callable[P, R],
        memofill: Memofill,
        key: str,
        ignore: Iterable[str] = (),
        codec: Codec | None = None,
    ) -> CachedDataset[P, R]:
        # Each decorated function gets a class of its own, so that __init__ can give it a
        # __call__ that closes over the function's binding (see __call__).
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        own: Any = type(cls.__name__, (cls,), namespace)
        return super().__new__(own)

    def __init__(
        self,
        wrapped: Callable[P, R],
        memofill: Memofill,
        key: str,
        ignore: Iterable[str] = (),
        codec: Codec | None = None,
    ) -> None:
        is_async = is_coroutine_function(wrapped)
        fields = compile_fields(memofill.policy(key).template, wrapped, ignore)
        values = Values(wrapped, codec)
        binding: _Binding

        lookup = _lookup_async if is_async else _lookup_sync

        def through_wrapt(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            return lookup(binding, instance, wrapped, args, kwargs, with_outcome=False)

        # A direct call: the function is read from the wrapper only on a miss, as it may
        # have been replaced after decoration (``__wrapped__`` is writable).
        def direct(self: Any, /, *args: Any, **kwargs: Any) -> Any:
            return lookup(binding, None, None, args, kwargs, with_outcome=False)

        def rebind(state: State) -> None:
            # One reference swapped: the calls above read it once, as one snapshot.
            nonlocal binding
            resolved = values.resolved
            decode = resolve_and_decode if resolved is None else resolved.decode
            with _swapping:
                binding = _Binding.build(
                    state,
                    key,
                    fields=fields,
                    is_async=is_async,
                    values=values,
                    decode=decode,
                    current_function=lambda: self.__wrapped__,
                )

        def resolve_and_decode(raw: bytes) -> Any:
            # The first hit of a function whose return annotation was a forward reference:
            # resolve it, and give later calls a snapshot that calls the codec directly.
            nonlocal binding
            decode = values.codec.decode
            with _swapping:  # not over a snapshot that a reconfiguration swapped in meanwhile
                binding = attrs.evolve(binding, decode=decode)
            return decode(raw)

        super().__init__(wrapped, through_wrapt)
        type(self).__call__ = direct  # type: ignore[method-assign,assignment]
        self._self_rebind = rebind
        self._self_snapshot = lambda: binding
        memofill._bind(self)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function through the cache.

        Replaced, in each decorated function's own class, by a function that
        closes over its binding: a direct call then skips wrapt's generic
        wrapper protocol (kept for bound methods) and every attribute read
        through the proxy, which together cost more than the rest of a hit.
        """
        raise NotImplementedError  # every instance's class defines its own

    @property
    def dataset(self) -> Dataset:
        """The registry entry this function is cached under."""
        return self._self_snapshot().dataset

    def _rebind(self, state: State) -> None:
        """Take ``state``, the instance's configuration now (the instance calls this)."""
        self._self_rebind(state)

    if TYPE_CHECKING:
        # What type checkers see of a method: the bound form keeps the helpers below.
        @overload
        def __get__(
            self: CachedDataset[Concatenate[_T, _P2], _R2],
            instance: _T,
            owner: type[_T] | None = None,
            /,
        ) -> _BoundCachedDataset[_P2, _R2]: ...
        @overload
        def __get__(
            self, instance: None, owner: type[Any] | None = None, /
        ) -> CachedDataset[P, R]: ...
        def __get__(self, instance: Any, owner: Any = None, /) -> Any: ...

    def redis_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The final Redis key a call with these arguments reads and fills."""
        instance = getattr(self, "_self_instance", None)
        return self._self_snapshot().key_of(instance, args, kwargs)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Delete the cached value for these arguments (awaitable for coroutine functions)."""
        binding = self._self_snapshot()
        instance = getattr(self, "_self_instance", None)
        key = binding.key_of(instance, args, kwargs)
        binding.local_store.invalidate((key,))
        commands = binding.gate() if binding.gated else binding.commands
        if commands is None or commands is BYPASS:
            return _done(None) if binding.is_async else None
        return commands.delete(key)

    def invalidate_dataset(self, *, soft: bool = False) -> Any:
        """Make every value of this function's dataset fetched until now unservable.

        As :meth:`memofill.Memofill.invalidate_dataset`, on this function's
        client; returns the new generation (awaitable for coroutine functions).
        """
        binding = self._self_snapshot()
        commands = binding.gate() if binding.gated else binding.commands
        if commands is None or commands is BYPASS:
            raise ConfigurationError("invalidate_dataset needs a Redis client: configure one")
        mark = mark_field(binding.key, soft)
        reply = commands.invalidate_dataset(binding.meta_key, mark)
        generations = binding.generations
        if not binding.is_async:
            generations.invalidated(binding.key, int(reply), soft)
            return int(reply)

        async def finish() -> int:
            seq = int(await reply)
            generations.invalidated(binding.key, seq, soft)
            return seq

        return finish()

    def call_with_outcome(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Call, returning a :class:`CallResult` (awaitable for coroutine functions)."""
        binding = self._self_snapshot()
        lookup = _lookup_async if binding.is_async else _lookup_sync
        instance = getattr(self, "_self_instance", None)
        return lookup(binding, instance, self.__wrapped__, args, kwargs, with_outcome=True)

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Fill again now, even over a value present, and return the new value.

        The fill is coordinated as a miss's is (it takes the lock; a caller that
        finds the lock held waits for that fill's value, not the one it
        replaces). Awaitable for coroutine functions.
        """
        binding = self._self_snapshot()
        refresh = _refresh_async if binding.is_async else _refresh_sync
        instance = getattr(self, "_self_instance", None)
        return refresh(binding, instance, self.__wrapped__, args, kwargs)


class _BoundCachedDataset(wrapt.BoundFunctionWrapper[P, R]):
    """A :class:`CachedDataset` method, bound: the same helpers, without ``self``."""

    if TYPE_CHECKING:

        def redis_key(self, *args: P.args, **kwargs: P.kwargs) -> str: ...
        def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...
        def invalidate_dataset(self, *, soft: bool = False) -> Any: ...
        def call_with_outcome(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...
        def refresh(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...

    else:
        invalidate = CachedDataset.invalidate
        invalidate_dataset = CachedDataset.invalidate_dataset
        refresh = CachedDataset.refresh
        call_with_outcome = CachedDataset.call_with_outcome
        redis_key = CachedDataset.redis_key

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_self_") and name != "_self_instance":
            return getattr(self._self_parent, name)
        return super().__getattr__(name)


CachedDataset.__bound_function_wrapper__ = _BoundCachedDataset  # type: ignore[misc]  # wrapt hook


async def _done(value: Any) -> Any:
    return value


def _hit(binding: _Binding, key: str, raw: bytes | None, started: float) -> Any:
    """The value of a plain hit, counted and kept for outages; :data:`_NOT_A_HIT` otherwise.

    The local copy is refreshed at most every :data:`~memofill.near.REFRESH_S`
    (the check :meth:`~memofill.near.LocalStore.remember` makes, without its call).
    """
    if raw is None:
        return _NOT_A_HIT
    value = _plain(binding, raw)
    if value is _NOT_A_HIT:
        return value
    binding.count_hit()
    store = binding.local_store
    kept = store.entries.get(key)
    if kept is None or kept.refresh_after <= started:
        store.put(key, raw, binding.ttl_s)
    return value


def _plain(binding: _Binding, raw: bytes) -> Any:
    """The value of stored bytes that are a plain fresh hit, else :data:`_NOT_A_HIT`.

    A value of a generation below its dataset's marks is none (see :class:`_LateRead`);
    nor, while there are marks, is a value without a header.
    """
    body = raw
    if raw[:2] == HEADED:
        late = binding.late
        try:
            if late is not None and late(raw):
                return _NOT_A_HIT  # stale, or due early: see _LateRead
            top = binding.marks.top
            if top and int(raw[SEQ], 16) < top:
                return _NOT_A_HIT  # fetched before a dataset invalidation: see _LateRead
        except ValueError:  # foreign bytes that only look like a header: a miss refills them
            return _NOT_A_HIT
        body = raw[HEADER_LEN:] if len(raw) < VIEW_FROM_BYTES else binding.view(raw)
    elif binding.marks.top:
        return _NOT_A_HIT  # a marker, or written before headers: sorted out on the miss path
    try:
        return binding.decode(body)
    except Exception:  # a marker, corrupt bytes, or another schema: sorted out on the miss path
        return _NOT_A_HIT


def _after_header(raw: bytes) -> bytes:
    return raw[HEADER_LEN:]


#: What :func:`_hit` returns for bytes that are not a plain value (``None`` is one).
_NOT_A_HIT: Any = object()


def _near_served(binding: _Binding, key: str, now: float) -> Any:
    """The near copy of ``key`` if the near rule serves it now, else :data:`_NOT_A_HIT`.

    Lock-free: one dict lookup and the rule's comparisons (read within
    ``near_ms`` and before the value expires, no flush since, the listener
    heard within two heartbeats, decoded as this function decodes).
    """
    near = binding.near
    assert near is not None  # called only for near bindings
    # The listener applies an invalidation before the answer to any later ping, and a flush
    # before anything after it: reading its word first, then the entry, a copy the listener
    # has just dropped can never be served on the strength of a later answer.
    live_until, epoch = near.live_until, near.epoch
    entry = near.entries.get(key)
    if (
        entry is None
        or not now < entry.near_until
        or entry.epoch != epoch
        or not now < live_until
        or entry.owner is not binding.near_owner
    ):
        return _NOT_A_HIT
    entry.visited = True
    binding.count_near()
    value = entry.value
    if value is NEGATIVE:
        return None
    if not binding.near_copy:
        return value
    return binding.decode(value[HEADER_LEN:] if value[:2] == HEADED else value)


def _near_read(
    binding: _Binding,
    key: str,
    reply: list[Any],
    started: float,
    reservation: tuple[object, int],
) -> Any:
    """:func:`_hit` for a read that reserved a near copy: the value, kept near if still valid.

    ``reply`` is ``[stored bytes, ms left]``. The copy is kept until
    ``started + near_ms``, or until the value expires in Redis, or until its
    header says it is no longer fresh, whichever is first (``started`` is
    before the read, so all three are conservative): whether a value is stale,
    and who refreshes it, is decided on reads of Redis, never on a copy. A
    negative marker is kept as well, within the first two bounds; an error
    marker never; a value that is not a plain fresh hit (stale, due early,
    corrupt) is not kept.
    """
    near = binding.near
    assert near is not None  # called only for near bindings
    raw, ms_left = reply
    until = started + binding.near_s
    if isinstance(ms_left, int) and ms_left >= 0:
        until = min(until, started + ms_left / 1000)
    if raw is None:
        near.abandon(key, reservation)
        return _NOT_A_HIT
    if raw == NEGATIVE_MARKER:
        owner, size = binding.near_owner, entry_bytes(key, raw)
        near.settle(key, reservation, NEGATIVE, owner, size, until, 0.0)  # never for outages
        return _NOT_A_HIT
    value = _plain(binding, raw)
    if value is _NOT_A_HIT:  # sorted out on the miss path, or served stale
        near.abandon(key, reservation)
        return _NOT_A_HIT
    header = read_header(raw)
    if header is not None:
        until = min(until, started + header.soft_until_ms / 1000 - wall_clock())
    binding.count_hit()
    # Kept for outages too: the same entry, so the value is not kept twice.
    kept = raw if binding.near_copy else value
    size = entry_bytes(key, raw)
    near.settle(key, reservation, kept, binding.near_owner, size, until, binding.ttl_s)
    return value


def _served_without_fill(
    binding: _Binding, key: str, asked: bool, raw: bytes | None, error: Exception | None
) -> CallResult | None:
    """A result that needs no fill, or ``None`` to fill.

    Redis not asked (breaker open, no client): the locally kept value, if any
    (see :func:`_outage_copy`).
    Bytes the codec cannot read may be a negative marker (a hit on ``None``), an
    error marker (the last fill failed: raise at once), or corruption or another
    schema (a miss that the fill overwrites). A failed ``GET`` is told to the breaker
    when Redis seems unreachable and serves the locally kept value when there is one;
    one refused by a full pool goes on to the fill, which waits for a connection.
    """
    codec = binding.values.codec
    if not asked or error is not None:
        if error is not None and is_unreachable(error):
            binding.breaker.failed(timed_out=is_timeout(error))
        value = _outage_copy(binding, key)
        if value is None or value is NEGATIVE or value is CORRUPT or isinstance(value, ErrorMarker):
            return None
        return _counted(binding, value, FALLBACK_HIT)
    if raw is None:
        return None
    special = decode_special(raw)
    if special is NEGATIVE:
        return _counted(binding, None, HIT)
    if isinstance(special, ErrorMarker):
        raise FillError(binding.key, key, special.error)
    why = "corrupt bytes"
    if codec is not JSON:
        why = f"bytes that {codec!r} cannot decode (written before a change of type?)"
    logger.warning(
        "%s under %s (%d bytes): treated as a miss",
        why,
        key,
        len(raw),
        extra={"dataset": binding.key, "redis_key": key},
    )
    return None


def _outage_copy(binding: _Binding, key: str) -> Any:
    """The value the outage rule serves for ``key``, or ``None``.

    Stored bytes are decoded afresh, so no two callers hold the same object;
    a near copy kept decoded is the object near hits share, and only for
    functions that decode alike. A value fetched before a dataset invalidation
    is none (near copies go when the marks change; a fill that straddled the
    change keeps its bytes here after it).
    """
    entry = binding.local_store.outage_entry(key)
    if entry is None:
        return None
    if entry.owner is None:
        kept = entry.value
        if kept is NEGATIVE:
            return None
        marks = binding.marks
        if marks.top:  # kept by a fill that began before an invalidation: never served
            header = read_header(kept)
            seq = None if header is None else header.seq
            if marks.behind(seq, binding.dataset.stale_s > 0) == EXPIRED:
                return None
        return decode_stored(binding.values.codec, kept)
    return entry.value if entry.owner is binding.values else None


def _counted(binding: _Binding, value: Any, name: str) -> CallResult:
    binding.counters.add(binding.key, name)
    return CallResult(value, name, False)


def _bypass(binding: _Binding, wrapped: Any, args: Any, kwargs: Any, with_outcome: bool) -> Any:
    """Caching is off: call the function, count the call as ``disabled``, log nothing.

    For a coroutine function this returns its coroutine, for the caller to await.
    """
    binding.counters.add(binding.key, DISABLED)
    function = binding.current_function() if wrapped is None else wrapped
    if not with_outcome:
        return function(*args, **kwargs)
    if binding.is_async:
        return _with_outcome_async(function(*args, **kwargs))
    return CallResult(function(*args, **kwargs), DISABLED, False)


async def _with_outcome_async(call: Any) -> CallResult:
    return CallResult(await call, DISABLED, False)


def _warn_no_client(binding: _Binding) -> None:
    """Once per process: a cached function ran with no Redis client, so nothing is shared."""
    if next(_no_client_calls):
        return
    function = binding.current_function()
    logger.warning(
        "%s (dataset %s) ran with no Redis client configured: values are kept only in this "
        "process, for at most 30 s, and every process calls the origin itself. Call "
        "memofill.configure(client=redis.Redis(...)) at start-up (this is logged once)",
        getattr(function, "__qualname__", function),
        binding.key,
        extra={"dataset": binding.key},
    )


def _fetcher(
    binding: _Binding, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], Any]:
    """The call of the origin with these arguments (``wrapped`` None: the function as it is now)."""
    function = binding.current_function() if wrapped is None else wrapped
    return lambda: function(*args, **kwargs)


def _plan(
    binding: _Binding, key: str, commands: Commands | None, error: Exception | None, **extra: Any
) -> Plan:
    """What a fill or a refresh of ``key`` needs; Redis usable unless the breaker is open or
    the ``GET`` failed to connect.

    A ``GET`` that Redis answered with an error (another type under the key,
    say) still leaves Redis usable: the lock path runs, and its write
    replaces the key. ``extra`` sets the :class:`Plan` fields of one kind of fill.
    """
    dataset = binding.dataset
    # A time-out alone is not proof (the breaker counts them): the lock path runs.
    unreachable = error is not None and is_unreachable(error) and not is_timeout(error)
    breaker_open = binding.breaker.is_open
    return Plan(
        dataset=dataset.key,
        redis_key=key,
        ttl_ms=max(1, round(dataset.ttl_s * 1000)),
        window_ms=round(dataset.window_s * 1000),
        negative_ttl_ms=round(dataset.negative_ttl_s * 1000),
        error_ttl_ms=round(dataset.error_ttl_s * 1000),
        # No client configured is the legacy set-up, not a lock error: nothing to coordinate.
        cache_fill=None if commands is None else dataset.cache_fill,
        redis_ok=commands is not None and not breaker_open and not unreachable,
        redis_error=None if error is None else type(error).__name__,
        block_limit_ms=None if commands is None else commands.socket_timeout_ms,
        codec=binding.values.codec,
        seq=binding.generations.seq,
        floor=binding.marks.top,
        **extra,
    )


def _sorted(binding: _Binding, key: str, raw: bytes) -> tuple[bytes | None, _LateRead | None]:
    """What bytes that were not a plain hit are, where they may be stale or behind a mark.

    Bytes with a header: a :class:`_LateRead` (stale, due early, or fetched before a
    dataset invalidation). Without one while the dataset has marks: a marker is
    left to the miss path, which serves it; a value written before headers is
    older than any invalidation, and a miss (``None``).
    """
    if raw[:2] == HEADED:
        return raw, _LateRead(binding, key, raw)
    if binding.marks.top and decode_special(raw) is CORRUPT:
        return None, None
    return raw, None


def _invalidated(kind: str, marks: Marks, raw: bytes, serves_stale: bool) -> str:
    """``kind`` (a :func:`~memofill.freshness.verdict`) as the dataset's marks amend it.

    Below a hard mark (or a soft one, without ``stale_s``) a value is expired
    whatever its clock says, and never served, not even on error; below a soft
    mark only, a value still fresh by the clock is stale, served while one refreshes.
    """
    try:
        seq: int | None = int(raw[SEQ], 16)
    except ValueError:
        seq = None
    behind = marks.behind(seq, serves_stale)
    if behind == EXPIRED:
        return EXPIRED
    if behind == STALE and kind == EARLY:
        return STALE
    return kind


class _LateRead:
    """A read whose header says it is not a plain fresh hit: stale, due early, or invalidated.

    A value below its dataset's hard mark (or a soft one, without ``stale_s``) is
    expired whatever its clock says; below a soft mark only, it is stale.

    ``result`` is what the caller gets at once (a hit, or a ``stale_hit``), when
    the value may be served; else ``stale`` holds the bytes a miss serves if its
    fill fails (within ``stale_if_error_s``), or ``None`` (a plain miss).
    """

    def __init__(self, binding: _Binding, key: str, raw: bytes) -> None:
        self.binding, self.key, self.raw = binding, key, raw
        dataset = binding.dataset
        self.now_ms = wall_clock() * 1000
        # The two header fields every late read needs (read_header's four cost a stale hit
        # a microsecond); the rest only if this read hands a refresh off.
        try:
            soft_until_ms, fetch_start_ms = int(raw[SOFT_UNTIL], 16), int(raw[FETCH_START], 16)
        except ValueError:
            soft_until_ms = fetch_start_ms = -1
        self.soft_until_ms, self.fetch_start_ms = soft_until_ms, fetch_start_ms
        if soft_until_ms < 0 or len(raw) < HEADER_LEN:
            kind = EXPIRED  # foreign bytes that only look like a header: a miss refills them
        else:
            stale_ms, if_error_ms = dataset.stale_s * 1000, dataset.stale_if_error_s * 1000
            kind = verdict(self.now_ms, soft_until_ms, stale_ms, if_error_ms)
            if binding.marks.top:  # its generation is read only once the dataset has a mark
                kind = _invalidated(kind, binding.marks, raw, stale_ms > 0)
        self.trigger = "early" if kind == EARLY else "stale"
        self.result: CallResult | None = None
        if kind in (EARLY, STALE):
            # Markers carry no header: these bytes are a value, read as a fresh hit reads one.
            body = raw[HEADER_LEN:] if len(raw) < VIEW_FROM_BYTES else binding.view(raw)
            try:
                value = binding.decode(body)
            except Exception:  # corrupt bytes, or another schema: a miss overwrites them
                pass
            else:
                name = HIT if kind == EARLY else STALE_HIT
                binding.counters.add(binding.key, name)
                self.result = CallResult(value, name, False)
        self.stale = raw if kind == STALE_IF_ERROR else None

    def hand_off(
        self, commands: Commands | None, wrapped: Any, args: Any, kwargs: Any
    ) -> _Refresh | None:
        """The refresh to run, unless one is in flight here or another process holds the lock."""
        refreshes = self.binding.refreshes
        if commands is None or not refreshes.claim(self.key, self.fetch_start_ms):
            return None
        header = read_header(self.raw)
        if header is None:  # fields past the two read are not hex: refreshed as a fill would
            header = Header(self.fetch_start_ms, self.soft_until_ms, 0, 0)
        stale_age_ms = self.now_ms - self.soft_until_ms
        fetch = _fetcher(self.binding, wrapped, args, kwargs)
        # What a tracer links the refresh to; copied only when one is listening.
        caller = contextvars.copy_context() if self.binding.metrics.events.arounds else None
        return _Refresh(
            self.binding, self.key, commands, fetch, self.trigger, header, stale_age_ms, caller
        )

    def after_inline(self, result: Result) -> CallResult:
        """What the caller that refreshed inline returns: the new value, when there is one."""
        assert self.result is not None  # only a served read hands a refresh off
        if result.outcome is Outcome.REFRESH_FILL:
            return CallResult(result.value, self.result.outcome, False)
        return self.result


class _Refresh:
    """One refresh of a value served stale (or early), run by a worker, a task or the caller."""

    def __init__(  # noqa: PLR0917  # one call site
        self,
        binding: _Binding,
        key: str,
        commands: Commands,
        fetch: Callable[[], Any],
        trigger: str,
        seen: Header,
        stale_age_ms: float,
        caller: contextvars.Context | None,
    ) -> None:
        self.binding, self.key, self.commands, self.fetch = binding, key, commands, fetch
        self.trigger, self.seen, self.stale_age_ms = trigger, seen, stale_age_ms
        #: The context of the caller that handed this refresh off, for the refresh's scope.
        self.caller = caller
        self.plan = _plan(binding, key, commands, None)

    def run_sync(self) -> Result:
        """Run the refresh with the blocking client, and record it."""
        started = time.monotonic()
        steps = refresh(self.plan, self.seen.fetch_start_ms)
        with self.binding.metrics.events.refresh_scope(self.binding.key, self.caller):
            try:
                result = run_sync(steps, self.commands, self.fetch, self.binding.breaker)
            except BaseException:
                self.binding.refreshes.done(self.key)
                raise
            return self._record(result, started)

    async def run_async(self) -> Result:
        """Run the refresh with the asyncio client, and record it."""
        started = time.monotonic()
        steps = refresh(self.plan, self.seen.fetch_start_ms)
        with self.binding.metrics.events.refresh_scope(self.binding.key, self.caller):
            try:
                result = await run_async(steps, self.commands, self.fetch, self.binding.breaker)
            except BaseException:  # cancelled: the refresh released its lock, token-safely
                self.binding.refreshes.done(self.key)
                raise
            return self._record(result, started)

    def _record(self, result: Result, started: float) -> Result:
        """Count and log the refresh, keep its value for outages, and set the busy memo."""
        binding, policy, outcome = self.binding, self.plan.cache_fill, result.outcome
        busy_s = 0.0
        if policy is not None and outcome is Outcome.REFRESH_ERROR:
            busy_s = policy.refresh_retry_ms / 1000  # the lock is held that long
        elif policy is not None and outcome in (Outcome.REFRESH_BUSY, Outcome.REFRESH_LOCK_ERROR):
            # Free by the end of a lease, or of a hold after a failure, whichever comes first.
            busy_s = min(policy.lease_ms, policy.refresh_retry_ms) / 1000
        binding.counters.add(binding.key, outcome.value)
        record = RefreshRecord(
            outcome=outcome,
            dataset=binding.key,
            redis_key=self.key,
            trigger=self.trigger,
            stale_age_ms=self.stale_age_ms,
            delta_ms=result.delta_ms,
            elapsed_ms=(time.monotonic() - started) * 1000,
            error=result.error,
        )
        record.emit()
        binding.metrics.refreshed(record)
        if outcome is Outcome.REFRESH_FILL and result.stored is not None:
            binding.local_store.put(self.key, result.stored, binding.ttl_s)
        if result.unstorable is not None:
            _warn_unstorable(binding, self.key, result)
        # Last: whoever waits for no refresh in flight then sees it counted and logged.
        binding.refreshes.done(self.key, busy_s, self.seen.fetch_start_ms)
        return result


class _Miss:
    """One caller's miss: the fill it runs or joins, and how it is logged.

    Everything here is shared by sync and asyncio callers; only the two lines
    that run the fill differ (:meth:`run_sync`, :meth:`run_async`).
    """

    def __init__(  # noqa: PLR0917  # one call site per lookup, the lookup's own locals
        self,
        binding: _Binding,
        key: str,
        started: float,
        commands: Commands | None,
        error: Exception | None,
        wrapped: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        refresh: bool = False,
        stale: bytes | None = None,
    ) -> None:
        self.binding, self.key, self.started, self.commands = binding, key, started, commands
        # ``wrapped`` is None for a direct call: the decorated function, as it is now.
        function = binding.current_function() if wrapped is None else wrapped
        #: How long this caller's call of the origin took, once it made one (see _timed).
        self.fetch_ms: float | None = None
        timer = _timed_async if binding.is_async else _timed
        self.fetch = timer(self, function, args, kwargs)
        if commands is None:
            _warn_no_client(binding)
        timed = binding.late is not None
        self.plan = _plan(
            binding,
            key,
            commands,
            error,
            refresh=refresh,
            stale=stale,
            # A value read under the key must be fresher than now to end this fill.
            fresh_after_ms=round(wall_clock() * 1000) if timed else 0,
            hold_on_error=timed and not refresh,
        )

    def run_sync(self) -> Result:
        """Run the fill with the blocking client, and record it."""
        steps = fill(self.plan, time.monotonic, _rng)
        with self.binding.metrics.events.fill_scope(self.binding.key):
            return self._record(run_sync(steps, self.commands, self.fetch, self._breaker()))

    async def run_async(self, on_fetch: Callable[[], object]) -> Result:
        """Run the fill with the asyncio client, and record it; ``on_fetch`` as in the driver."""
        steps = fill(self.plan, time.monotonic, _rng)
        breaker = self._breaker()
        with self.binding.metrics.events.fill_scope(self.binding.key):
            result = await run_async(steps, self.commands, self.fetch, breaker, on_fetch)
            return self._record(result)

    def _breaker(self) -> Breaker:
        return self.binding.breaker

    def _record(self, result: Result, joined: bool = False) -> Result:
        """Log and count one miss; a fill's own record also keeps the value for outages.

        The fill is recorded where it runs: an asyncio caller that started it may
        be cancelled while it runs on, and the fill, which called the origin, must
        still be logged exactly once.
        """
        binding = self.binding
        outcome = Outcome.LOCAL_JOIN if joined else result.outcome
        binding.counters.add(binding.key, outcome.value)
        told = binding.told_permission
        if binding.key not in told and refused_by_acl(result.outcome, result.error):
            told.add(binding.key)
            logger.error(
                "Redis refused memofill a command or key for dataset %s (NoPermissionError): "
                "its misses are not coordinated across processes until the ACL user may run "
                "them; grant it: %s",
                binding.key,
                acl_rule(binding.prefix),
                extra={"dataset": binding.key, "redis_key": self.key},
            )
        record = MissRecord(
            outcome=outcome,
            dataset=binding.key,
            redis_key=self.key,
            elapsed_ms=(time.monotonic() - self.started) * 1000,
            waited_ms=result.waited_ms,
            polls=0 if joined else result.polls,
            payload_bytes=result.payload_bytes,
            error=result.error,
            fetch_ms=self.fetch_ms,
        )
        record.emit()
        binding.metrics.miss(record)
        if joined:
            return result
        if result.stored is not None:
            binding.local_store.put(self.key, result.stored, binding.ttl_s)
        elif result.led and binding.near is not None:
            # This fill wrote a marker, or nothing: a near copy of the key is not the answer now.
            binding.local_store.invalidate((self.key,))
        if result.unstorable is not None:
            _warn_unstorable(binding, self.key, result)
        return result

    def finish(self, result: Result, joined: bool) -> CallResult:
        """This caller's result: a joiner is logged as one; the value, or raise.

        A joiner gets its own copy, decoded from the bytes the fill stored, so
        that no caller can change what another holds; a value that could not be
        stored is the one object every joiner shares.
        """
        if joined:
            self._record(result, joined=True)
        value = result.unwrap()
        if joined and result.stored is not None:
            copy = decode_stored(self.binding.values.codec, result.stored)
            value = value if copy is CORRUPT else copy
        outcome = Outcome.LOCAL_JOIN if joined else result.outcome
        return CallResult(value, outcome.value, result.led and not joined)


def _timed(
    miss: _Miss, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], Any]:
    """The fetch, ``function(*args, **kwargs)``: its time is kept in ``miss.fetch_ms``."""

    def fetch() -> Any:
        started = time.monotonic()
        try:
            return function(*args, **kwargs)
        finally:
            miss.fetch_ms = (time.monotonic() - started) * 1000

    return fetch


def _timed_async(
    miss: _Miss, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], Any]:
    """:func:`_timed` for a coroutine function: the time until its awaitable is done."""

    async def fetch() -> Any:
        started = time.monotonic()
        try:
            return await function(*args, **kwargs)
        finally:
            miss.fetch_ms = (time.monotonic() - started) * 1000

    return fetch


def _warn_unstorable(binding: _Binding, key: str, result: Result) -> None:
    """Say once per dataset and instance that its values are never stored, and how to fix it."""
    warned = binding.unstorable_warned
    if binding.key in warned:
        return
    warned.add(binding.key)
    logger.warning(
        "dataset %s: a %s value cannot be stored (%s), so every call fetches; annotate the "
        "function's return type, pass codec= to cached_dataset, or return JSON data",
        binding.key,
        type(result.value).__qualname__,
        result.unstorable,
        extra={"dataset": binding.key, "redis_key": key, "unstorable": result.unstorable},
    )


def _lookup_sync(
    binding: _Binding, instance: Any, wrapped: Any, args: Any, kwargs: Any, *, with_outcome: bool
) -> Any:
    """One call of a sync function: a ``GET`` and a decode on a hit, else the coordinated fill.

    ``instance`` is the bound method's ``self`` (``None`` for a function), and
    ``wrapped`` the function to call on a miss (``None``: the one decorated).
    Returns the value, or its :class:`CallResult` when ``with_outcome``.
    :func:`_lookup_async` differs only where it awaits; every decision is in
    the helpers both call.
    """
    if binding.gated:
        commands = binding.gate()
        if commands is BYPASS:
            return _bypass(binding, wrapped, args, kwargs, with_outcome)
    else:
        commands = binding.commands
    started = time.monotonic()
    key = binding.key_of(instance, args, kwargs)
    if started >= binding.generations.next_check and commands is not None:
        _read_generations_sync(binding, commands, started)
    near = binding.near
    if near is not None:
        value = _near_served(binding, key, started)
        if value is not _NOT_A_HIT:
            return CallResult(value, NEAR_HIT, False) if with_outcome else value
    breaker = binding.breaker
    asked, raw, error = False, None, None
    if commands is not None and not (breaker.open_until and breaker.is_open):
        asked = True
        reservation = None if near is None else near.reserve(key)
        try:
            if reservation is None:
                raw = commands.get(key)
            else:
                reply = commands.read_near(key)
                raw = reply[0]
        except Exception as exc:  # any failure of the client, as in the coordinator
            error = exc
            if reservation is not None:
                binding.local_store.abandon(key, reservation)
        else:
            if reservation is None:
                value = _hit(binding, key, raw, started)
            else:
                value = _near_read(binding, key, reply, started, reservation)
            if value is not _NOT_A_HIT:
                return CallResult(value, HIT, False) if with_outcome else value
    stale, late = None, None
    if raw is not None and (binding.late is not None or binding.marks.top):
        raw, late = _sorted(binding, key, raw)
    if late is not None:
        if late.result is not None:
            now = late.result
            job = late.hand_off(commands, wrapped, args, kwargs)
            if job is not None and binding.refreshes.inline:
                now = late.after_inline(job.run_sync())
            elif job is not None and not binding.refreshes.submit(key, job.run_sync):
                binding.counters.add(binding.key, Outcome.REFRESH_DROPPED.value)
                binding.metrics.refresh_counted(
                    binding.key, job.trigger, Outcome.REFRESH_DROPPED.value
                )
            return now if with_outcome else now.value
        stale, raw = late.stale, None
    served = _served_without_fill(binding, key, asked, raw, error)
    if served is None:
        miss = _Miss(binding, key, started, commands, error, wrapped, args, kwargs, stale=stale)
        served = miss.finish(*binding.thread_flights.run(_flight(binding, key), miss.run_sync))
    return served if with_outcome else served.value


async def _lookup_async(
    binding: _Binding, instance: Any, wrapped: Any, args: Any, kwargs: Any, *, with_outcome: bool
) -> Any:
    """:func:`_lookup_sync` for coroutine functions, on the asyncio client."""
    if binding.gated:
        commands = binding.gate()
        if commands is BYPASS:
            return await _bypass(binding, wrapped, args, kwargs, with_outcome)
    else:
        commands = binding.commands
    started = time.monotonic()
    key = binding.key_of(instance, args, kwargs)
    first_read = None
    if started >= binding.generations.next_check and commands is not None:
        if binding.generations.known:
            await _read_generations_async(binding, commands, started)
        else:  # sent beside this caller's GET, and awaited before the value is judged
            first_read = _first_read_async(binding, commands, started)
    near = binding.near
    if near is not None:
        value = _near_served(binding, key, started)
        if value is not _NOT_A_HIT:
            return CallResult(value, NEAR_HIT, False) if with_outcome else value
    breaker = binding.breaker
    asked, raw, error = False, None, None
    if commands is not None and not (breaker.open_until and breaker.is_open):
        asked = True
        reservation = None if near is None else near.reserve(key)
        try:
            if reservation is None:
                raw = await commands.get(key)
            else:
                reply = await commands.read_near(key)
                raw = reply[0]
        except Exception as exc:  # any failure of the client, as in the coordinator
            error = exc
            if reservation is not None:
                binding.local_store.abandon(key, reservation)
        else:
            if first_read is not None:
                await asyncio.shield(first_read)
                first_read = None
            if reservation is None:
                value = _hit(binding, key, raw, started)
            else:
                value = _near_read(binding, key, reply, started, reservation)
            if value is not _NOT_A_HIT:
                return CallResult(value, HIT, False) if with_outcome else value
    if first_read is not None:
        await asyncio.shield(first_read)
    stale, late = None, None
    if raw is not None and (binding.late is not None or binding.marks.top):
        raw, late = _sorted(binding, key, raw)
    if late is not None:
        if late.result is not None:
            now = late.result
            job = late.hand_off(commands, wrapped, args, kwargs)
            if job is not None and binding.refreshes.inline:
                now = late.after_inline(await job.run_async())
            elif job is not None:
                binding.refreshes.spawn(job.run_async())
            return now if with_outcome else now.value
        stale, raw = late.stale, None
    served = _served_without_fill(binding, key, asked, raw, error)
    if served is None:
        _raise_if_cancel_was_lost()
        miss = _Miss(binding, key, started, commands, error, wrapped, args, kwargs, stale=stale)
        flight = _flight(binding, key)
        served = miss.finish(*await binding.task_flights.run(flight, miss.run_async))
    return served if with_outcome else served.value


def _read_generations_sync(binding: _Binding, commands: Commands, now: float) -> None:
    """Read the dataset generations again, once for all concurrent callers.

    The first time, every blocking caller waits for that one read, so that no
    call is served before the process knows the marks; later, one caller reads
    and the others go on with the marks known (at most ``meta_check_ms`` old).
    """
    generations = binding.generations
    if generations.known:
        if generations.claim(now):
            generations.loaded(_meta_or_none(binding, commands), now)
        return
    with generations.first:
        if not generations.known:
            generations.loaded(_meta_or_none(binding, commands), now)


def _meta_or_none(binding: _Binding, commands: Commands) -> Any:
    if binding.breaker.is_open:
        return None
    try:
        return commands.read_meta(binding.meta_key)
    except Exception:  # read again after meta_check_ms; the GET will tell the breaker
        return None


async def _read_generations_async(binding: _Binding, commands: Commands, now: float) -> None:
    """:func:`_read_generations_sync` for asyncio callers, once the process knows the marks.

    One caller reads the hash again; the others go on with the marks known.
    """
    generations = binding.generations
    if generations.claim(now) and not binding.breaker.is_open:
        generations.loaded(await _meta_or_none_async(binding, commands), now)


def _first_read_async(binding: _Binding, commands: Commands, now: float) -> asyncio.Task[None]:
    """The process's first read of the generations on this event loop, one task for its callers.

    Each caller sends its own ``GET`` meanwhile and awaits the task (shielded:
    a cancelled caller leaves it to the others) before it judges the value, so
    the first calls cost no round trip more than a ``GET``. Reaching the fill
    no later than without it matters: on Python 3.10 a caller cancelled while
    a reply is on its way may not see the cancellation (redis-py drops it).
    """
    generations = binding.generations
    loop = asyncio.get_running_loop()
    task: asyncio.Task[None] | None = generations.first_reads.get(loop)
    if task is None:
        task = generations.first_reads[loop] = loop.create_task(_first_read(binding, commands, now))
    return task


async def _first_read(binding: _Binding, commands: Commands, now: float) -> None:
    generations = binding.generations
    try:
        generations.loaded(await _meta_or_none_async(binding, commands), now)
    finally:
        generations.first_reads.pop(asyncio.get_running_loop(), None)


async def _meta_or_none_async(binding: _Binding, commands: Commands) -> Any:
    if binding.breaker.is_open:
        return None
    try:
        return await commands.read_meta(binding.meta_key)
    except Exception:  # read again after meta_check_ms; the GET will tell the breaker
        return None


def _refresh_sync(binding: _Binding, instance: Any, wrapped: Any, args: Any, kwargs: Any) -> Any:
    """:meth:`CachedDataset.refresh` of a sync function: the miss's fill, told not to reuse."""
    commands = binding.gate() if binding.gated else binding.commands
    if commands is BYPASS:
        return _bypass(binding, wrapped, args, kwargs, False)
    started = time.monotonic()
    key = binding.key_of(instance, args, kwargs)
    miss = _Miss(binding, key, started, commands, None, wrapped, args, kwargs, refresh=True)
    # Not joined with a plain miss in flight, which may end with the value it found.
    result, joined = binding.thread_flights.run(_REFRESH + key, miss.run_sync)
    return miss.finish(result, joined).value


async def _refresh_async(
    binding: _Binding, instance: Any, wrapped: Any, args: Any, kwargs: Any
) -> Any:
    """:func:`_refresh_sync` for coroutine functions, on the asyncio client."""
    commands = binding.gate() if binding.gated else binding.commands
    if commands is BYPASS:
        return await _bypass(binding, wrapped, args, kwargs, False)
    started = time.monotonic()
    key = binding.key_of(instance, args, kwargs)
    miss = _Miss(binding, key, started, commands, None, wrapped, args, kwargs, refresh=True)
    result, joined = await binding.task_flights.run(_REFRESH + key, miss.run_async)
    return miss.finish(result, joined).value


def _flight(binding: _Binding, key: str) -> str:
    """The process-local flight a miss of ``key`` joins: one per generation of the dataset.

    A caller that knows of a dataset invalidation must not join a fill that
    began before it, whose value it would then be served.
    """
    top = binding.marks.top
    return f"{key}\0{top}" if top else key


#: Prefixes a refresh's key in the process-local flights, apart from the misses'.
_REFRESH = "refresh\0"


def _raise_if_cancel_was_lost() -> None:
    """Raise the cancellation a Redis reply swallowed, before a miss joins a fill.

    redis-py's asyncio client, cancelled while the reply of its command is
    already waiting (a busy event loop), returns the reply and drops the
    ``CancelledError``; the task is still marked as being cancelled. The caller
    would then join the fill and wait for it, so an ``asyncio.timeout`` or
    ``wait_for`` around the call would not end when it should. Checked on the
    miss path only (a hit returns at once anyway), from Python 3.11, which
    counts cancellation requests. A miss made while the task handles its own
    cancellation (in an ``except CancelledError`` block) is refused the same way.
    """
    task = asyncio.current_task()
    if task is not None and sys.version_info >= (3, 11) and task.cancelling():
        raise asyncio.CancelledError
