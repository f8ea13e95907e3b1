"""``Memofill``: one configured cache (clients, prefix, policies), and the module-level default.

Tests and multi-tenant applications create their own instances; most
applications use the default through :func:`configure` and
:func:`cached_dataset`. Decorating needs only the policies, so functions can be
decorated at import time and the clients configured later, at start-up.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any, ParamSpec, TypeVar

from memofill.commands import Commands
from memofill.coordinator import Result
from memofill.decorator import CachedDataset
from memofill.errors import ConfigurationError, UnknownDatasetError
from memofill.fallback import Breaker, LocalStore
from memofill.keys import lock_key, parse_template, prefix_problem
from memofill.outcomes import Counters
from memofill.policy import DEFAULT_POLICY_MODULE, Dataset, PolicySource, load_policies
from memofill.singleflight import TaskFlights, ThreadFlights
from memofill.values import Codec

P = ParamSpec("P")
R = TypeVar("R")


def _is_async_client(client: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(client, "execute_command", None))


class Memofill:
    """A cache on one Redis (or Redis Cluster) with its own prefix, policies and counters.

    Args:
        client: a ``redis.Redis``, ``redis.cluster.RedisCluster`` or ``redis.asyncio``
            client, or ``None`` for no Redis (process-local singleflight only).
        async_client: an asyncio client for coroutine functions, when ``client``
            is a blocking one (both may be given).
        prefix: prepended to every key, so deployments sharing a Redis never share
            a value or a lock. Braces only as one complete hash tag (``"{app}:"``); no ``#``.
        policies: the generated module, its dotted name, or a mapping of key to
            :class:`~memofill.Dataset`; validated when loaded.
        breaker_cooldown_s: after Redis fails to answer, how long calls skip it.

    Attributes:
        prefix: The prefix in force (see ``prefix`` above).
        counters: Hits and miss outcomes per dataset, counted in this process
            (:class:`~memofill.outcomes.Counters`).
        local_store: Values this process recently read or wrote, served while
            Redis is unreachable (:class:`~memofill.fallback.LocalStore`).
        breaker: Skips Redis for a short cool-down after it failed to answer
            (:class:`~memofill.fallback.Breaker`).
        unstorable_warned: Datasets whose values could not be stored, each
            reported once by a WARNING.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        async_client: Any = None,
        prefix: str = "",
        policies: PolicySource = DEFAULT_POLICY_MODULE,
        breaker_cooldown_s: float = 1.0,
    ) -> None:
        self._start_fresh(breaker_cooldown_s)
        self._bindings: weakref.WeakSet[CachedDataset[..., Any]] = weakref.WeakSet()
        self._policy_source: PolicySource = policies
        self._policies: dict[str, Dataset] | None = None
        self._sync: Commands | None = None
        self._async: Commands | None = None
        self.prefix = ""
        self.configure(client, async_client=async_client, prefix=prefix)

    def _start_fresh(self, breaker_cooldown_s: float) -> None:
        """What calls accumulate: counts, values kept for outages, the breaker, fills in flight."""
        self.counters = Counters()
        self.local_store = LocalStore()
        self.breaker = Breaker(breaker_cooldown_s)
        self.thread_flights: ThreadFlights[Result] = ThreadFlights()
        self.task_flights: TaskFlights[Result] = TaskFlights()
        self.unstorable_warned: set[str] = set()

    def configure(
        self,
        client: Any = None,
        *,
        async_client: Any = None,
        prefix: str | None = None,
        policies: PolicySource | None = None,
    ) -> None:
        """Set the clients, and the prefix or policies when given; decorated functions follow.

        Everything is checked before anything changes: a configuration that is
        refused leaves the instance as it was.
        """
        if prefix is not None:
            problem = prefix_problem(prefix)
            if problem:
                raise ConfigurationError(f"prefix {prefix!r}: {problem}")
        clients = [c for c in (client, async_client) if c is not None]
        sync = [c for c in clients if not _is_async_client(c)]
        asynchronous = [c for c in clients if _is_async_client(c)]
        if len(sync) > 1 or len(asynchronous) > 1:
            raise ConfigurationError("give at most one blocking and one asyncio Redis client")
        sync_commands = Commands(sync[0]) if sync else None
        async_commands = Commands(asynchronous[0]) if asynchronous else None
        loaded = None
        if policies is not None:
            loaded = load_policies(policies)
            missing = sorted({binding.dataset.key for binding in self._bindings} - loaded.keys())
            if missing:
                raise UnknownDatasetError(
                    f"the new policies lack datasets that decorated functions use: {missing}"
                )
        if prefix is not None:
            self.prefix = prefix
        self._sync, self._async = sync_commands, async_commands
        if policies is not None:
            self._policy_source, self._policies = policies, loaded
        for binding in list(self._bindings):
            binding._rebind()  # decorated functions compile the prefix into their keys
        self.breaker.reset()

    @property
    def policies(self) -> dict[str, Dataset]:
        """Every loaded dataset policy by registry key (loaded on first use)."""
        if self._policies is None:
            source = self._policy_source
            try:
                self._policies = load_policies(source)
            except ModuleNotFoundError as exc:
                if (
                    not isinstance(source, str)
                    or exc.name is None
                    or not source.startswith(exc.name)
                ):
                    raise
                raise ConfigurationError(
                    f"cannot import policies {source!r}: run `memofill gen`, or pass policies= "
                    "(a module, its dotted name, or a mapping of key -> Dataset)"
                ) from exc
        return self._policies

    def policy(self, key: str) -> Dataset:
        """The policy of ``key``.

        Raises :class:`~memofill.errors.UnknownDatasetError` when no dataset declares it.
        """
        try:
            return self.policies[key]
        except KeyError:
            known = ", ".join(sorted(self.policies)) or "none"
            raise UnknownDatasetError(
                f"no dataset {key!r} in the policies (known: {known})"
            ) from None

    def commands_for(self, is_async: bool) -> Commands | None:
        """The commands of the client that serves sync or coroutine functions."""
        commands = self._async if is_async else self._sync
        if commands is None and (self._sync or self._async):
            kind = "an asyncio" if is_async else "a blocking"
            raise ConfigurationError(
                f"a {'coroutine ' if is_async else ''}function needs {kind} Redis client: "
                "pass it as client= or async_client="
            )
        return commands

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
            return CachedDataset(function, self, key, ignore, codec)

        return decorate

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
    ) -> Iterator[Memofill]:
        """Reconfigure this instance for the block (as :meth:`configure`), then put it all back.

        Functions decorated at import time hold this instance, so a test points
        them at a fake Redis by reconfiguring the instance, not by replacing it.
        The block starts from nothing (zero counters, no values kept locally,
        breaker closed, no fills in flight), so what the test sees is its own;
        afterwards every attribute is as before, and functions decorated in the
        block are forgotten (their dataset may exist only in the block's policies).
        """
        saved = dict(vars(self))
        bindings = list(self._bindings)
        try:
            self._start_fresh(self.breaker.cooldown_s)
            self.configure(client, async_client=async_client, prefix=prefix, policies=policies)
            yield self
        finally:
            vars(self).clear()
            vars(self).update(saved)
            self._bindings = weakref.WeakSet(bindings)
            for binding in bindings:
                binding._rebind()

    def _bind(self, binding: CachedDataset[..., Any]) -> None:
        self._bindings.add(binding)


#: The instance behind :func:`configure` and :func:`cached_dataset`.
default = Memofill()


def configure(
    client: Any = None,
    *,
    async_client: Any = None,
    prefix: str | None = None,
    policies: PolicySource | ModuleType | None = None,
) -> Memofill:
    """Configure the module-level default instance; returns it."""
    default.configure(client, async_client=async_client, prefix=prefix, policies=policies)
    return default


def cached_dataset(
    key: str, *, ignore: Iterable[str] = (), codec: Codec | None = None
) -> Callable[[Callable[P, R]], CachedDataset[P, R]]:
    """Decorate with the module-level default instance (see :meth:`Memofill.cached_dataset`)."""
    return default.cached_dataset(key, ignore=ignore, codec=codec)
