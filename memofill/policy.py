"""The registry model: datasets, fill policies, the rules they must keep, and loading them.

``Dataset`` and ``CacheFill`` accept whatever they are given, so that a registry
with several mistakes can be reported in one go: :func:`validate` returns
**every** broken rule, and :func:`load_policies` refuses a policy set with all of
them listed in one :class:`~memofill.errors.RegistryError`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, cast

import attrs

from memofill.errors import Problem, RegistryError
from memofill.keys import KeyTemplate, parse_template, template_problems, templates_overlap

#: The dotted name :func:`load_policies` imports when it is given nothing else.
DEFAULT_POLICY_MODULE = "gen.cache_fill_registry"


@attrs.frozen
class CacheFill:
    """How a miss on a dataset is coordinated across processes.

    Attributes:
        lease_ms: How long the lock lives; a leader that dies frees it after this.
        wait_ms: How long a follower waits for the leader's value before fetching
            itself. Less than ``lease_ms``, so a follower never outwaits a live lease.
        poll_min_ms: The follower's first wait between reads of the data key.
        poll_max_ms: The longest wait between two reads; less than ``wait_ms``.
    """

    lease_ms: int
    wait_ms: int
    poll_min_ms: int
    poll_max_ms: int


@attrs.frozen
class Dataset:
    """One cached dataset: its registry key, how long values live, and its fill policy.

    Attributes:
        key: The registry key, possibly a template such as ``market:quotes:{symbol}``.
        ttl_s: Seconds a value lives in Redis.
        negative_ttl_s: Seconds a ``None`` result is remembered (0: not remembered).
        cache_fill: The cross-process fill policy, or ``None`` for the legacy
            process-local path.
    """

    key: str
    ttl_s: float
    negative_ttl_s: float = 120
    cache_fill: CacheFill | None = None

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
    rules = [
        ("lease_ms", lease, lease > 0, "must be > 0"),
        ("wait_ms", wait, wait < lease, f"must be < lease_ms ({lease})"),
        ("wait_ms", wait, wait > 0, "must be > 0"),
        ("poll_min_ms", poll_min, poll_min > 0, "must be > 0"),
        ("poll_max_ms", poll_max, poll_max >= poll_min, f"must be >= poll_min_ms ({poll_min})"),
        ("poll_max_ms", poll_max, poll_max < wait, f"must be < wait_ms ({wait})"),
    ]
    problems.extend(
        Problem(key, f"cache_fill.{name}", value, rule) for name, value, ok, rule in rules if not ok
    )
    return problems


def _dataset_problems(dataset: Dataset) -> list[Problem]:
    key = dataset.key if isinstance(dataset.key, str) else repr(dataset.key)
    problems = [Problem(key, "key", dataset.key, rule) for rule in template_problems(dataset.key)]
    for name, minimum in (("ttl_s", "> 0"), ("negative_ttl_s", ">= 0")):
        value = getattr(dataset, name)
        if not _is_number(value):
            problems.append(Problem(key, name, value, "must be a number of seconds"))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(key, name, value, "must be finite"))
        elif (value <= 0) if minimum == "> 0" else (value < 0):
            problems.append(Problem(key, name, value, f"must be {minimum}"))
    if dataset.cache_fill is not None:
        problems.extend(_fill_problems(key, dataset.cache_fill))
    return problems


def validate(datasets: Iterable[object]) -> list[Problem]:
    """Every rule the datasets break, in registry order; an empty list means valid.

    Rules: ``ttl_s > 0``, ``negative_ttl_s >= 0``, ``lease_ms > 0``,
    ``0 < wait_ms < lease_ms``, ``poll_min_ms > 0``,
    ``poll_min_ms <= poll_max_ms < wait_ms``, numbers of the right type, well
    formed key templates, unique keys, and no two keys that some arguments could
    render to the same Redis key.
    """
    problems: list[Problem] = []
    seen: dict[str, KeyTemplate | None] = {}
    for index, dataset in enumerate(datasets):
        if not isinstance(dataset, Dataset):
            name = f"DATASETS[{index}]"
            problems.append(Problem(name, "item", dataset, "must be a memofill.Dataset"))
            continue
        own = _dataset_problems(dataset)
        problems.extend(own)
        if not isinstance(dataset.key, str):
            continue
        if dataset.key in seen:
            problems.append(Problem(dataset.key, "key", dataset.key, "is declared twice"))
            continue
        template = None if any(p.field == "key" for p in own) else dataset.template
        if template is not None:
            for other_key, other in seen.items():
                if other is not None and templates_overlap(template, other):
                    rule = f"can render the same Redis key as {other_key!r}"
                    problems.append(Problem(dataset.key, "key", dataset.key, rule))
        seen[dataset.key] = template
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
    )


def dataset_to_data(dataset: Dataset) -> dict[str, Any]:
    """The plain-data form of a dataset, as the generated module holds it."""
    fill = dataset.cache_fill
    return {
        "ttl_s": dataset.ttl_s,
        "negative_ttl_s": dataset.negative_ttl_s,
        "cache_fill": None if fill is None else attrs.asdict(fill),
    }


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
        )
