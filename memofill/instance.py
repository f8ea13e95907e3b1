"""``Memofill``: one configured cache (clients, prefix, policies), and the module-level default.

Tests and multi-tenant applications create their own instances; most
applications use the default through :func:`configure` and
:func:`cached_dataset` (:func:`default_instance` hands it out). Decorating
needs only the policies, so functions can be decorated at import time and the
clients configured later, at start-up.

The configuration in force is one immutable :class:`State`; configuring
builds a new one and swaps it in, and every decorated function swaps its own
snapshot of it, under one lock. A call reads its function's snapshot once, so
it sees the old configuration or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

import attrs

from memofill.commands import Commands
from memofill.decorator import CachedDataset
from memofill.errors import ConfigurationError, UnknownDatasetError
from memofill.fallback import Breaker
from memofill.generations import DEFAULT_CHECK_MS, Generations, invalidate_dataset
from memofill.generations import invalidate_tag as tag_invalidation
from memofill.hooks import Events
from memofill.keys import lock_key, meta_key, parse_template, prefix_problem, tags_key
from memofill.listener import follow
from memofill.metrics import Metrics
from memofill.near import MAX_LOCAL_BYTES, MAX_LOCAL_ENTRIES, LocalStore, NearCache
from memofill.outcomes import Counters
from memofill.policy import Dataset, PolicySource, tag_index
from memofill.project import resolve_policies
from memofill.refreshing import REFRESH_MODES, Refreshes, RefreshMode
from memofill.scripts import TOMB_MS
from memofill.singleflight import TaskFlights, ThreadFlights
from memofill.snapshot import State, configuring, when_switched
from memofill.steps import Result
from memofill.tags import TagIndex
from memofill.values import Codec

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("memofill")

#: Set to ``1`` (or ``true``, ``yes``, ``on``) to switch caching off in this process; read
#: when an instance is made and at every ``configure()``.
DISABLED_ENV = "MEMOFILL_DISABLED"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

#: Every instance, so that opening the first ``disabled()`` block can gate their functions.
_instances: weakref.WeakSet[Memofill] = weakref.WeakSet()


class _NoClient:
    def __repr__(self) -> str:
        return "memofill.NO_CLIENT"


#: Pass as ``client=`` (or ``async_client=``) to remove the blocking (or asyncio) client.
NO_CLIENT: Any = _NoClient()


def _is_async_client(client: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(client, "execute_command", None))


def _disabled_by_environment() -> bool:
    value = os.environ.get(DISABLED_ENV, "").strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ConfigurationError(
        f"{DISABLED_ENV}={os.environ[DISABLED_ENV]!r}: use 1 to switch caching off, 0 or unset "
        "to keep it on"
    )


def _refreshes(mode: object, workers: object) -> Refreshes:
    """New refreshes run as ``mode`` says with ``workers`` threads, once both are checked."""
    if mode not in REFRESH_MODES:
        raise ConfigurationError(
            f"refresh={mode!r}: use 'background' (a pool or a task refreshes stale values) or "
            "'inline' (the caller that finds one refreshes it itself)"
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigurationError(f"refresh_workers={workers!r}: must be an int >= 1")
    mode_checked: RefreshMode = "inline" if mode == "inline" else "background"
    return Refreshes(mode_checked, workers)


def _fresh(
    breaker_cooldown_s: float,
    local_store_bytes: int,
    *,
    near: NearCache | None,
    meta_check_s: float,
    events: Events,
    refreshes: Refreshes | None = None,
) -> dict[str, Any]:
    """What calls accumulate, new: counts, values kept near and for outages, the breaker, fills."""
    refreshes = Refreshes() if refreshes is None else Refreshes(refreshes.mode, refreshes.workers)
    entries = MAX_LOCAL_ENTRIES
    if near is not None:
        entries = entries if near.max_entries is None else near.max_entries
        local_store_bytes = local_store_bytes if near.max_bytes is None else near.max_bytes
    store = LocalStore(max_entries=entries, max_bytes=local_store_bytes)
    generations = Generations(meta_check_s)
    # No copy of an invalidated dataset is served, near or in an outage: the store does not
    # know which dataset a key is of, and invalidations are rare, so every copy goes.
    generations.on_change = store.clear
    generations.on_tag_change = store.drop_tagged
    return {
        "refreshes": refreshes,
        "counters": Counters(),
        "generations": generations,
        "local_store": store,
        "metrics": Metrics(events),
        "breaker": Breaker(breaker_cooldown_s),
        "thread_flights": ThreadFlights(),
        "task_flights": TaskFlights(),
        "unstorable_warned": set(),
        "told_permission": set(),
    }


class Memofill:
    """A cache on one Redis (or Redis Cluster) with its own prefix, policies and counters.

    Without a Redis client, nothing is shared between processes: each process
    coalesces its own concurrent callers, keeps values it fetched for at most
    30 s (the store it serves from during an outage), and calls the origin
    again after that; the first such call logs one WARNING that names the
    function. Configure a client (:meth:`configure`) at start-up.

    Args:
        client: a ``redis.Redis``, ``redis.cluster.RedisCluster`` or ``redis.asyncio``
            client, or ``None`` for no Redis (see above).
        async_client: an asyncio client for coroutine functions, when ``client``
            is a blocking one (both may be given).
        prefix: prepended to every key, so deployments sharing a Redis never share
            a value or a lock. Braces only as one complete hash tag (``"{app}:"``); no ``#``.
        policies: the generated module, its dotted name, a mapping of key to
            :class:`~memofill.Dataset`, or the registry's list of datasets; validated
            when loaded. ``None``: ``$MEMOFILL_POLICIES``, else ``out`` in
            ``[tool.memofill]`` of the nearest pyproject.toml, else
            ``gen.cache_fill_registry`` (:mod:`memofill.project`).
        breaker_cooldown_s: after Redis fails to answer, how long calls skip it.
        local_store_bytes: the most bytes of values this process keeps to serve
            while Redis is unreachable (:data:`~memofill.near.MAX_LOCAL_BYTES`,
            32 MiB, by default; the oldest are dropped first).
        refresh: how a stale value (``stale_s``) is refreshed while callers are served
            it: ``"background"`` (default: a bounded thread pool for blocking
            functions, a task for coroutine functions) or ``"inline"`` (the caller
            that wins the refresh lock refreshes before it returns, for hosts that
            freeze a process after its response).
        refresh_workers: the background pool's threads (made on first use, per process).
        near: how copies of datasets with ``near_ms`` are kept in this process
            (:class:`~memofill.NearCache`; its ``max_entries`` and ``max_bytes``
            bound the one local store, near and outage copies together).
            ``None``: no near copies, every call reads Redis. See :doc:`near-cache`.
        meta_check_ms: how often, at most, this process reads the dataset generations
            again (:meth:`invalidate_dataset` by another process reaches it within this;
            within milliseconds where a near-cache listener runs). 0 reads them for
            every call, a round trip more each.

    ``MEMOFILL_DISABLED=1`` in the environment switches caching off: calls go
    straight to the function, counted as ``disabled``.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        async_client: Any = None,
        prefix: str = "",
        policies: PolicySource | None = None,
        breaker_cooldown_s: float = 1.0,
        local_store_bytes: int = MAX_LOCAL_BYTES,
        refresh: RefreshMode = "background",
        refresh_workers: int = 4,
        near: NearCache | None = NearCache(),  # noqa: B008  # frozen: one shared default is safe
        meta_check_ms: int = DEFAULT_CHECK_MS,
    ) -> None:
        if near is not None and not isinstance(near, NearCache):
            raise ConfigurationError(f"near={near!r}: must be a memofill.NearCache or None")
        if (
            isinstance(meta_check_ms, bool)
            or not isinstance(meta_check_ms, int)
            or not (0 <= meta_check_ms <= 3_600_000)
        ):
            raise ConfigurationError(
                f"meta_check_ms={meta_check_ms!r}: must be an int of ms in 0..3600000"
            )
        if isinstance(local_store_bytes, bool) or not isinstance(local_store_bytes, int):
            raise ConfigurationError(
                f"local_store_bytes={local_store_bytes!r}: must be an int (bytes), such as 32 << 20"
            )
        if local_store_bytes < 0:
            raise ConfigurationError(
                f"local_store_bytes={local_store_bytes}: must be >= 0 (0 keeps nothing)"
            )
        self._bindings: weakref.WeakSet[CachedDataset[..., Any]] = weakref.WeakSet()
        #: The policies the tag index was built from, and the index (built on first use).
        self._tags: tuple[dict[str, Dataset], TagIndex] | None = None
        self._state = State(
            sync=None,
            asynchronous=None,
            prefix="",
            policy_source=policies,
            policies=None,
            disabled=False,
            near=near,
            **_fresh(
                breaker_cooldown_s,
                local_store_bytes,
                near=near,
                meta_check_s=meta_check_ms / 1000,
                events=Events(),
                refreshes=_refreshes(refresh, refresh_workers),
            ),
        )
        self.configure(client, async_client=async_client, prefix=prefix)
        _instances.add(self)

    @property
    def prefix(self) -> str:
        """The prefix in force (see ``prefix`` above)."""
        return self._state.prefix

    @property
    def near(self) -> NearCache | None:
        """How near copies are kept (``None``: never); see :class:`~memofill.NearCache`."""
        return self._state.near

    @property
    def counters(self) -> Counters:
        """Hits and miss outcomes per dataset, counted in this process."""
        return self._state.counters

    @property
    def metrics(self) -> Metrics:
        """Histograms of misses and refreshes, and refresh counts, in this process."""
        return self._state.metrics

    @property
    def events(self) -> Events:
        """The hooks called with every miss and refresh record (never a hit)."""
        return self._state.metrics.events

    @property
    def local_store(self) -> LocalStore:
        """Values this process recently read or wrote, served while Redis is unreachable."""
        return self._state.local_store

    @property
    def breaker(self) -> Breaker:
        """Skips Redis for a short cool-down after it failed to answer."""
        return self._state.breaker

    @property
    def refreshes(self) -> Refreshes:
        """Refreshes of stale values in flight in this process, and how they are run."""
        return self._state.refreshes

    @property
    def thread_flights(self) -> ThreadFlights[Result]:
        """Fills in flight in this process, for blocking callers."""
        return self._state.thread_flights

    @property
    def task_flights(self) -> TaskFlights[Result]:
        """Fills in flight in this process, for asyncio callers."""
        return self._state.task_flights

    @property
    def unstorable_warned(self) -> set[str]:
        """Datasets whose values could not be stored, each reported once by a WARNING."""
        return self._state.unstorable_warned

    @property
    def _sync(self) -> Commands | None:
        """The blocking client's commands (tests look at them)."""
        return self._state.sync

    @property
    def _async(self) -> Commands | None:
        """The asyncio client's commands (tests look at them)."""
        return self._state.asynchronous

    def configure(
        self,
        client: Any = None,
        *,
        async_client: Any = None,
        prefix: str | None = None,
        policies: PolicySource | None = None,
        refresh: RefreshMode | None = None,
        refresh_workers: int | None = None,
        near: NearCache | None = None,
    ) -> None:
        """Change what is given, keep the rest; decorated functions follow.

        A client replaces the client of its kind (blocking or asyncio), whichever
        argument it comes in; :data:`NO_CLIENT` removes one. ``None`` leaves a
        setting as it is (so ``near`` changes how near copies are kept, and
        cannot switch them off: ``Memofill(near=None)`` does).
        ``MEMOFILL_DISABLED`` is read again. Inside
        :meth:`override`, what the override set is kept (a test's fake Redis
        survives an application's own ``configure()`` at start-up). Everything
        is checked before anything changes: a configuration that is refused
        leaves the instance as it was.
        """
        with configuring:
            state = self._composed(client, async_client, prefix, policies, near)
            if refresh is not None or refresh_workers is not None:
                old = state.refreshes
                refreshes = _refreshes(
                    old.mode if refresh is None else refresh,
                    old.workers if refresh_workers is None else refresh_workers,
                )
                state = attrs.evolve(state, refreshes=refreshes)
                old.shutdown()
            self._swap(state)

    def _composed(
        self,
        client: Any,
        async_client: Any,
        prefix: str | None,
        policies: PolicySource | None,
        near: NearCache | None = None,
        *,
        state: State | None = None,
        held: frozenset[str] = frozenset(),
    ) -> State:
        """``state`` (the one in force) with what is given, checked; what is ``held`` is kept."""
        state = self._state if state is None else state
        if prefix is not None:
            problem = prefix_problem(prefix)
            if problem:
                raise ConfigurationError(f"prefix {prefix!r}: {problem}")
        # A refusal is told again under a new client, which may have other rights.
        changes: dict[str, Any] = {"disabled": _disabled_by_environment(), "told_permission": set()}
        if client is NO_CLIENT:
            changes["sync"] = None
        if async_client is NO_CLIENT:
            changes["asynchronous"] = None
        given = [c for c in (client, async_client) if c is not None and c is not NO_CLIENT]
        sync = [c for c in given if not _is_async_client(c)]
        asynchronous = [c for c in given if _is_async_client(c)]
        if len(sync) > 1 or len(asynchronous) > 1:
            raise ConfigurationError("give at most one blocking and one asyncio Redis client")
        if sync:
            changes["sync"] = Commands(sync[0])
        if asynchronous:
            changes["asynchronous"] = Commands(asynchronous[0])
        if prefix is not None:
            changes["prefix"] = prefix
        if near is not None:
            if not isinstance(near, NearCache):
                raise ConfigurationError(f"near={near!r}: must be a memofill.NearCache")
            changes["near"] = near
        if policies is not None:
            loaded = resolve_policies(policies)
            missing = sorted({binding.dataset.key for binding in self._bindings} - loaded.keys())
            if missing:
                raise UnknownDatasetError(
                    f"the new policies lack datasets that decorated functions use: {missing}"
                )
            changes["policy_source"], changes["policies"] = policies, loaded
        kept = {name: value for name, value in changes.items() if name not in state.held}
        return attrs.evolve(state, held=state.held | held, **kept)

    def _swap(self, state: State) -> None:
        """Put ``state`` in force, then give every decorated function its snapshot of it."""
        if self._bindings and state.policies is None:
            state = attrs.evolve(state, policies=resolve_policies(state.policy_source))
        self._state = state
        for binding in list(self._bindings):
            binding._rebind(state)  # decorated functions compile the prefix into their keys
        state.breaker.reset()
        self._follow()

    @property
    def policies(self) -> dict[str, Dataset]:
        """Every loaded dataset policy by registry key (loaded on first use).

        Raises :class:`~memofill.errors.ConfigurationError` listing every place
        looked at when they cannot be loaded.
        """
        policies = self._state.policies
        if policies is None:
            with configuring:
                state = self._state
                if state.policies is None:
                    state = attrs.evolve(state, policies=resolve_policies(state.policy_source))
                    self._state = state
                policies = state.policies
                assert policies is not None  # just loaded
        return policies

    def policy(self, key: str) -> Dataset:
        """The policy of ``key``.

        Raises :class:`~memofill.errors.UnknownDatasetError` when no dataset declares it.
        """
        self.policies  # noqa: B018  # loaded first
        return self._state.policy(key)

    def commands_for(self, is_async: bool) -> Commands | None:
        """The commands of the client that serves sync or coroutine functions."""
        return self._state.commands_for(is_async)

    def cached_dataset(
        self, key: str, *, ignore: Iterable[str] = (), codec: Codec | None = None
    ) -> Callable[[Callable[P, R]], CachedDataset[P, R]]:
        """Decorate a fetch function so its results are cached under dataset ``key``.

        The key must see every argument: each parameter of the function (a
        method's ``self`` or ``cls`` aside) is a ``{field}`` of the registry key
        or named in ``ignore`` (a tuple of parameter names, for arguments that
        never change the result, such as a database session). Key fields take
        ``str``, ``int``, ``bool``, ``None``, enums, ``UUID``, ``date``,
        ``datetime`` and ``Decimal``, each value by one exact text
        (:ref:`key-fields`); other values raise
        :class:`~memofill.errors.KeyArgumentError` at call time.

        The policy is resolved, and the key template checked against the
        function's parameters and their annotations, right now: a mistake
        fails at import time with :class:`~memofill.errors.KeyTemplateError`.
        Values round-trip as the function's return annotation says (see
        :mod:`memofill.values`); ``codec`` replaces that with your own encoding:
        any object with ``encode(value) -> bytes`` and ``decode(bytes) -> value``.
        """
        self.policy(key)
        if codec is not None and not isinstance(codec, Codec):
            raise TypeError(
                f"codec={codec!r} needs encode(value) -> bytes and decode(bytes) -> value methods"
            )

        def decorate(function: Callable[P, R]) -> CachedDataset[P, R]:
            with configuring:  # not while the instance is reconfigured: it binds to one state
                return CachedDataset(function, self, key, ignore, codec)

        return decorate

    def invalidate_dataset(self, dataset: str, *, soft: bool = False) -> Any:
        """Make every value of ``dataset`` fetched until now unservable, in every process.

        One command whatever the number of keys (:mod:`memofill.generations`):
        the values stay in Redis until their TTL, and are ignored. A fill that
        began before this call is never served after it. This process knows at
        once; others within ``meta_check_ms`` (milliseconds where a near-cache
        listener runs). ``soft=True`` serves the old values as ``stale_hit``
        while exactly one caller refreshes each, where the dataset has
        ``stale_s``; where it has none, it acts as a hard invalidation (see
        :doc:`invalidation`). Returns the mark (Redis's clock, µs), or an
        awaitable of it when the instance has only an asyncio client. That
        depends on the clients configured at run time, so it is typed ``Any``;
        a function's own :meth:`~memofill.CachedDataset.invalidate_dataset` is
        typed by the function's kind.
        """
        self.policy(dataset)
        state = self._state
        commands = state.sync or state.asynchronous
        if commands is None:
            raise ConfigurationError("invalidate_dataset needs a Redis client: configure one")
        return invalidate_dataset(
            commands, meta_key(state.prefix), state.generations, dataset, soft
        )

    def invalidate_tag(self, tag: str, *, soft: bool = False) -> Any:
        """Make every value bearing ``tag`` fetched until now unservable, in every process.

        One command whatever the number of values or datasets (:mod:`memofill.tags`).
        ``tag`` is concrete, such as ``"user:42"``: a template with each field written
        as the key writes it (``user_id="42"``, a ``str``, gives ``"user:%342"``). A tag
        no dataset's templates can produce is refused
        (:class:`~memofill.errors.UnknownTagError`): it would change nothing.
        ``soft=True`` serves old values as ``stale_hit`` while one caller refreshes
        each, where the dataset has ``stale_s``. Returns the mark (Redis's clock,
        µs), or an awaitable of it when the instance has only an asyncio client.
        """
        policies, tags = self.policies, self._tags
        if tags is None or tags[0] is not policies:
            # A fill may write up to a tomb's life after its stamp: the mark outlives that too.
            tags = self._tags = (policies, tag_index(policies.values(), TOMB_MS))
        keep_ms = tags[1].keep_ms(tag)
        state = self._state
        commands = state.sync or state.asynchronous
        if commands is None:
            raise ConfigurationError("invalidate_tag needs a Redis client: configure one")
        key = tags_key(state.prefix)
        return tag_invalidation(commands, key, state.generations, tag, soft, keep_ms)

    def final_key(self, key: str, **fields: object) -> str:
        """The Redis key of dataset ``key`` for these field values (``prefix`` included)."""
        template = parse_template(self.policy(key).key)
        missing = set(template.fields) - set(fields)
        if missing:
            raise TypeError(f"key {key!r} needs fields {sorted(missing)}")
        return self.prefix + template.render(fields)

    def lock_key(self, key: str, **fields: object) -> str:
        """The lock key the fill of that entry takes."""
        return lock_key(self.final_key(key, **fields))

    @contextlib.contextmanager
    def override(
        self,
        client: Any = None,
        *,
        async_client: Any = None,
        prefix: str | None = None,
        policies: PolicySource | None = None,
        near: NearCache | None = None,
    ) -> Iterator[Memofill]:
        """Reconfigure this instance for the block (as :meth:`configure`), then put it all back.

        Functions decorated at import time hold this instance, so a test points
        them at a fake Redis by reconfiguring the instance, not by replacing it.
        The block starts from nothing (zero counters, no values kept locally,
        breaker closed, no fills in flight), so what the test sees is its own.
        What the block sets is held: ``configure()`` inside it (an application's
        start-up code) changes only the rest. Afterwards the configuration is as
        before, and functions decorated in the block are forgotten (their dataset
        may exist only in the block's policies).
        """
        given = {
            "sync": client is not None or async_client is not None,
            "asynchronous": client is not None or async_client is not None,
            "prefix": prefix is not None,
            "policy_source": policies is not None,
            "policies": policies is not None,
            "near": near is not None,
        }
        held = frozenset(name for name, set_here in given.items() if set_here)
        with configuring:
            saved, bindings = self._state, list(self._bindings)
            fresh = attrs.evolve(
                saved,
                held=frozenset(),
                **_fresh(
                    saved.breaker.cooldown_s,
                    saved.local_store.max_bytes,
                    near=saved.near,
                    meta_check_s=saved.generations.check_s,
                    events=saved.metrics.events,
                    refreshes=saved.refreshes,
                ),
            )
            self._swap(
                self._composed(client, async_client, prefix, policies, near, state=fresh, held=held)
            )
        try:
            yield self
        finally:
            with configuring:
                self._bindings = weakref.WeakSet(bindings)
                self._state.local_store.attach(None)  # its listener, if any, stops
                self._swap(saved)

    def _bind(self, binding: CachedDataset[..., Any]) -> None:
        with configuring:
            self.policies  # noqa: B018  # loaded: the snapshot needs them
            self._bindings.add(binding)
            binding._rebind(self._state)
            self._follow()

    def _follow(self) -> None:
        """Give the store the listener the configuration in force needs (:func:`follow`)."""
        state = self._state
        follow(
            state.local_store,
            near=state.near,
            commands=state.sync or state.asynchronous,
            prefix=state.prefix,
            policies=state.policies,
            on_meta_change=state.generations.expire,
        )

    def _regate(self) -> None:
        """Rebuild the snapshots of the state in force (a ``disabled()`` block opened or closed)."""
        for binding in list(self._bindings):
            binding._rebind(self._state)


