"""The exception tree: every error memofill raises on purpose derives from MemofillError."""

from __future__ import annotations

from collections.abc import Iterable

import attrs


class MemofillError(Exception):
    """Base class of every error memofill raises on purpose."""


@attrs.frozen
class Problem:
    """One broken rule in a registry: which dataset, which field, what value, which rule."""

    key: str
    field: str
    value: object
    rule: str

    def __str__(self) -> str:
        return f"{self.key}: {self.field}={self.value!r}: {self.rule}"


class RegistryError(MemofillError, ValueError):
    """A registry or policy set breaks one or more rules; ``problems`` holds every one of them."""

    def __init__(self, problems: Iterable[Problem], source: str = "registry") -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        lines = "\n".join(f"  {p}" for p in self.problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{source} is invalid ({count} {noun}):\n{lines}")


class RegistryLoadError(MemofillError, ValueError):
    """A registry file cannot be read: missing, not Python, no ``DATASETS``, wrong contents."""


class UnknownDatasetError(MemofillError, LookupError):
    """A decorator or command named a dataset key that no loaded policy declares."""


class UnknownTagError(MemofillError, LookupError):
    """A tag was invalidated that no loaded dataset's tag templates can produce."""


class KeyTemplateError(MemofillError, ValueError):
    """A key template cannot be parsed, or does not fit the function it decorates."""


class KeyArgumentError(MemofillError, TypeError):
    """A call passed a value that cannot name a cache key (``None``, a float, an object...)."""


class ConfigurationError(MemofillError, ValueError):
    """A :class:`~memofill.Memofill` was set up in a way that cannot work."""


class BatchError(MemofillError, ValueError):
    """A batch function (``@fn.batch``) returned something other than one value per item."""


class FillError(MemofillError):
    """The fill that this caller waited on failed in another process.

    A follower cannot receive the leader's exception across processes; it gets
    this instead, naming the exception type the leader's fetch raised, so that it
    does not wait out ``wait_ms`` for a value that will not come.
    """

    def __init__(self, dataset: str, redis_key: str, error: str) -> None:
        self.dataset = dataset
        self.redis_key = redis_key
        self.error = error
        super().__init__(f"the fill of {redis_key!r} ({dataset}) failed recently with {error}")
