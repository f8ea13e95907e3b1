"""pytest plugin: test your own cached functions on a fake Redis, a new one for every test.

Installed with ``memofill[test]`` and registered through the ``pytest11`` entry
point, so its fixtures are there without a line of ``conftest.py``. Each test
gets its own in-memory fakeredis server, with Lua (lupa) so the token-safe
unlock script runs: nothing is shared between tests, nor between pytest-xdist
workers.

The plugin loads in every pytest run where memofill is installed, so it imports
fakeredis (perhaps missing) only when a fixture needs it. ``import memofill``
never imports this package, nor pytest.

Fixtures: ``memofill_cache`` and its asyncio twin ``memofill_cache_async``,
``memofill_default`` (the module-level default pointed at the fake),
``memofill_outcomes`` (:class:`Outcomes`), ``memofill_faults`` (:class:`Faults`),
``memofill_redis`` and ``memofill_harness`` (:class:`Harness`). What the caches
are made of comes from ``memofill_policies`` and ``memofill_prefix``: override
them, or use the ``memofill`` marker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
import pytest

from memofill.codec import payload
from memofill.errors import ConfigurationError
from memofill.instance import Memofill
from memofill.instance import default as _default_instance
from memofill.near import NearCache
from memofill.policy import DEFAULT_POLICY_MODULE, Dataset, PolicySource, load_policies
from memofill.testing import _faults
from memofill.testing._assertions import OriginCalls, Outcomes
from memofill.testing._faults import Faults, LockHolder
from memofill.testing._harness import Harness

if TYPE_CHECKING:
    import redis

__all__ = [
    "CORRUPT_PAYLOAD",
    "NEAR_ON_FAKE",
    "Faults",
    "Harness",
    "LockHolder",
    "OriginCalls",
    "Outcomes",
    "stored_payload",
]

#: The bytes :meth:`Faults.corrupt` stores, neither JSON nor a memofill marker.
CORRUPT_PAYLOAD = _faults.CORRUPT_PAYLOAD
#: How the fixtures' caches keep near copies. fakeredis cannot tell a listener of writes
#: (it has no ``CLIENT TRACKING``), so copies live their ``near_ms`` (``invalidation="ttl"``).
#: Writes made through the caches themselves (``invalidate``, fills) still drop them.
NEAR_ON_FAKE = NearCache(invalidation="ttl")


def stored_payload(raw: bytes | None) -> bytes | None:
    """The value's own bytes under a key, without the header memofill stores in front of them.

    ``memofill_redis.get(key)`` returns the header too (when the fetch began,
    until when the value is fresh); compare what this returns with the bytes
    the codec makes. Markers and foreign bytes come back as they are.
    """
    if raw is None:
        return None
    return bytes(payload(raw))


_MARKER_OPTIONS = frozenset({"policies", "prefix", "unstorable"})


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the ``memofill_policies`` ini option: where the project's generated policies live."""
    parser.addini(
        "memofill_policies",
        "dotted name of the generated policies module the memofill_* fixtures load "
        f"(default: {DEFAULT_POLICY_MODULE})",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``memofill`` marker, so that ``--strict-markers`` accepts it."""
    config.addinivalue_line(
        "markers",
        "memofill(policies=None, prefix='', unstorable=False): the policies (generated module, "
        "dotted name, or mapping of key -> Dataset) and the key prefix of this test's memofill_* "
        "fixtures; unstorable=True: the test expects values that cannot be stored",
    )


def _marker_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``memofill`` marker options of this test; the closest marker wins, option by option."""
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("memofill"))):
        unknown = set(marker.kwargs) - _MARKER_OPTIONS
        if marker.args or unknown:
            pytest.fail(
                f"@pytest.mark.memofill takes only the keyword options {sorted(_MARKER_OPTIONS)}; "
                f"got positional {marker.args!r} and unknown {sorted(unknown)}",
                pytrace=False,
            )
        options.update(marker.kwargs)
    return options


@pytest.fixture
def memofill_harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """This test's fake Redis server, and what the other ``memofill_*`` fixtures share on it.

    A cached function that returned a value its codec could not store fails the
    test (in production that is one WARNING, and every call fetches), unless
    the test is marked ``@pytest.mark.memofill(unstorable=True)``.
    """
    harness = Harness()
    with harness.cleanup:
        yield harness
    if harness.unstorable and not _marker_options(request).get("unstorable", False):
        pytest.fail(
            "a cached function returned values that cannot be stored:\n"
            + "\n".join(record.getMessage() for record in harness.unstorable)
            + "\n(mark the test @pytest.mark.memofill(unstorable=True) if it expects that)",
            pytrace=False,
        )


