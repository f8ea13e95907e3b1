"""``@cached_dataset``'s face: the callable it returns, and that callable's helpers.

Rules:

- Everything that can be decided when a function is decorated is decided then:
  the dataset's policy (an unknown key fails at import time, not at the first
  call), how each key field is read from the call's arguments
  (:mod:`memofill.arguments`), and whether the function is sync or a coroutine
  function. A call then costs one ``GET`` and one decode on a hit
  (:mod:`memofill.lookup`); only a miss enters :mod:`memofill.misses`.
- Each decorated function is an instance of a class of its own, whose ``__call__``
  closes over the function's :class:`~memofill.snapshot.Snapshot`: a direct call skips
  wrapt's generic wrapper protocol and every attribute read through its proxy, which
  together cost about 0.5 µs, more than the rest of a hit's own work. The price is one
  small class per decorated function (a few hundred bytes); bound methods keep wrapt's
  protocol.
- This module knows its instance only as an :class:`~memofill.snapshot.Owner`: it
  never imports :mod:`memofill.instance`.
- Types cost nothing at run time. A helper that returns an awaitable for a coroutine
  function (``invalidate``, ``invalidate_dataset``, ``call_with_outcome``) has two
  ``typing.overload`` signatures on this one class, chosen by the function's return type:
  ``Coroutine[Any, Any, T]`` (an ``async def``) gets a coroutine of the helper's result,
  so a forgotten ``await`` is a type error; anything else gets the result itself. No
  second class for coroutine functions, no wrapper: both kinds run the same code.
  ``refresh`` needs no overload: it returns what a call returns, ``R``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, overload

import attrs
import wrapt

from memofill.arguments import compile_fields, compile_shape, is_coroutine_function
from memofill.bulk import many_async, many_sync
from memofill.errors import ConfigurationError
from memofill.generations import invalidate_dataset
from memofill.lookup import lookup_async, lookup_sync
from memofill.misses import refresh_async, refresh_sync
from memofill.outcomes import CallResult
from memofill.policy import Dataset
from memofill.snapshot import BYPASS, Owner, Snapshot, State, swapping
from memofill.values import Codec, Values

__all__ = ["CachedDataset", "CallResult"]

P = ParamSpec("P")
R = TypeVar("R")
#: The value a coroutine function's coroutine gives (``R`` is then ``Coroutine[Any, Any, T]``).
T = TypeVar("T")
_P2 = ParamSpec("_P2")
_R2 = TypeVar("_R2")
_T = TypeVar("_T")


class CachedDataset(wrapt.FunctionWrapper[P, R]):
    """The callable ``@cached_dataset`` returns: the function, cached per its dataset policy.

    Besides being called, it offers :meth:`invalidate`, :meth:`invalidate_dataset`,
    :meth:`refresh`, :meth:`call_with_outcome` and :meth:`many`.
    """

    #: The calls' snapshot of the configuration now (see :class:`Snapshot`).
    _self_snapshot: Callable[[], Snapshot]
    _self_rebind: Callable[[State], None]

    def __new__(
        cls,
        wrapped: Callable[P, R],
        memofill: Owner,
        key: str,
        ignore: Iterable[str] = (),
        codec: Codec | None = None,
    ) -> CachedDataset[P, R]:
        # Each decorated function gets a class of its own, so that __init__ can give it a
        # __call__ that closes over the function's snapshot (see __call__).
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        own: Any = type(cls.__name__, (cls,), namespace)
        return super().__new__(own)

    def __init__(
        self,
        wrapped: Callable[P, R],
        memofill: Owner,
        key: str,
        ignore: Iterable[str] = (),
        codec: Codec | None = None,
    ) -> None:
        is_async = is_coroutine_function(wrapped)
        fields = compile_fields(memofill.policy(key).template, wrapped, ignore)
        shape = compile_shape(wrapped)
        values = Values(wrapped, codec)
        snapshot: Snapshot

        lookup = lookup_async if is_async else lookup_sync

        def through_wrapt(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            return lookup(snapshot, instance, wrapped, args, kwargs, with_outcome=False)

        # A direct call: the function is read from the wrapper only on a miss, as it may
        # have been replaced after decoration (``__wrapped__`` is writable).
        def direct(self: Any, /, *args: Any, **kwargs: Any) -> Any:
            return lookup(snapshot, None, None, args, kwargs, with_outcome=False)

        def rebind(state: State) -> None:
            # One reference swapped: the calls above read it once, as one snapshot.
            nonlocal snapshot
            resolved = values.resolved
            decode = resolve_and_decode if resolved is None else resolved.decode
            with swapping:
                snapshot = Snapshot.build(
                    state,
                    key,
                    fields=fields,
                    shape=shape,
                    is_async=is_async,
                    values=values,
                    decode=decode,
                    current_function=lambda: self.__wrapped__,
                )

        def resolve_and_decode(raw: bytes) -> Any:
            # The first hit of a function whose return annotation was a forward reference:
            # resolve it, and give later calls a snapshot that calls the codec directly.
            nonlocal snapshot
            decode = values.codec.decode
            with swapping:  # not over a snapshot that a reconfiguration swapped in meanwhile
                snapshot = attrs.evolve(snapshot, decode=decode)
            return decode(raw)

        super().__init__(wrapped, through_wrapt)
        type(self).__call__ = direct  # type: ignore[method-assign,assignment]
        self._self_rebind = rebind
        self._self_snapshot = lambda: snapshot
        #: The batch function ``many()`` fills its misses with (``@fn.batch``), if any.
        self._self_batch: Callable[..., Any] | None = None
        memofill._bind(self)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function through the cache.

        Replaced, in each decorated function's own class, by a function that
        closes over its snapshot: a direct call then skips wrapt's generic
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

    # Each helper below has an async signature, then a plain one (see the module's rules).
    # They overlap only for a plain function annotated to return a coroutine, which is
    # served as a plain function: the type checker is then told of an awaitable.
    @overload
    def invalidate(  # type: ignore[overload-overlap]
        self: CachedDataset[P, Coroutine[Any, Any, Any]], *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, int | None]: ...
    @overload
    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> int | None: ...
    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Delete the cached value for these arguments (awaitable for coroutine functions).

        Returns how many values it deleted (0 or 1), or ``None`` when there is
        no Redis to delete from (no client, or caching is disabled).

        Leaves a tomb with Redis's clock beside the key, so that a fill whose
        fetch began before this call never writes its value after it
        (``STORE_SCRIPT``). This process's near and outage
        copies go before the ``DEL`` and again after it: a read in flight meanwhile
        keeps nothing; and a call that starts afterwards joins no fill in flight here.
        """
        snapshot = self._self_snapshot()
        instance = getattr(self, "_self_instance", None)
        key = snapshot.key_of(instance, args, kwargs)
        forget(snapshot, key)
        commands = snapshot.gate() if snapshot.gated else snapshot.commands
        if commands is None or commands is BYPASS:
            return _done(None) if snapshot.is_async else None
        reply = commands.delete(key)
        if snapshot.is_async:
            return _forgotten(snapshot, key, reply)
        return forget(snapshot, key, reply)

    @overload
    def invalidate_dataset(  # type: ignore[overload-overlap]
        self: CachedDataset[P, Coroutine[Any, Any, Any]], *, soft: bool = False
    ) -> Coroutine[Any, Any, int]: ...
    @overload
    def invalidate_dataset(self, *, soft: bool = False) -> int: ...
    def invalidate_dataset(self, *, soft: bool = False) -> Any:
        """Make every value of this function's dataset fetched until now unservable.

        As :meth:`memofill.Memofill.invalidate_dataset`, on this function's
        client; returns the mark (Redis's clock, µs), awaitable for coroutine functions.
        """
        snapshot = self._self_snapshot()
        commands = snapshot.gate() if snapshot.gated else snapshot.commands
        if commands is None or commands is BYPASS:
            raise ConfigurationError("invalidate_dataset needs a Redis client: configure one")
        return invalidate_dataset(
            commands, snapshot.meta_key, snapshot.generations, snapshot.key, soft
        )

    @overload
    def call_with_outcome(  # type: ignore[overload-overlap]
        self: CachedDataset[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, CallResult[T]]: ...
    @overload
    def call_with_outcome(self, *args: P.args, **kwargs: P.kwargs) -> CallResult[R]: ...
    def call_with_outcome(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Call, returning a :class:`CallResult` (awaitable for coroutine functions)."""
        snapshot = self._self_snapshot()
        lookup = lookup_async if snapshot.is_async else lookup_sync
        instance = getattr(self, "_self_instance", None)
        return lookup(snapshot, instance, self.__wrapped__, args, kwargs, with_outcome=True)

    @overload
    def many(  # type: ignore[overload-overlap]
        self: CachedDataset[P, Coroutine[Any, Any, T]], items: Iterable[Any]
    ) -> Coroutine[Any, Any, list[T]]: ...
    @overload
    def many(self, items: Iterable[Any]) -> list[R]: ...
    def many(self, items: Iterable[Any]) -> Any:
        """Call once per item, reading every key in one round trip; the values, in order.

        ``items``: for a key with one field, that field's values; for any key,
        mappings of keyword arguments. Hits cost one ``MGET`` in all; each key
        that is not a plain hit goes on as a single call's would (its fill
        coordinated across the fleet), once per key however often it is asked.
        Awaitable for coroutine functions. See :doc:`bulk`.
        """
        snapshot = self._self_snapshot()
        bulk = many_async if snapshot.is_async else many_sync
        instance = getattr(self, "_self_instance", None)
        return bulk(snapshot, instance, self.__wrapped__, items, self._self_batch)

    def batch(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """Register the function that fetches many items in one call; returns it unchanged.

        :meth:`many` then calls it once with the items whose keys it leads, in
        the form they were given, and takes their values, a list in that order
        (a method's batch is given ``self`` first). One per cached function; a
        coroutine function takes a coroutine function. See :doc:`bulk`.
        """
        name = getattr(self.__wrapped__, "__qualname__", repr(self.__wrapped__))
        if self._self_batch is not None:
            raise ConfigurationError(
                f"{name} already has a batch function "
                f"({getattr(self._self_batch, '__qualname__', self._self_batch)}): one per "
                "cached function"
            )
        if not callable(function):
            raise TypeError(f"{name}.batch takes a function, not {type(function).__name__}")
        is_async = self._self_snapshot().is_async
        if is_coroutine_function(function) != is_async:
            kind = "a coroutine function" if is_async else "a plain function"
            raise TypeError(
                f"{name}.batch: {getattr(function, '__qualname__', function)} must be {kind}, "
                f"as {name} is"
            )
        _takes_a_list(name, function)
        self._self_batch = function
        return function

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Fill again now, even over a value present, and return the new value.

        The fill is coordinated as a miss's is (it takes the lock; a caller that
        finds the lock held waits for that fill's value, not the one it
        replaces). Returns what a call returns: for a coroutine function, a
        coroutine of the value, to await.
        """
        snapshot = self._self_snapshot()
        refresh: Callable[..., Any] = refresh_async if snapshot.is_async else refresh_sync
        instance = getattr(self, "_self_instance", None)
        # R: the value, or for a coroutine function refresh_async's coroutine of it.
        result: R = refresh(snapshot, instance, self.__wrapped__, args, kwargs)
        return result


class _BoundCachedDataset(wrapt.BoundFunctionWrapper[P, R]):
    """A :class:`CachedDataset` method, bound: the same helpers, without ``self``."""

    if TYPE_CHECKING:

        def redis_key(self, *args: P.args, **kwargs: P.kwargs) -> str: ...
        @overload
        def invalidate(  # type: ignore[overload-overlap]
            self: _BoundCachedDataset[P, Coroutine[Any, Any, Any]],
            *args: P.args,
            **kwargs: P.kwargs,
        ) -> Coroutine[Any, Any, int | None]: ...
        @overload
        def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> int | None: ...
        def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...
        @overload
        def invalidate_dataset(  # type: ignore[overload-overlap]
            self: _BoundCachedDataset[P, Coroutine[Any, Any, Any]], *, soft: bool = False
        ) -> Coroutine[Any, Any, int]: ...
        @overload
        def invalidate_dataset(self, *, soft: bool = False) -> int: ...
        def invalidate_dataset(self, *, soft: bool = False) -> Any: ...
        @overload
        def call_with_outcome(  # type: ignore[overload-overlap]
            self: _BoundCachedDataset[P, Coroutine[Any, Any, T]],
            *args: P.args,
            **kwargs: P.kwargs,
        ) -> Coroutine[Any, Any, CallResult[T]]: ...
        @overload
        def call_with_outcome(self, *args: P.args, **kwargs: P.kwargs) -> CallResult[R]: ...
        def call_with_outcome(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...
        def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R: ...
        @overload
        def many(  # type: ignore[overload-overlap]
            self: _BoundCachedDataset[P, Coroutine[Any, Any, T]], items: Iterable[Any]
        ) -> Coroutine[Any, Any, list[T]]: ...
        @overload
        def many(self, items: Iterable[Any]) -> list[R]: ...
        def many(self, items: Iterable[Any]) -> Any: ...

    else:
        invalidate = CachedDataset.invalidate
        invalidate_dataset = CachedDataset.invalidate_dataset
        refresh = CachedDataset.refresh
        call_with_outcome = CachedDataset.call_with_outcome
        redis_key = CachedDataset.redis_key
        many = CachedDataset.many

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_self_") and name != "_self_instance":
            return getattr(self._self_parent, name)
        return super().__getattr__(name)


CachedDataset.__bound_function_wrapper__ = _BoundCachedDataset  # type: ignore[misc]  # wrapt hook


def _takes_a_list(name: str, function: Callable[..., Any]) -> None:
    """Refuse a batch whose signature cannot take the list of items (a method's: after ``self``)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: let its call tell
        return
    each: tuple[tuple[Any, ...], ...] = (([],), (None, []))
    for arguments in each:
        try:
            signature.bind(*arguments)
        except TypeError:
            continue
        return
    raise TypeError(
        f"{name}.batch: {getattr(function, '__qualname__', function)}{signature} cannot take "
        "the list of items as its one argument (after self, for a method)"
    )


async def _done(value: Any) -> Any:
    return value


def forget(snapshot: Snapshot, key: str, reply: Any = None) -> int:
    """Drop this process's copies of ``key``, and part later misses from fills in flight.

    ``reply`` is the invalidation's (:meth:`~memofill.commands.Commands.delete`):
    its tomb's time in Redis, which fills that take no lock stamp after from now
    on, and how many values it deleted, which is returned.
    """
    snapshot.generations.local += 1
    snapshot.local_store.invalidate((key,))
    if reply is None:
        return 0
    tomb, deleted = reply
    snapshot.generations.heard_clock(int(tomb))
    return int(deleted)


async def _forgotten(snapshot: Snapshot, key: str, reply: Any) -> int:
    return forget(snapshot, key, await reply)
