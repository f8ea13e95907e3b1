"""What a decorated function's calls read: one immutable snapshot of its instance's configuration.

Rules:

- A configuration is replaced whole, never changed in place: :class:`State` for an
  instance, and for each decorated function a :class:`Snapshot` built from it.
  Reconfiguring builds new ones and swaps one reference, so a call that took a
  snapshot sees one configuration from start to end.
- A snapshot is flat and slotted: the hit path reads several of its attributes on
  every call, and each extra hop costs. What calls accumulate (counts, warned sets,
  the local store) are objects it points to, not fields that change.
- Caching is switched off for a block by :func:`disabled`. Only while such a block
  is open anywhere in the process are snapshots built ``gated``, so the common call
  never reads the context variable.
- Every change of configuration, decoration and ``disabled()`` block is serialised
  by :data:`configuring`.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from memofill.arguments import (
    Field,
    KeyBuilder,
    PageKeyBuilder,
    Shape,
    compile_key,
    compile_page_keys,
)
from memofill.codec import HEADER_LEN, payload
from memofill.commands import Commands, is_cluster
from memofill.errors import ConfigurationError, UnknownDatasetError
from memofill.fallback import Breaker
from memofill.freshness import late_rule
from memofill.generations import Generations, Marks
from memofill.keys import meta_key, parse_template, tags_key
from memofill.metrics import Metrics
from memofill.near import LocalStore, NearCache
from memofill.outcomes import NEAR_HIT, Counters
from memofill.policy import Dataset, PolicySource
from memofill.refreshing import Refreshes
from memofill.singleflight import TaskFlights, ThreadFlights
from memofill.tags import MARK_PREFIX
from memofill.values import JSON, Values

if TYPE_CHECKING:
    from memofill.steps import Result

#: Serialises every change of configuration: configure, override, decoration, disabled().
configuring = threading.RLock()
#: Held while a function's snapshot is swapped, so that two swaps never undo each other.
swapping = threading.Lock()

#: ``True`` inside ``memofill.disabled()``: calls go straight to the function.
bypassing: contextvars.ContextVar[bool] = contextvars.ContextVar("memofill_disabled", default=False)
#: How many ``disabled()`` blocks are open in the process, any thread or task; while there
#: is one, snapshots are built gated, so that only then does a call read :data:`bypassing`.
_open_blocks = 0
#: Called (under :data:`configuring`) when the first block opens and the last one closes:
#: the instances rebuild their functions' snapshots (see :func:`when_switched`).
_on_switch: list[Callable[[], object]] = []


def when_switched(callback: Callable[[], object]) -> None:
    """Call ``callback`` when the first ``disabled()`` block opens and the last one closes."""
    _on_switch.append(callback)


def _switched() -> None:
    for callback in _on_switch:
        callback()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Switch caching off for the calls made inside the block, in this thread or task.

    The calls go straight to their functions, counted as ``disabled``. Other
    threads and tasks keep caching. Blocks nest.
    """
    global _open_blocks  # noqa: PLW0603  # this module's own switch
    with configuring:
        _open_blocks += 1
        if _open_blocks == 1:  # functions read the context variable from now on
            _switched()
    token = bypassing.set(True)
    try:
        yield
    finally:
        bypassing.reset(token)
        with configuring:
            _open_blocks -= 1
            if _open_blocks == 0:
                _switched()


class Owner(Protocol):
    """What a decorated function needs of its instance (a :class:`memofill.Memofill`)."""

    def policy(self, key: str) -> Dataset: ...

    def _bind(self, function: Any) -> None: ...


@attrs.frozen
class State:
    """One configuration of an instance, immutable: replaced whole, never changed in place.

    Besides what :meth:`Memofill.configure` sets, it holds what calls accumulate
    (counters, values kept for outages, the breaker, fills in flight), so that
    :meth:`Memofill.override` can start a block from nothing and put it all back.
    """

    sync: Commands | None
    asynchronous: Commands | None
    prefix: str
    #: ``None``: found by the rule in :mod:`memofill.project`.
    policy_source: PolicySource | None
    policies: dict[str, Dataset] | None
    disabled: bool
    counters: Counters
    #: Histograms and refresh counts; its ``events`` (the hooks) is the instance's, kept.
    metrics: Metrics
    local_store: LocalStore
    breaker: Breaker
    thread_flights: ThreadFlights[Result]
    task_flights: TaskFlights[Result]
    #: Datasets whose values could not be stored, each reported once by a WARNING.
    unstorable_warned: set[str]
    #: Datasets whose refusal by Redis's ACL was logged: once per client configured (a new
    #: client may have other rights).
    told_permission: set[str]
    #: How near copies are kept (``None``: never).
    near: NearCache | None
    #: The dataset generations this process knows (whole-dataset invalidation).
    generations: Generations
    #: Refreshes of stale values in flight, and how they are run (``refresh=``).
    refreshes: Refreshes = attrs.field(factory=Refreshes)
    #: What an enclosing :meth:`Memofill.override` set, which ``configure()`` leaves alone.
    held: frozenset[str] = frozenset()

    def policy(self, key: str) -> Dataset:
        """The policy of ``key``; the policies must be loaded."""
        assert self.policies is not None  # bindings are built after the policies are loaded
        try:
            return self.policies[key]
        except KeyError:
            known = ", ".join(sorted(self.policies)) or "none"
            raise UnknownDatasetError(
                f"no dataset {key!r} in the policies (known: {known})"
            ) from None

    def near_problem(self, dataset: Dataset) -> str | None:
        """Why ``dataset``'s near copies cannot be kept with these clients, or ``None``."""
        near = self.near
        if near is None or dataset.near_ms == 0 or near.invalidation != "tracking":
            return None
        if any(c is not None and is_cluster(c.client) for c in (self.sync, self.asynchronous)):
            return (
                f"dataset {dataset.key!r} has near_ms={dataset.near_ms}, but near copies "
                "invalidated by tracking are not supported on Redis Cluster: each primary "
                "reports only its own slots' writes, and a slot moving between primaries would "
                "go unreported; pass near=NearCache(invalidation='ttl') (copies live near_ms, "
                "whatever Redis does) or near=None"
            )
        return None

    def commands_for(self, is_async: bool) -> Commands | None:
        """The commands of the client that serves sync or coroutine functions."""
        commands = self.asynchronous if is_async else self.sync
        if commands is None and is_async and self.sync:
            raise ConfigurationError(
                "a coroutine function needs an asyncio Redis client, and only a blocking one "
                "is configured: pass one as async_client= too "
                "(memofill.redis_client(url, asyncio=True))"
            )
        if commands is None and self.asynchronous:
            raise ConfigurationError(
                "a plain function needs a blocking Redis client, and only an asyncio one is "
                "configured: pass one as client= too (memofill.redis_client(url))"
            )
        return commands