@pytest.fixture
def memofill_policies(request: pytest.FixtureRequest) -> PolicySource | None:
    """The policies of this test's caches; override this fixture, or use the ``memofill`` marker.

    ``None`` stands for the project's own: the ``memofill_policies`` ini option,
    else ``gen.cache_fill_registry``, for new caches; and for ``memofill_default``,
    whatever policies the application gave the default instance.
    """
    options = _marker_options(request)
    if "policies" in options:
        return options["policies"]  # type: ignore[no-any-return]
    return request.config.getini("memofill_policies") or None


@pytest.fixture
def memofill_prefix(request: pytest.FixtureRequest) -> str:
    """The key prefix of this test's caches: ``""`` unless the ``memofill`` marker gives one."""
    prefix = _marker_options(request).get("prefix", "")
    if not isinstance(prefix, str):
        pytest.fail(f"@pytest.mark.memofill(prefix=...) must be a str, not {prefix!r}")
    return prefix


@pytest.fixture
def memofill_redis(memofill_harness: Harness) -> redis.Redis:
    """A blocking client on this test's fake Redis: look at the keys and TTLs the caches wrote."""
    return memofill_harness.client()


def _new_cache(
    harness: Harness, policies: PolicySource | None, prefix: str, *, blocking: bool
) -> Memofill:
    cache = Memofill(
        harness.client() if blocking else None,
        async_client=harness.async_client(),
        prefix=prefix,
        policies=policies,
        near=NEAR_ON_FAKE,
    )
    try:
        cache.policies  # noqa: B018  # load now: a missing or invalid policy module fails the setup
    except ConfigurationError as exc:  # the module cannot be imported: say how tests name another
        hint = "set the memofill_policies ini option, or use @pytest.mark.memofill(policies=...)"
        pytest.fail(f"{exc}\nfor the memofill_* fixtures: {hint}", pytrace=False)
    return harness.adopt(cache)


@pytest.fixture
def memofill_cache(
    memofill_harness: Harness, memofill_policies: PolicySource | None, memofill_prefix: str
) -> Memofill:
    """A :class:`~memofill.Memofill` on this test's fake Redis, for plain and coroutine functions.

    It has a blocking and an asyncio client, so functions of both kinds
    decorated with its ``cached_dataset`` work. Its counters start at zero.
    """
    return _new_cache(memofill_harness, memofill_policies, memofill_prefix, blocking=True)


@pytest.fixture
def memofill_cache_async(
    memofill_harness: Harness, memofill_policies: PolicySource | None, memofill_prefix: str
) -> Memofill:
    """The asyncio twin of ``memofill_cache``: an asyncio client only, as an asyncio service has.

    A blocking function decorated on it fails when called, as it would in such a
    service (:class:`~memofill.ConfigurationError`): that is what it checks.
    """
    return _new_cache(memofill_harness, memofill_policies, memofill_prefix, blocking=False)


@pytest.fixture
def memofill_default(
    memofill_harness: Harness, memofill_policies: PolicySource | None, memofill_prefix: str
) -> Iterator[Memofill]:
    """The module-level default instance (behind ``memofill.cached_dataset``), on the fake Redis.

    Functions an application decorates at import time hold that instance; for
    this test it has a blocking and an asyncio client on the fake server, the
    test's prefix, zero counters and no values kept locally. Policies the test
    gives are laid over the application's: a dataset they name takes the test's
    policy, every other one keeps its own (functions decorated at import time
    still need theirs). Everything is put back after the test
    (:meth:`memofill.Memofill.override`).
    """
    harness = memofill_harness
    policies = None if memofill_policies is None else _layered(memofill_policies)
    own = _default_instance.near
    with _default_instance.override(
        harness.client(),
        async_client=harness.async_client(),
        prefix=memofill_prefix,
        policies=policies,
        near=None if own is None else attrs.evolve(own, invalidation="ttl"),
    ) as cache:
        yield harness.adopt(cache)


def _layered(policies: PolicySource) -> dict[str, Dataset]:
    """The test's ``policies`` over the default instance's own."""
    try:
        own = _default_instance.policies
    except ConfigurationError:  # no generated module: then nothing was decorated with it either
        own = {}
    return {**own, **load_policies(policies)}


@pytest.fixture
def memofill_outcomes(memofill_harness: Harness) -> Outcomes:
    """What this test's caches did, with assertions that show all of it (:class:`Outcomes`)."""
    return Outcomes(memofill_harness)


@pytest.fixture
def memofill_faults(memofill_harness: Harness) -> Faults:
    """Redis down or slow, a lock held elsewhere, a corrupt value (:class:`Faults`)."""
    return Faults(memofill_harness)
