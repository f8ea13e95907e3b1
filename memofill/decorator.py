"""``@cached_dataset``: resolve the policy and compile the key once, then serve hits inline.

Everything that can be decided when a function is decorated is decided then:
the dataset's policy (an unknown key fails at import time, not at the first
call), how each key field is read from the call's arguments, and whether the
function is sync or a coroutine function. A call then costs one ``GET`` and
one decode on a hit; only a miss enters :mod:`memofill.coordinator`.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, overload

import attrs
import wrapt

from memofill.codec import NEGATIVE, DecodeError, ErrorMarker, decode, decode_special
from memofill.commands import Commands, is_unreachable
from memofill.coordinator import Plan, Result, fill, run_async, run_sync
from memofill.errors import ConfigurationError, FillError, KeyTemplateError
from memofill.fallback import Breaker, LocalStore
from memofill.keys import FieldText, KeyTemplate
from memofill.outcomes import DISABLED, FALLBACK_HIT, HIT, Counters, MissRecord, Outcome
from memofill.policy import Dataset
from memofill.singleflight import TaskFlights, ThreadFlights

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


def compile_fields(template: KeyTemplate, function: Callable[..., Any]) -> tuple[_Field, ...]:
    """Where each key field comes from in a call of ``function``; fails if one is no parameter."""
    parameters = inspect.signature(function).parameters
    positional = [
        name
        for name, p in parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    fields = []
    for name in template.fields:
        parameter = parameters.get(name)
        if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise KeyTemplateError(
                f"key {template.source!r}: field {{{name}}} is not a named parameter of "
                f"{function.__qualname__}{inspect.signature(function)}"
            )
        position = positional.index(name) if name in positional else None
        fields.append(_Field(name, position, parameter.default))
    return tuple(fields)


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
    than a wrapt proxy's, and the hit path reads them on every call.
    """

    key: str
    is_async: bool
    #: The decorated function as it is now (``__wrapped__`` may be replaced after decoration).
    current_function: Callable[[], Callable[..., Any]]
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
    counters: Counters
    local_store: LocalStore
    breaker: Breaker
    thread_flights: ThreadFlights[Result]
    task_flights: TaskFlights[Result]

    @classmethod
    def build(
        cls,
        state: State,
        key: str,
        fields: tuple[_Field, ...],
        is_async: bool,
        current_function: Callable[[], Callable[..., Any]],
    ) -> _Binding:
        """The snapshot of ``state`` (the instance's configuration) for one function."""
        dataset = state.policy(key)
        try:
            commands, misconfigured = state.commands_for(is_async), None
        except ConfigurationError as exc:
            commands, misconfigured = None, str(exc)
        return cls(
            key=key,
            is_async=is_async,
            current_function=current_function,
            dataset=dataset,
            key_of=compile_key(state.prefix, dataset.template, fields, key),
            count_hit=state.counters.hit_tally(key).add,
            ttl_s=dataset.ttl_s,
            commands=commands,
            gated=misconfigured is not None or state.disabled or open_blocks > 0,
            misconfigured=misconfigured,
            disabled=state.disabled,
            counters=state.counters,
            local_store=state.local_store,
            breaker=state.breaker,
            thread_flights=state.thread_flights,
            task_flights=state.task_flights,
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


class CachedDataset(wrapt.FunctionWrapper[P, R]):
    """The callable ``@cached_dataset`` returns: the function, cached per its dataset policy.

    Besides being called, it offers :meth:`invalidate`, :meth:`refresh` and
    :meth:`call_with_outcome`.
    """

    #: The calls' snapshot of the configuration now (see :class:`_Binding`).
    _self_snapshot: Callable[[], _Binding]
    _self_rebind: Callable[[State], None]

    def __new__(cls, wrapped: Callable[P, R], memofill: Memofill, key: str) -> CachedDataset[P, R]:
        # Each decorated function gets a class of its own, so that __init__ can give it a
        # __call__ that closes over the function's binding (see __call__).
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        own: Any = type(cls.__name__, (cls,), namespace)
        return super().__new__(own)

    def __init__(self, wrapped: Callable[P, R], memofill: Memofill, key: str) -> None:
        is_async = inspect.iscoroutinefunction(wrapped)
        fields = compile_fields(memofill.policy(key).template, wrapped)
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
            binding = _Binding.build(state, key, fields, is_async, lambda: self.__wrapped__)

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
        binding.local_store.discard(key)
        commands = binding.gate() if binding.gated else binding.commands
        if commands is None or commands is BYPASS:
            return _done(None) if binding.is_async else None
        return commands.delete(key)

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
        def call_with_outcome(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...
        def refresh(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...

    else:
        invalidate = CachedDataset.invalidate
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

    The local copy is refreshed at most every :data:`~memofill.fallback.REFRESH_S`
    (the check :meth:`~memofill.fallback.LocalStore.remember` makes, without its call).
    """
    if raw is None:
        return _NOT_A_HIT
    try:
        value = decode(raw)
    except DecodeError:
        return _NOT_A_HIT
    binding.count_hit()
    store = binding.local_store
    kept = store.entries.get(key)
    if kept is None or kept[2] <= started:
        store.put(key, value, binding.ttl_s)
    return value


#: What :func:`_hit` returns for bytes that are not a plain value (``None`` is one).
_NOT_A_HIT: Any = object()


def _served_without_fill(
    binding: _Binding, key: str, asked: bool, raw: bytes | None, error: Exception | None
) -> CallResult | None:
    """A result that needs no fill, or ``None`` to fill.

    Redis not asked (breaker open, no client): the locally kept value, if any.
    Bytes that are not JSON may be a negative marker (a hit on ``None``), an
    error marker (the last fill failed: raise at once), or corruption (a miss
    that the fill overwrites). A failed ``GET`` trips the breaker when Redis is
    unreachable and serves the locally kept value when there is one.
    """
    if not asked or error is not None:
        if error is not None and is_unreachable(error):
            binding.breaker.trip()
        value = binding.local_store.get(key, None)
        return None if value is None else _counted(binding, value, FALLBACK_HIT)
    if raw is None:
        return None
    special = decode_special(raw)
    if special is NEGATIVE:
        return _counted(binding, None, HIT)
    if isinstance(special, ErrorMarker):
        raise FillError(binding.key, key, special.error)
    logger.warning(
        "corrupt bytes under %s (%d bytes): treated as a miss",
        key,
        len(raw),
        extra={"dataset": binding.key, "redis_key": key},
    )
    return None


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
    ) -> None:
        self.binding, self.key, self.started, self.commands = binding, key, started, commands
        # ``wrapped`` is None for a direct call: the decorated function, as it is now.
        function = binding.current_function() if wrapped is None else wrapped
        self.fetch: Callable[[], Any] = lambda: function(*args, **kwargs)
        if commands is None:
            _warn_no_client(binding)
        self.plan = self._plan(error, refresh)

    def _plan(self, error: Exception | None, refresh: bool) -> Plan:
        """Redis is usable unless the breaker is open or the ``GET`` failed to connect.

        A ``GET`` that Redis answered with an error (another type under the key,
        say) still leaves Redis usable: the lock path runs, and its write
        replaces the key.
        """
        dataset, commands = self.binding.dataset, self.commands
        unreachable = error is not None and is_unreachable(error)
        breaker_open = self.binding.breaker.is_open
        return Plan(
            dataset=dataset.key,
            redis_key=self.key,
            ttl_ms=max(1, round(dataset.ttl_s * 1000)),
            negative_ttl_ms=round(dataset.negative_ttl_s * 1000),
            # No client configured is the legacy set-up, not a lock error: nothing to coordinate.
            cache_fill=None if commands is None else dataset.cache_fill,
            redis_ok=commands is not None and not breaker_open and not unreachable,
            redis_error=None if error is None else type(error).__name__,
            block_limit_ms=None if commands is None else commands.socket_timeout_ms,
            refresh=refresh,
        )

    def run_sync(self) -> Result:
        """Run the fill with the blocking client, and record it."""
        steps = fill(self.plan, time.monotonic, _rng)
        return self._record(run_sync(steps, self.commands, self.fetch, self._breaker()))

    async def run_async(self) -> Result:
        """Run the fill with the asyncio client, and record it."""
        steps = fill(self.plan, time.monotonic, _rng)
        return self._record(await run_async(steps, self.commands, self.fetch, self._breaker()))

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
        MissRecord(
            outcome=outcome,
            dataset=binding.key,
            redis_key=self.key,
            elapsed_ms=(time.monotonic() - self.started) * 1000,
            waited_ms=result.waited_ms,
            polls=0 if joined else result.polls,
            payload_bytes=result.payload_bytes,
            error=result.error,
        ).emit()
        if not joined and result.exception is None and result.value is not None:
            binding.local_store.put(self.key, result.value, binding.ttl_s)
        return result

    def finish(self, result: Result, joined: bool) -> CallResult:
        """This caller's result: a joiner is logged as one; the value, or raise."""
        if joined:
            self._record(result, joined=True)
        outcome = Outcome.LOCAL_JOIN if joined else result.outcome
        return CallResult(result.unwrap(), outcome.value, result.led and not joined)


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
    breaker = binding.breaker
    asked, raw, error = False, None, None
    if commands is not None and not (breaker.open_until and breaker.is_open):
        asked = True
        try:
            raw = commands.get(key)
        except Exception as exc:  # any failure of the client, as in the coordinator
            error = exc
        else:
            value = _hit(binding, key, raw, started)
            if value is not _NOT_A_HIT:
                return CallResult(value, HIT, False) if with_outcome else value
    served = _served_without_fill(binding, key, asked, raw, error)
    if served is None:
        miss = _Miss(binding, key, started, commands, error, wrapped, args, kwargs)
        served = miss.finish(*binding.thread_flights.run(key, miss.run_sync))
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
    breaker = binding.breaker
    asked, raw, error = False, None, None
    if commands is not None and not (breaker.open_until and breaker.is_open):
        asked = True
        try:
            raw = await commands.get(key)
        except Exception as exc:  # any failure of the client, as in the coordinator
            error = exc
        else:
            value = _hit(binding, key, raw, started)
            if value is not _NOT_A_HIT:
                return CallResult(value, HIT, False) if with_outcome else value
    served = _served_without_fill(binding, key, asked, raw, error)
    if served is None:
        miss = _Miss(binding, key, started, commands, error, wrapped, args, kwargs)
        served = miss.finish(*await binding.task_flights.run(key, miss.run_async))
    return served if with_outcome else served.value


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


#: Prefixes a refresh's key in the process-local flights, apart from the misses'.
_REFRESH = "refresh\0"