def _regate_every_instance() -> None:
    """A ``disabled()`` block opened first or closed last: every function's snapshot follows."""
    for instance in list(_instances):
        instance._regate()


when_switched(_regate_every_instance)

#: The instance behind :func:`configure` and :func:`cached_dataset`.
default = Memofill()


def default_instance() -> Memofill:
    """The module-level default instance: the one :func:`configure` and :func:`cached_dataset` use.

    Use it for what the module-level functions do not offer: ``counters``,
    ``override()`` in tests, ``final_key()``.
    """
    return default


def configure(
    client: Any = None,
    *,
    async_client: Any = None,
    prefix: str | None = None,
    policies: PolicySource | None = None,
    refresh: RefreshMode | None = None,
    refresh_workers: int | None = None,
    near: NearCache | None = None,
) -> Memofill:
    """Configure the module-level default instance (see :meth:`Memofill.configure`); returns it."""
    default.configure(
        client,
        async_client=async_client,
        prefix=prefix,
        policies=policies,
        refresh=refresh,
        refresh_workers=refresh_workers,
        near=near,
    )
    return default


def cached_dataset(
    key: str, *, ignore: Iterable[str] = (), codec: Codec | None = None
) -> Callable[[Callable[P, R]], CachedDataset[P, R]]:
    """Decorate with the module-level default instance (see :meth:`Memofill.cached_dataset`)."""
    return default.cached_dataset(key, ignore=ignore, codec=codec)


def invalidate_tag(tag: str, *, soft: bool = False) -> Any:
    """Invalidate ``tag`` through the default instance (see :meth:`Memofill.invalidate_tag`)."""
    return default.invalidate_tag(tag, soft=soft)