class _Bypass:
    def __repr__(self) -> str:
        return "BYPASS"


#: What :meth:`Snapshot.gate` returns when caching is off for this call.
BYPASS: Any = _Bypass()


@attrs.frozen
class Snapshot:
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
    #: Where each key field comes from in a call (what ``many()`` turns its items into).
    key_fields: tuple[Field, ...]
    #: The keys of a ``many()`` page of one field's values, where one loop builds them
    #: (:func:`~memofill.arguments.compile_page_keys`); ``None`` for a tagged dataset.
    page_keys: PageKeyBuilder | None
    count_hit: Callable[[], object]
    ttl_s: float
    #: How long after its fetch began a value may serve an outage: ``ttl_s +
    #: stale_if_error_s`` (see :func:`memofill.near.outage_left`).
    outage_s: float
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
    #: The tags hash's fields of a call's tags (``t:<tag>``, built from its arguments as its
    #: key is), read with its value; ``None`` for a dataset without tags.
    tags_of: Callable[[Any, tuple[Any, ...], dict[str, Any]], list[str]] | None
    tags_key: str
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
        fields: tuple[Field, ...],
        shape: Shape,
        is_async: bool,
        values: Values,
        decode: Callable[[bytes], Any],
        current_function: Callable[[], Callable[..., Any]],
    ) -> Snapshot:
        """The snapshot of ``state`` (the instance's configuration) for one function."""
        dataset = state.policy(key)
        try:
            commands, misconfigured = state.commands_for(is_async), None
            near_problem = state.near_problem(dataset) if commands is not None else None
            if near_problem is not None:
                raise ConfigurationError(near_problem)
        except ConfigurationError as exc:  # raised at its calls, naming the function
            function = current_function()
            name = getattr(function, "__qualname__", None) or type(function).__qualname__
            commands, misconfigured = None, f"{name} ({key}): {exc}"
        near_copy = state.near is not None and state.near.copy_on_hit
        near_on = commands is not None and state.near is not None and dataset.near_ms > 0
        return cls(
            key=key,
            is_async=is_async,
            current_function=current_function,
            values=values,
            decode=decode,
            view=payload if values.resolved is JSON else after_header,
            dataset=dataset,
            key_of=compile_key(state.prefix, dataset.template, fields, key, shape),
            key_fields=fields,
            page_keys=None
            if dataset.tag_templates
            else compile_page_keys(state.prefix, dataset.template, fields, shape),
            count_hit=state.counters.hit_tally(key).add,
            ttl_s=dataset.ttl_s,
            outage_s=dataset.ttl_s + dataset.stale_if_error_s,
            commands=commands,
            gated=misconfigured is not None or state.disabled or _open_blocks > 0,
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
            tags_of=_tags_of(dataset, fields, shape),
            tags_key=tags_key(state.prefix),
            breaker=state.breaker,
            thread_flights=state.thread_flights,
            task_flights=state.task_flights,
            unstorable_warned=state.unstorable_warned,
            told_permission=state.told_permission,
            late=late_rule_of(dataset),
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


def _tags_of(
    dataset: Dataset, fields: tuple[Field, ...], shape: Shape
) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], list[str]] | None:
    """The builder of a call's tag fields, each template compiled as a key is (the same texts)."""
    templates = dataset.tag_templates
    if not templates:
        return None
    by_name = {field.name: field for field in fields}
    # A fixed tag's field is a constant; the call's shape is checked as its key is built.
    fixed = [MARK_PREFIX + template.source for template in templates if not template.fields]
    builders = [
        compile_key(
            MARK_PREFIX,
            parse_template(template.source),
            tuple(by_name[name] for name in template.fields),
            dataset.key,
            shape,
        )
        for template in templates
        if template.fields
    ]
    if not builders:
        return lambda instance, args, kwargs: list(fixed)
    if len(builders) == 1:
        [only] = builders
        return lambda instance, args, kwargs: [only(instance, args, kwargs), *fixed]
    return lambda instance, args, kwargs: (
        [build(instance, args, kwargs) for build in builders] + fixed
    )


def late_rule_of(dataset: Dataset) -> Callable[[bytes], bool] | None:
    """The late rule (see :mod:`memofill.freshness`) of a dataset with a stale window or β."""
    fill = dataset.cache_fill
    if fill is None or not (dataset.stale_s or dataset.stale_if_error_s or fill.early_beta):
        return None
    return late_rule(fill.early_beta)


def after_header(raw: bytes) -> bytes:
    """The payload of headed bytes, copied (for codecs that do not read a ``memoryview``)."""
    return raw[HEADER_LEN:]
