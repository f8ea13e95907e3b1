"""memofill: Redis-backed caching that calls the upstream once per miss, across processes."""

from memofill.clients import redis_client
from memofill.decorator import CachedDataset, CallResult
from memofill.errors import (
    BatchError,
    ConfigurationError,
    FillError,
    KeyArgumentError,
    KeyTemplateError,
    MemofillError,
    Problem,
    RegistryError,
    RegistryLoadError,
    UnknownDatasetError,
    UnknownTagError,
)
from memofill.instance import (
    NO_CLIENT,
    Memofill,
    cached_dataset,
    configure,
    default_instance,
    invalidate_tag,
)
from memofill.near import NearCache
from memofill.outcomes import Outcome
from memofill.policy import CacheFill, Dataset, load_policies, validate
from memofill.snapshot import disabled
from memofill.values import Codec

__all__ = [
    "NO_CLIENT",
    "BatchError",
    "CacheFill",
    "CachedDataset",
    "CallResult",
    "Codec",
    "ConfigurationError",
    "Dataset",
    "FillError",
    "KeyArgumentError",
    "KeyTemplateError",
    "Memofill",
    "MemofillError",
    "NearCache",
    "Outcome",
    "Problem",
    "RegistryError",
    "RegistryLoadError",
    "UnknownDatasetError",
    "UnknownTagError",
    "cached_dataset",
    "configure",
    "default_instance",
    "disabled",
    "invalidate_tag",
    "load_policies",
    "redis_client",
    "validate",
]
