"""What the miss algorithm and its drivers say to each other: steps, a plan, a result, words.

The algorithm (:mod:`memofill.coordinator`) yields a :class:`Command` (a Redis
command by name), a :class:`Sleep` or :data:`FETCH`, and returns a
:class:`Result`; a driver (:mod:`memofill.drivers`, and ``memofill.lockstep``
for several fills) performs each step and sends back what it got. A :class:`Plan` is everything
one miss needs to know, decided before it starts. The words a leader leaves
on the wake stream (:data:`STORED`, :data:`RAISED`...) and the reasons a
write is refused (:data:`REFUSALS`) are the fleet's shared vocabulary: every
process of every release that shares a Redis reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import attrs

from memofill.codec import NEGATIVE_MARKER, Header, error_marker, header_bytes
from memofill.freshness import wall_clock
from memofill.outcomes import Outcome
from memofill.policy import CacheFill
from memofill.values import JSON, Codec

#: The ``error`` of a leader whose lock was gone, or another's, when it released: its fetch
#: outlived ``lease_ms`` (or Redis lost the lock), so a second leader may have fetched too.
LEASE_EXPIRED = "LeaseExpired"
#: In the leader's wake entry, how its fill ended. This one says a value (or a marker)
#: is under the key, to be read.
STORED = "stored"
#: In the wake entry, the fetch returned ``None``, which is then the followers' answer,
#: stored as a marker or not.
RETURNED_NONE = "none"
#: In the wake entry, the fetch raised; followed by the exception's type name (never
#: its message).
RAISED = "error:"
#: In the wake entry, the fetch returned a value that could not be stored (not JSON, or
#: the write failed); followed by the error's type name. Followers then fetch at once.
UNSTORED = "unstored:"
#: In the wake entry, the leader was cancelled (its task, or the event loop shutting down)
#: before its value was stored. Followers retry the lock at once, so that exactly one of
#: them takes over the fill. It is an :data:`UNSTORED` entry, so that a follower that does
#: not know this one fetches at once rather than take it for the answer.
CANCELLED = UNSTORED + "CancelledError"
#: In the wake entry, Redis refused the leader's write (``STORE_SCRIPT``):
#: the key was invalidated, or holds a later fill's value, since the leader's fetch began.
#: Followers take the lock again and fill anew, or find the later value. An
#: :data:`UNSTORED` entry, so that a follower that does not know it fetches at once.
REFUSED = UNSTORED + "Refused"


@attrs.frozen
class Command:
    """Send the :class:`~memofill.commands.Commands` method ``name`` with ``args``."""

    name: str
    args: tuple[Any, ...]


@attrs.frozen
class Sleep:
    """Wait ``seconds`` without Redis (the wake stream is not available)."""

    seconds: float


class Fetch:
    def __repr__(self) -> str:
        return "FETCH"


#: Call the fetch function; its value (or exception) is sent back.
FETCH: Any = Fetch()

Step = Command | Sleep | Fetch


@attrs.frozen
class Plan:
    """What one miss needs to know: where the value lives and how to coordinate its fill."""

    dataset: str
    redis_key: str
    ttl_ms: int
    negative_ttl_ms: int
    cache_fill: CacheFill | None
    #: ``False`` when Redis is known to be unreachable: no command is tried.
    redis_ok: bool = True
    #: Why ``redis_ok`` is false, when this miss found out itself (the read's error type name).
    redis_error: str | None = None
    #: The client's socket time-out in ms, which every blocking wait ends well before.
    block_limit_ms: float | None = None
    #: Fetch even over a value present (a refresh). The recheck then never ends the fill,
    #: and a follower waits for the leader's word rather than take the value it replaces.
    refresh: bool = False
    #: How long a failed fetch is remembered under the key, in ms; 0 stores nothing.
    error_ttl_ms: int = 0
    #: How this function's values are stored and read (:mod:`memofill.values`).
    codec: Codec = JSON
    #: How long past ``ttl_ms`` Redis keeps a value, in ms (the larger stale window): its
    #: ``PX`` is ``ttl_ms + window_ms``, while its header says it is fresh for ``ttl_ms``.
    window_ms: int = 0
    #: The wall clock in seconds, read for the stored header (when the fetch began, how long).
    wall: Callable[[], float] = wall_clock
    #: The stale value this caller read (past ``stale_s``, within ``stale_if_error_s``): served
    #: instead of the error if the fill fails (``stale_on_error``). A fetch that
    #: raises then holds the lock (see :func:`refresh`) rather than release it.
    stale: bytes | None = None
    #: A value read under the key counts as filled only if its header says it is fresh after
    #: this wall-clock ms (0: any value counts): the stale value that sent a caller here must
    #: not end its fill as if another leader had just written it.
    fresh_after_ms: int = 0
    #: A leader whose fetch raises holds the lock for ``refresh_retry_ms`` instead of releasing
    #: it (as a failed refresh does), so the fleet backs off while the origin fails: set for
    #: datasets that serve stale or refresh early. Callers that meet the hold get the stale
    #: value or, past the windows, :class:`~memofill.errors.FillError`, without a fetch.
    hold_on_error: bool = False
    #: The stamp of a fill that takes no lock, which reads no clock of its own. It is
    #: Redis's clock as this process last read it, so no later than the fetch begins.
    stamp: int = 0
    #: A value read under the key ends this fill only if its stamp is after this (µs), 0 for
    #: any: a value fetched before a dataset invalidation this process knows of never does.
    floor: int = 0
    #: Whether bytes without a stamp (a value written by hand or an older release) end it:
    #: not once the dataset was invalidated.
    unstamped_ok: bool = True

    def stored_form(
        self, value: Any, started_ms: int, delta_ms: int, stamp: int
    ) -> tuple[bytes | None, int, str | None]:
        """What a fill writes for ``value``: ``(payload or None, ttl_ms, why it is unstorable)``.

        ``None`` is stored as the negative marker for ``negative_ttl_ms`` (not at
        all when that is 0); a value the function's codec cannot encode is not
        stored, and the reason given as ``"ErrorType: message"``. A value, or the
        marker, goes behind a :class:`~memofill.codec.Header` saying when its fetch
        began and until when it is fresh (counted from that start, so never later
        than the ``PX``), stamped ``stamp``; a value is kept by Redis for its stale
        window beyond that.
        """
        if value is None:
            if self.negative_ttl_ms <= 0:
                return None, 0, None
            header = Header(started_ms, started_ms + self.negative_ttl_ms, delta_ms, stamp)
            return header_bytes(header) + NEGATIVE_MARKER, self.negative_ttl_ms, None
        try:
            encoded = self.codec.encode(value)
        except Exception as exc:  # whatever the codec raises on a value it cannot encode
            return None, 0, f"{type(exc).__name__}: {exc}"
        header = Header(started_ms, started_ms + self.ttl_ms, delta_ms, stamp)
        return header_bytes(header) + encoded, self.ttl_ms + self.window_ms, None

    def stored_failure(self, error_type: str, stamp: int) -> bytes | None:
        """What a fill whose fetch raised ``error_type`` writes: an error marker for
        ``error_ttl_ms``, stamped as a value is (an invalidation rejects it too), or
        ``None`` (nothing is remembered)."""
        if self.error_ttl_ms <= 0:
            return None
        now_ms = round(self.wall() * 1000)
        header = Header(now_ms, now_ms + self.error_ttl_ms, 0, stamp)
        return header_bytes(header) + error_marker(error_type)


@attrs.frozen
class Result:
    """How a miss ended: the value or the exception for the caller, and what to log."""

    outcome: Outcome
    value: Any = None
    exception: BaseException | None = None
    led: bool = False
    waited_ms: float = 0.0
    polls: int = 0
    payload_bytes: int = 0
    #: Type name of the error worth logging (a Redis error met on the way, an unencodable value).
    error: str | None = None
    #: The bytes under the key that ``value`` was read from or written as, if any: what the
    #: process keeps for outages and decodes for callers joined to this fill.
    stored: bytes | None = None
    #: Why ``value`` could not be encoded (``"TypeError: ..."``), when it could not.
    unstorable: str | None = None
    #: How long this caller's fetch took, in ms (0 when it fetched nothing).
    delta_ms: int = 0

    def unwrap(self) -> Any:
        """The value, or raise the exception the caller must see."""
        if self.exception is not None:
            raise self.exception
        return self.value


Steps = Generator[Step, Any, Result]

#: Why ``STORE_SCRIPT`` refuses a write, as a result's ``error``.
REFUSALS = frozenset({"invalidated", "newer", "old", "restarted"})
