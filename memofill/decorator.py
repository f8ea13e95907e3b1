"""``@cached_dataset``: resolve the policy and compile the key once, then serve hits inline.

Everything that can be decided when a function is decorated is decided then:
the dataset's policy (an unknown key fails at import time, not at the first
call), how each key field is read from the call's arguments, and whether the
function is sync or a coroutine function. A call then costs one ``GET`` and
one decode on a hit; only a miss enters :mod:`memofill.coordinator`.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import wrapt

from memofill.codec import NEGATIVE, DecodeError, ErrorMarker, decode, decode_special
from memofill.commands import REDIS_ERRORS, Commands, is_unreachable
from memofill.coordinator import Plan, Result, fill, run_async, run_sync
from memofill.errors import FillError, KeyTemplateError
from memofill.keys import KeyTemplate, format_argument
from memofill.outcomes import FALLBACK_HIT, HIT, MissRecord, Outcome
from memofill.policy import Dataset

if TYPE_CHECKING:
    from memofill.instance import Memofill

logger = logging.getLogger("memofill")
_NO_DEFAULT: Any = inspect.Parameter.empty
_rng = random.Random()
#: What a lookup returns before it is unpacked: value, outcome name, whether this caller led.
Looked = tuple[Any, str, bool]


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


class CachedDataset(wrapt.FunctionWrapper[..., Any]):
    """The callable ``@cached_dataset`` returns: the function, cached per its dataset policy.

    Besides being called, it offers :meth:`invalidate` and :meth:`call_with_outcome`.
    """

    def __init__(self, wrapped: Callable[..., Any], memofill: Memofill, key: str) -> None:
        is_async = inspect.iscoroutinefunction(wrapped)

        def call_sync(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            return _lookup_sync(self, wrapped, instance, args, kwargs)[0]

        async def call_async(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            return (await _lookup_async(self, wrapped, instance, args, kwargs))[0]

        super().__init__(wrapped, call_async if is_async else call_sync)
        self._self_memofill = memofill
        self._self_is_async = is_async
        self._self_key = key
        self._self_dataset: Dataset = memofill.policy(key)
        self._self_template = self._self_dataset.template
        self._self_fields = compile_fields(self._self_template, wrapped)
        memofill._bind(self)

    @property
    def dataset(self) -> Dataset:
        """The registry entry this function is cached under."""
        return self._self_dataset

    def _rebind(self) -> None:
        self._self_dataset = self._self_memofill.policy(self._self_key)

    def redis_key(self, *args: Any, **kwargs: Any) -> str:
        """The final Redis key a call with these arguments reads and fills."""
        return _redis_key(self, getattr(self, "_self_instance", None), args, kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        """Delete the cached value for these arguments (awaitable for coroutine functions)."""
        key = _redis_key(self, getattr(self, "_self_instance", None), args, kwargs)
        memofill = self._self_memofill
        memofill.local_store.discard(key)
        commands = memofill.commands_for(self._self_is_async)
        if commands is None:
            return _done(None) if self._self_is_async else None
        return commands.delete(key)

    def call_with_outcome(self, *args: Any, **kwargs: Any) -> Any:
        """Call, returning a :class:`CallResult` (awaitable for coroutine functions)."""
        instance = getattr(self, "_self_instance", None)
        if self._self_is_async:
            return _with_outcome(_lookup_async(self, self.__wrapped__, instance, args, kwargs))
        return CallResult(*_lookup_sync(self, self.__wrapped__, instance, args, kwargs))


class _BoundCachedDataset(wrapt.BoundFunctionWrapper[..., Any]):
    invalidate = CachedDataset.invalidate
    call_with_outcome = CachedDataset.call_with_outcome
    redis_key = CachedDataset.redis_key

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_self_") and name != "_self_instance":
            return getattr(self._self_parent, name)
        return super().__getattr__(name)


CachedDataset.__bound_function_wrapper__ = _BoundCachedDataset  # type: ignore[misc]  # wrapt hook


async def _done(value: Any) -> Any:
    return value


async def _with_outcome(lookup: Any) -> CallResult:
    return CallResult(*await lookup)


def _redis_key(binding: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    fields = binding._self_fields
    prefix = binding._self_memofill.prefix
    if not fields:
        return prefix + binding._self_key  # type: ignore[no-any-return]
    shift = 0 if instance is None else 1
    values = {}
    for field in fields:
        position = field.position
        if position is not None and position - shift < len(args) and position - shift >= 0:
            value = args[position - shift]
        elif field.name in kwargs:
            value = kwargs[field.name]
        elif field.default is not _NO_DEFAULT:
            value = field.default
        else:
            raise TypeError(f"missing argument {field.name!r} for key {binding._self_key!r}")
        values[field.name] = format_argument(field.name, value)
    template = binding._self_template
    return prefix + "".join(  # type: ignore[no-any-return]
        values[part] if index % 2 else part for index, part in enumerate(template.parts)
    )


def _found(binding: Any, key: str, raw: bytes) -> tuple[bool, Any]:
    """Interpret bytes that are not plain JSON: a negative hit, an error marker, or corruption."""
    special = decode_special(raw)
    if special is NEGATIVE:
        return True, None
    if isinstance(special, ErrorMarker):
        raise FillError(binding._self_dataset.key, key, special.error)
    logger.warning(
        "corrupt bytes under %s (%d bytes): treated as a miss",
        key,
        len(raw),
        extra={"dataset": binding._self_dataset.key, "redis_key": key},
    )
    return False, None


def _plan(
    binding: Any, key: str, commands: Commands | None, redis_ok: bool, read_error: str | None
) -> Plan:
    dataset: Dataset = binding._self_dataset
    return Plan(
        dataset=dataset.key,
        redis_key=key,
        ttl_ms=max(1, round(dataset.ttl_s * 1000)),
        negative_ttl_ms=round(dataset.negative_ttl_s * 1000),
        # No client configured is the legacy set-up, not a lock error: nothing to coordinate on.
        cache_fill=None if commands is None else dataset.cache_fill,
        redis_ok=redis_ok,
        redis_error=read_error,
        block_limit_ms=None if commands is None else commands.socket_timeout_ms,
    )


def _record(binding: Any, key: str, started: float, result: Result, joined: bool) -> None:
    """Log and count one miss; the fill's own record also remembers the value for outages."""
    memofill = binding._self_memofill
    dataset = binding._self_dataset
    outcome = Outcome.LOCAL_JOIN if joined else result.outcome
    memofill.counters.add(dataset.key, outcome.value)
    MissRecord(
        outcome=outcome,
        dataset=dataset.key,
        redis_key=key,
        elapsed_ms=(time.monotonic() - started) * 1000,
        waited_ms=result.waited_ms,
        polls=0 if joined else result.polls,
        payload_bytes=result.payload_bytes,
        error=result.error,
    ).emit()
    if not joined and result.exception is None and result.value is not None:
        memofill.local_store.put(key, result.value, dataset.ttl_s)


