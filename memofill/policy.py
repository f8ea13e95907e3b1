"""The registry model: datasets, fill policies, the rules they must keep, and loading them.

``Dataset`` and ``CacheFill`` accept whatever they are given, so that a registry
with several mistakes can be reported in one go: :func:`validate` returns
**every** broken rule, and :func:`load_policies` refuses a policy set with all of
them listed in one :class:`~memofill.errors.RegistryError`.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, cast

import attrs

from memofill.errors import KeyTemplateError, Problem, RegistryError
from memofill.keys import KeyTemplate, OverlapIndex, parse_template, template_problems
from memofill.tags import TagIndex, TagTemplate, compile_tag, tag_problems

#: The dotted name :func:`load_policies` imports when it is given nothing else.
DEFAULT_POLICY_MODULE = "gen.cache_fill_registry"

#: The longest ``ttl_s`` or ``negative_ttl_s``: ten years. Redis itself accepts an
#: expiry up to about 292 million years (the expiry time, in ms since 1970, must fit
#: a signed 64-bit integer), but an entry meant to outlive a decade is not a cache
#: entry, and a number that large is a unit mistake (ms written as s, say).
MAX_TTL_S = 10 * 365 * 24 * 3600
#: The longest an error is remembered (``error_ttl_s``): an upstream that failed
#: is asked again after at most this long.
MAX_ERROR_TTL_S = 30
#: The longest ``lease_ms`` (and so ``wait_ms`` and the poll intervals): one hour. A
#: leader that dies holds its key's fill for ``lease_ms``; a fetch slower than an hour
#: is a batch job, not a cache fill.
MAX_LEASE_MS = 3_600_000
#: The shortest non-zero duration in seconds: Redis expires keys in whole milliseconds,
#: and a shorter one would round to 0.
MIN_DURATION_S = 0.001
#: ``refresh_retry_ms`` when the fill policy leaves it out and ``stale_s`` is 0 or at least
#: 5 s; a shorter stale window takes a retry as long as itself (:attr:`Dataset.refresh_retry_ms`).
DEFAULT_REFRESH_RETRY_MS = 5_000


@attrs.frozen
class CacheFill:
    """How a miss on a dataset is coordinated across processes.

    Attributes:
        lease_ms: How long the lock lives; a leader that dies frees it after this.
        wait_ms: How long a follower waits for the leader's value before fetching
            itself. Less than ``lease_ms``, so a follower never outwaits a live lease.
        poll_min_ms: The follower's first wait between reads of the data key.
        poll_max_ms: The longest wait between two reads; less than ``wait_ms``.
        early_beta: XFetch's β: on a fresh hit, refresh early with probability
            ``exp(-(time left) / (δ·β))``, δ being how long the last fetch took.
            0 (the default): no early refresh. 1 refreshes hot keys about
            ``δ·ln(reads/s · δ)`` before they go stale, with about ``e^(1/β)`` lock
            attempts per cycle fleet-wide.
        refresh_retry_ms: After a refresh fails, no process tries again for this
            long: the lock is held that long instead of released, so the origin
            sees one call per ``refresh_retry_ms`` per key while it is down.
            ``None`` (the default): 5,000, or the dataset's ``stale_s`` when that
            is shorter, so that the default fits every stale window (see
            :attr:`Dataset.refresh_retry_ms`); a value given is checked against it.
    """

    lease_ms: int
    wait_ms: int
    poll_min_ms: int
    poll_max_ms: int
    early_beta: float = 0.0
    refresh_retry_ms: int | None = None


def _listed(tags: Any) -> Any:
    """``tags`` as a tuple when given as a list (so a dataset stays hashable), else as given."""
    return tuple(tags) if isinstance(tags, list) else tags


@attrs.frozen
class Dataset:
    """One cached dataset: its registry key, how long values live, and its fill policy.

    Attributes:
        key: The registry key, possibly a template such as ``market:quotes:{symbol}``.
        ttl_s: Seconds a value lives in Redis.
        negative_ttl_s: Seconds a ``None`` result is remembered (0: not remembered).
        cache_fill: The cross-process fill policy, or ``None`` for the legacy
            process-local path.
        error_ttl_s: Seconds a failed fetch is remembered, so that later callers
            get :class:`~memofill.errors.FillError` without calling the upstream
            (0, the default: not remembered, the next call fetches again).
        stale_s: Seconds past ``ttl_s`` a value is still served, at once, while
            exactly one caller fleet-wide refreshes it (0, the default: off).
        stale_if_error_s: Seconds past ``ttl_s`` a value is served when refreshing
            it fails (0, the default: off); 0 or at least ``stale_s``.
        near_ms: The longest, in ms, a process may serve its own in-memory copy of
            a value after it read it from Redis (0, the default: every call reads
            Redis). See :doc:`near-cache`.
        tags: Tag templates over the key's fields (``("user:{user_id}", "orders")``):
            ``invalidate_tag("user:42")`` makes every value bearing that tag, in
            every dataset, unservable at once (see :mod:`memofill.tags`).

    Redis keeps a value ``ttl_s + max(stale_s, stale_if_error_s)``: no value is
    served longer than that after its fetch began.
    """

    key: str
    ttl_s: float
    negative_ttl_s: float = 120
    cache_fill: CacheFill | None = None
    error_ttl_s: float = 0
    stale_s: float = 0.0
    stale_if_error_s: float = 0.0
    near_ms: int = 0
    tags: tuple[str, ...] = attrs.field(default=(), converter=_listed)
    #: ``cache_fill`` as the fills use it: ``refresh_retry_ms`` left out is filled in
    #: (:attr:`refresh_retry_ms`). Worked out here, not stored in ``cache_fill``, so that
    #: ``attrs.evolve(dataset, stale_s=...)`` derives it again from the new window.
    fill_in_force: CacheFill | None = attrs.field(init=False, eq=False, repr=False)
    #: ``tags`` compiled once, here, since every tagged call renders them; ``None`` when a
    #: tag or the key breaks a rule (:func:`validate` says which).
    tag_templates: tuple[TagTemplate, ...] | None = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        fill = self.cache_fill
        if isinstance(fill, CacheFill) and fill.refresh_retry_ms is None:
            fill = attrs.evolve(fill, refresh_retry_ms=self.refresh_retry_ms)
        object.__setattr__(self, "fill_in_force", fill)
        template, key_rules = _parsed(self.key)
        fields = None if template is None else template.fields
        compiled = None
        if not key_rules and not tag_problems(self.key, self.tags, fields):
            compiled = tuple(compile_tag(tag) for tag in self.tags)
        object.__setattr__(self, "tag_templates", compiled)

    @property
    def window_s(self) -> float:
        """How long past ``ttl_s`` Redis keeps a value: the larger stale window."""
        return max(self.stale_s, self.stale_if_error_s)

    @property
    def refresh_retry_ms(self) -> int:
        """The ``refresh_retry_ms`` in force: the fill policy's, else one that fits the window.

        Left out, it is ``DEFAULT_REFRESH_RETRY_MS`` (5,000), or ``stale_s`` (in ms) when
        that is shorter: a retry must fit in the stale window, and a default that
        did not would refuse ``Dataset(..., stale_s=1, cache_fill=CacheFill(...))``
        for a setting its user never chose.
        """
        fill = self.cache_fill
        given = fill.refresh_retry_ms if isinstance(fill, CacheFill) else None
        if given is not None:
            return given
        stale = self.stale_s
        if _is_number(stale) and math.isfinite(stale) and stale >= MIN_DURATION_S:
            return min(DEFAULT_REFRESH_RETRY_MS, math.floor(stale * 1000))
        return DEFAULT_REFRESH_RETRY_MS

    @property
    def life_ms(self) -> int:
        """The longest, in ms, Redis keeps anything a fill of this dataset writes.

        A value lives ``ttl_s`` and its stale window (its ``PX``), a negative
        marker ``negative_ttl_s``, an error marker ``error_ttl_s``.
        """
        value_ms = round(self.ttl_s * 1000) + round(self.window_s * 1000)
        return max(value_ms, round(self.negative_ttl_s * 1000), round(self.error_ttl_s * 1000))

    def tags_for(self, fields: Mapping[str, Any]) -> tuple[str, ...]:
        """The concrete tags of the value whose key has these field values (raw values).

        Each field is written as the key writes it (:class:`~memofill.keys.FieldText`).
        Raises :class:`~memofill.errors.KeyTemplateError` when the tags break a rule.
        """
        templates = self.tag_templates
        if templates is None:
            template, key_rules = _parsed(self.key)
            held = None if template is None else template.fields
            problems = [*key_rules, *tag_problems(str(self.key), self.tags, held)]
            raise KeyTemplateError(f"dataset {self.key!r} cannot render its tags: {problems[0]}")
        return tuple([template.render(fields) for template in templates])

    @property
    def template(self) -> KeyTemplate:
        """The parsed key (raises :class:`~memofill.errors.KeyTemplateError` if malformed)."""
        return parse_template(self.key)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fill_problems(key: str, fill: object) -> list[Problem]:
    if not isinstance(fill, CacheFill):
        return [Problem(key, "cache_fill", fill, "must be a CacheFill or None")]
    problems = []
    names = ("lease_ms", "wait_ms", "poll_min_ms", "poll_max_ms")
    typed = True
    for name in names:
        value = getattr(fill, name)
        if not _is_int(value):
            typed = False
            problems.append(Problem(key, f"cache_fill.{name}", value, "must be an int (ms)"))
    if not typed:
        return problems
    lease, wait, poll_min, poll_max = (getattr(fill, name) for name in names)
    at_most = f"must be <= {MAX_LEASE_MS} (1 hour)"
    rules = [
        ("lease_ms", lease, lease > 0, "must be > 0"),
        ("lease_ms", lease, lease <= MAX_LEASE_MS, at_most),
        ("wait_ms", wait, wait < lease, f"must be < lease_ms ({lease})"),
        ("wait_ms", wait, wait > 0, "must be > 0"),
        ("wait_ms", wait, wait <= MAX_LEASE_MS, at_most),
        ("poll_min_ms", poll_min, poll_min > 0, "must be > 0"),
        ("poll_min_ms", poll_min, poll_min <= MAX_LEASE_MS, at_most),
        ("poll_max_ms", poll_max, poll_max >= poll_min, f"must be >= poll_min_ms ({poll_min})"),
        ("poll_max_ms", poll_max, poll_max < wait, f"must be < wait_ms ({wait})"),
        ("poll_max_ms", poll_max, poll_max <= MAX_LEASE_MS, at_most),
    ]
    problems.extend(
        Problem(key, f"cache_fill.{name}", value, rule) for name, value, ok, rule in rules if not ok
    )
    beta = fill.early_beta
    if not _is_number(beta) or not math.isfinite(beta) or beta < 0:
        rule = "must be a finite number >= 0 (0: no early refresh)"
        problems.append(Problem(key, "cache_fill.early_beta", beta, rule))
    retry = fill.refresh_retry_ms
    if retry is None:  # left out: the dataset derives one that fits (Dataset.refresh_retry_ms)
        pass
    elif not _is_int(retry):
        problems.append(Problem(key, "cache_fill.refresh_retry_ms", retry, "must be an int (ms)"))
    elif not 0 < retry <= MAX_LEASE_MS:
        rule = f"must be > 0 and <= {MAX_LEASE_MS} (1 hour)"
        problems.append(Problem(key, "cache_fill.refresh_retry_ms", retry, rule))
    return problems


def _seconds_problem(value: object, zero_allowed: bool, most: float, why: str) -> str | None:
    """What is wrong with a duration in seconds, or ``None``; ``why`` explains ``most``."""
    if not _is_number(value):
        return "must be a number of seconds"
    number = cast("float", value)
    if isinstance(number, float) and not math.isfinite(number):  # an int is always finite
        return "must be finite"
    if number == 0 and zero_allowed:
        return None
    if number < 0 or (number == 0 and not zero_allowed):
        return "must be >= 0" if zero_allowed else "must be > 0"
    if number < MIN_DURATION_S:
        zero = "0 or " if zero_allowed else ""
        return f"must be {zero}>= {MIN_DURATION_S} (Redis expires in whole ms)"
    if number > most:
        return f"must be <= {most} ({why})"
    return None


def _near_problem(near_ms: object, ttl_s: float | None) -> str | None:
    """What is wrong with ``near_ms``, or ``None``: an int of ms, at most the value's TTL.

    A copy kept in memory longer than the value lives in Redis would outlive it.
    """
    if not _is_int(near_ms):
        return "must be an int (ms)"
    number = cast("int", near_ms)
    if number < 0:
        return "must be >= 0 (0: no near cache)"
    if ttl_s is not None and number > ttl_s * 1000:
        return f"must be <= ttl_s * 1000 ({ttl_s * 1000:g})"
    return None


def _parsed(key: object) -> tuple[KeyTemplate | None, list[str]]:
    """The key's template, or ``None`` and every problem with it.

    The template is parsed first since most keys are well formed: listing every
    problem costs a second pass, worth paying only for a malformed one.
    """
    if isinstance(key, str):
        with contextlib.suppress(KeyTemplateError):
            return parse_template(key), []
    return None, template_problems(key)


def _dataset_problems(
    dataset: Dataset, key_rules: list[str], template: KeyTemplate | None
) -> list[Problem]:
    key = dataset.key if isinstance(dataset.key, str) else repr(dataset.key)
    problems = [Problem(key, "key", dataset.key, rule) for rule in key_rules]
    problems.extend(tag_problems(key, dataset.tags, None if template is None else template.fields))
    ttl = dataset.ttl_s
    ttl_ok = _seconds_problem(ttl, False, MAX_TTL_S, "10 years") is None
    error_most: float = MAX_ERROR_TTL_S
    error_why = "errors are remembered at most 30 s"
    if ttl_ok and ttl < error_most:
        error_most, error_why = ttl, "ttl_s"
    checks = [
        ("ttl_s", ttl, False, MAX_TTL_S, "10 years"),
        ("negative_ttl_s", dataset.negative_ttl_s, True, MAX_TTL_S, "10 years"),
        ("error_ttl_s", dataset.error_ttl_s, True, error_most, error_why),
        ("stale_s", dataset.stale_s, True, MAX_TTL_S, "10 years"),
        ("stale_if_error_s", dataset.stale_if_error_s, True, MAX_TTL_S, "10 years"),
    ]
    typed = set()
    for name, value, zero_allowed, most, why in checks:
        rule = _seconds_problem(value, zero_allowed, most, why)
        if rule is not None:
            problems.append(Problem(key, name, value, rule))
        else:
            typed.add(name)
    near = _near_problem(dataset.near_ms, ttl if ttl_ok else None)
    if near is not None:
        problems.append(Problem(key, "near_ms", dataset.near_ms, near))
    if dataset.cache_fill is not None:
        problems.extend(_fill_problems(key, dataset.cache_fill))
    elif _is_number(dataset.error_ttl_s) and dataset.error_ttl_s != 0:
        rule = "must be 0 without cache_fill (only a coordinated fill remembers errors)"
        problems.append(Problem(key, "error_ttl_s", dataset.error_ttl_s, rule))
    if {"stale_s", "stale_if_error_s"} <= typed:
        problems.extend(_stale_problems(key, dataset))
    return problems


def _stale_problems(key: str, dataset: Dataset) -> list[Problem]:
    """The rules between the stale windows and the fill policy (both windows are valid numbers)."""
    stale, if_error, fill = dataset.stale_s, dataset.stale_if_error_s, dataset.cache_fill
    problems: list[Problem] = []
    if fill is None:
        # A refresh takes the fill's lock: without it, every process would refresh.
        rule = "must be 0 without cache_fill (the refresh takes the fill lock)"
        problems.extend(
            Problem(key, name, value, rule)
            for name, value in (("stale_s", stale), ("stale_if_error_s", if_error))
            if value != 0
        )
    if if_error != 0 and if_error < stale:
        rule = f"must be 0 or >= stale_s ({stale}): it extends the stale window, never shortens it"
        problems.append(Problem(key, "stale_if_error_s", if_error, rule))
    retry = getattr(fill, "refresh_retry_ms", None)
    if stale > 0 and isinstance(retry, int) and _is_int(retry) and retry > stale * 1000:
        rule = f"must be <= stale_s x 1000 ({stale * 1000:g}): a retry must fit in the window"
        problems.append(Problem(key, "cache_fill.refresh_retry_ms", retry, rule))
    return problems


def validate(datasets: Iterable[object]) -> list[Problem]:
    """Every rule the datasets break, in registry order; an empty list means valid.

    Rules: ``0 < ttl_s <= 10 years``, ``0 <= negative_ttl_s <= 10 years``,
    ``0 <= error_ttl_s <= min(30, ttl_s)``, ``0 <= stale_s <= 10 years``,
    ``stale_if_error_s`` 0 or ``>= stale_s``, each non-zero one at least 1 ms;
    ``stale_s``, ``stale_if_error_s`` and ``early_beta`` 0 without ``cache_fill``;
    ``0 <= near_ms <= ttl_s * 1000`` (an int);
    ``0 < lease_ms <= 1 hour``, ``0 < wait_ms < lease_ms``, ``poll_min_ms > 0``,
    ``poll_min_ms <= poll_max_ms < wait_ms``, ``early_beta >= 0`` and finite,
    ``0 < refresh_retry_ms <= 1 hour`` and ``<= stale_s × 1000`` when ``stale_s > 0``
    (when given: left out, it is derived to fit);
    ``tags`` a tuple of well formed templates over the key's fields, each once;
    numbers of the right type, well
    formed key templates, unique keys, and no two keys that some arguments could
    render to the same Redis key (each pair reported once, under the later key).
    """
    problems: list[Problem] = []
    seen: set[str] = set()
    overlaps = OverlapIndex()
    for index, dataset in enumerate(datasets):
        if not isinstance(dataset, Dataset):
            name = f"DATASETS[{index}]"
            problems.append(Problem(name, "item", dataset, "must be a memofill.Dataset"))
            continue
        template, key_rules = _parsed(dataset.key)
        problems.extend(_dataset_problems(dataset, key_rules, template))
        if not isinstance(dataset.key, str):
            continue
        if dataset.key in seen:
            problems.append(Problem(dataset.key, "key", dataset.key, "is declared twice"))
            continue
        seen.add(dataset.key)
        if template is None:
            continue
        for other_key in overlaps.add(template):
            rule = f"can render the same Redis key as {other_key!r}"
            problems.append(Problem(dataset.key, "key", dataset.key, rule))
    return problems


def ensure_valid(datasets: Iterable[object], source: str = "registry") -> None:
    """Raise :class:`~memofill.errors.RegistryError` listing every problem, if there is any."""
    problems = validate(datasets)
    if problems:
        raise RegistryError(problems, source)


def dataset_from_data(key: str, data: Mapping[str, Any]) -> Dataset:
    """A :class:`Dataset` from the plain-data form the generated module holds."""
    fill = data.get("cache_fill")
    return Dataset(
        key=key,
        ttl_s=data.get("ttl_s"),  # type: ignore[arg-type]  # validated after
        negative_ttl_s=data.get("negative_ttl_s", 120),
        cache_fill=CacheFill(**fill) if isinstance(fill, Mapping) else fill,
        error_ttl_s=data.get("error_ttl_s", 0),
        stale_s=data.get("stale_s", 0.0),
        stale_if_error_s=data.get("stale_if_error_s", 0.0),
        near_ms=data.get("near_ms", 0),
        tags=data.get("tags", ()),
    )


#: Fields written to the generated module only when they differ from these defaults, so
#: that the modules generated before the fields existed stay byte for byte the same.
_DATASET_DEFAULTS: dict[str, object] = {
    "error_ttl_s": 0,
    "stale_s": 0,
    "stale_if_error_s": 0,
    "near_ms": 0,
    "tags": (),
}
#: ``refresh_retry_ms`` left out (``None``) is derived from the dataset; a value given is
#: written as given, so that the module loads back to the same datasets.
_FILL_DEFAULTS = {"early_beta": 0, "refresh_retry_ms": None}


def dataset_to_data(dataset: Dataset) -> dict[str, Any]:
    """The plain-data form of a dataset, as the generated module holds it.

    Fields added after the first release are written only when they differ
    from their defaults (:data:`_DATASET_DEFAULTS`, :data:`_FILL_DEFAULTS`).
    """
    fill = dataset.cache_fill
    data: dict[str, Any] = {"ttl_s": dataset.ttl_s, "negative_ttl_s": dataset.negative_ttl_s}
    for name, default in _DATASET_DEFAULTS.items():
        value = getattr(dataset, name)
        if value != default:
            data[name] = list(value) if isinstance(value, tuple) else value
    if fill is None:
        data["cache_fill"] = None
    else:
        data["cache_fill"] = {
            name: value
            for name, value in attrs.asdict(fill).items()
            if name not in _FILL_DEFAULTS or value != _FILL_DEFAULTS[name]
        }
    return data


#: Where policies come from: the generated module, its dotted name, a mapping of key ->
#: :class:`Dataset`, or the registry's own list of datasets (``DATASETS``).
PolicySource = ModuleType | str | Mapping[str, Dataset] | Sequence[Dataset]


def load_policies(source: PolicySource = DEFAULT_POLICY_MODULE) -> dict[str, Dataset]:
    """Load and validate policies from a generated module, its dotted name, a mapping or a list.

    Raises :class:`~memofill.errors.RegistryError` with every problem when a
    policy breaks a rule (a hand-edited generated file, say), and
    :class:`ImportError` when the dotted name cannot be imported.
    """
    if isinstance(source, str):
        source = importlib.import_module(source)
    if isinstance(source, ModuleType):
        name = source.__name__
        raw = getattr(source, "POLICIES", None)
        if not isinstance(raw, Mapping):
            problem = Problem(name, "POLICIES", raw, "must be a dict of key -> policy")
            raise RegistryError([problem], name)
        datasets = [_dataset_or_item(key, data) for key, data in raw.items()]
    elif isinstance(source, (list, tuple)):  # the registry's DATASETS, validated as they stand
        name = "policies"
        datasets = list(source)
    elif not isinstance(source, Mapping):
        raise TypeError(
            f"policies must be a module, its dotted name, a mapping of key -> Dataset or a list "
            f"of Dataset, not {type(source).__name__}"
        )
    else:
        name = "policies"
        datasets = list(source.values())
        mismatched = [
            Problem(key, "key", dataset.key, "mapping key differs from Dataset.key")
            for key, dataset in source.items()
            if isinstance(dataset, Dataset) and dataset.key != key
        ]
        problems = mismatched + validate(datasets)
        if problems:
            raise RegistryError(problems, name)
    ensure_valid(datasets, name)
    # ensure_valid refuses any item that is not a Dataset, so the cast only tells mypy.
    return {dataset.key: dataset for dataset in cast("list[Dataset]", datasets)}


def _dataset_or_item(key: str, data: object) -> object:
    if not isinstance(data, Mapping):
        return data
    try:
        return dataset_from_data(key, data)
    except TypeError:  # a cache_fill mapping with unknown or missing fields
        return Dataset(
            key=key,
            ttl_s=data.get("ttl_s"),  # type: ignore[arg-type]  # validated after
            negative_ttl_s=data.get("negative_ttl_s", 120),
            cache_fill=data.get("cache_fill"),
            error_ttl_s=data.get("error_ttl_s", 0),
            stale_s=data.get("stale_s", 0.0),
            stale_if_error_s=data.get("stale_if_error_s", 0.0),
            near_ms=data.get("near_ms", 0),
            tags=data.get("tags", ()),
        )


def tag_index(datasets: Iterable[Dataset], late_ms: int) -> TagIndex:
    """Which of ``datasets`` bear a tag, each with how long its values may be in Redis.

    ``late_ms`` is how long after its stamp a fill may still write (a tomb's life,
    :data:`~memofill.scripts.TOMB_MS`): a mark must outlive a value that began before it,
    written as late as that.
    """
    return TagIndex(
        (dataset.key, dataset.tag_templates or (), dataset.life_ms + late_ms)
        for dataset in datasets
        if dataset.tags
    )
