"""memofill: Redis-backed caching that calls the upstream once per miss, across processes."""

from memofill.errors import (
    ConfigurationError,
    FillError,
    KeyArgumentError,
    KeyTemplateError,
    MemofillError,
    Problem,
    RegistryError,
    RegistryLoadError,
    UnknownDatasetError,
)
from memofill.policy import CacheFill, Dataset, load_policies, validate

__all__ = [
    "CacheFill",
    "ConfigurationError",
    "Dataset",
    "FillError",
    "KeyArgumentError",
    "KeyTemplateError",
    "MemofillError",
    "Problem",
    "RegistryError",
    "RegistryLoadError",
    "UnknownDatasetError",
    "load_policies",
    "validate",
]