def _finish(binding: Any, key: str, started: float, result: Result, joined: bool) -> Looked:
    """Log a caller that joined another's fill; return the value or raise.

    The fill itself was recorded where it ran (see ``run`` in the lookups): an
    asyncio caller that started it may be cancelled while it runs on, and the
    fill, which called the origin, must still be logged exactly once.
    """
    if joined:
        _record(binding, key, started, result, joined=True)
    outcome = Outcome.LOCAL_JOIN if joined else result.outcome
    return result.unwrap(), outcome.value, result.led and not joined


def _hit(binding: Any, key: str, value: Any, name: str = HIT) -> Looked:
    memofill = binding._self_memofill
    memofill.counters.add(binding._self_dataset.key, name)
    if name == HIT and value is not None:
        memofill.local_store.put(key, value, binding._self_dataset.ttl_s)
    return value, name, False


def _on_read_error(binding: Any, key: str, exc: Exception) -> Looked | None:
    memofill = binding._self_memofill
    if is_unreachable(exc):
        memofill.breaker.trip()
    value = memofill.local_store.get(key, None)
    return None if value is None else _hit(binding, key, value, FALLBACK_HIT)


def _lookup_sync(binding: Any, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Looked:
    started = time.monotonic()
    key = _redis_key(binding, instance, args, kwargs)
    memofill = binding._self_memofill
    commands = memofill.commands_for(False)
    redis_ok = commands is not None and not memofill.breaker.is_open
    read_error = None
    if redis_ok:
        try:
            raw = commands.get(key)
        except REDIS_ERRORS as exc:
            # Unreachable: skip Redis for this miss. Answered with an error (another type
            # under the key, say): the lock path still runs, and its write replaces it.
            redis_ok, read_error = not is_unreachable(exc), type(exc).__name__
            served = _on_read_error(binding, key, exc)
            if served is not None:
                return served
        else:
            if raw is not None:
                try:
                    return _hit(binding, key, decode(raw))
                except DecodeError:
                    found, value = _found(binding, key, raw)
                    if found:
                        return _hit(binding, key, value)
    elif (value := memofill.local_store.get(key, None)) is not None:
        return _hit(binding, key, value, FALLBACK_HIT)
    plan = _plan(binding, key, commands, redis_ok, read_error)

    def run() -> Result:
        result = run_sync(
            fill(plan, time.monotonic, _rng),
            commands,
            lambda: wrapped(*args, **kwargs),
            memofill.breaker,
        )
        _record(binding, key, started, result, joined=False)
        return result

    result, joined = memofill.thread_flights.run(key, run)
    return _finish(binding, key, started, result, joined)


async def _lookup_async(
    binding: Any, wrapped: Any, instance: Any, args: Any, kwargs: Any
) -> Looked:
    started = time.monotonic()
    key = _redis_key(binding, instance, args, kwargs)
    memofill = binding._self_memofill
    commands = memofill.commands_for(True)
    redis_ok = commands is not None and not memofill.breaker.is_open
    read_error = None
    if redis_ok:
        try:
            raw = await commands.get(key)
        except REDIS_ERRORS as exc:
            # Unreachable: skip Redis for this miss. Answered with an error (another type
            # under the key, say): the lock path still runs, and its write replaces it.
            redis_ok, read_error = not is_unreachable(exc), type(exc).__name__
            served = _on_read_error(binding, key, exc)
            if served is not None:
                return served
        else:
            if raw is not None:
                try:
                    return _hit(binding, key, decode(raw))
                except DecodeError:
                    found, value = _found(binding, key, raw)
                    if found:
                        return _hit(binding, key, value)
    elif (value := memofill.local_store.get(key, None)) is not None:
        return _hit(binding, key, value, FALLBACK_HIT)
    plan = _plan(binding, key, commands, redis_ok, read_error)

    async def run() -> Result:
        result = await run_async(
            fill(plan, time.monotonic, _rng),
            commands,
            lambda: wrapped(*args, **kwargs),
            memofill.breaker,
        )
        _record(binding, key, started, result, joined=False)
        return result

    result, joined = await memofill.task_flights.run(key, run)
    return _finish(binding, key, started, result, joined)
