"""The miss algorithm, written once as a generator of steps: the algorithm only, no I/O.

:func:`fill` decides; it never performs I/O. It yields a
:class:`~memofill.steps.Command` (a Redis command by name), a
:class:`~memofill.steps.Sleep`, or :data:`~memofill.steps.FETCH`, and receives
the result (the vocabulary is :mod:`memofill.steps`'s). A Redis error is
thrown back into it, so that the algorithm, not the driver, decides how to
degrade. :func:`~memofill.drivers.run_sync` and
:func:`~memofill.drivers.run_async` perform the steps with a blocking or an
asyncio client; neither makes a decision.

One miss, for a dataset with a fill policy:

1. ``SET lock NX PX lease_ms`` with a fresh token, and in the same round trip
   (``ACQUIRE_SCRIPT``) ``GET key`` (the **recheck**), the
   newest entry of the wake stream and Redis's clock, the fill's **stamp**.
   Between this caller's miss and its lock, another leader may have written the
   value and released; without the recheck every such race would call the
   upstream again (and a caller that did not get the lock returns that value at
   once).
2. Acquired and still a miss: fetch, write conditionally
   (``STORE_SCRIPT``, one round trip: refused when the
   key was invalidated or a later-stamped value written since the stamp),
   release token-safely and wake followers with how the fill ended
   (:data:`~memofill.steps.STORED`, :data:`~memofill.steps.RETURNED_NONE`,
   ``REFUSED``, or :data:`~memofill.steps.RAISED` or
   :data:`~memofill.steps.UNSTORED` and an error's type name). A refused write
   is no error for the caller, who gets the value its fetch made
   (``fill_refused``); its followers take the lock again, as after a cancelled
   leader. A leader cancelled before its value is stored (the asyncio driver
   throws :class:`asyncio.CancelledError` into the generator) still releases
   and tells :data:`~memofill.steps.CANCELLED`, then re-raises: its followers
   retry the lock at once instead of waiting out ``wait_ms``, and one of them
   takes the fill over.
3. Not acquired: follow. Block on the wake stream, after the entry step 1 saw,
   for the current backoff interval, then read the **data** key, never the lock
   key: the value is the source of truth, and a follower returns as soon as it
   lands. A signal that the fetch returned ``None`` or raised is the answer
   itself, stored or not (``negative_ttl_s`` or ``error_ttl_s`` of 0 stores
   nothing); one that the value could not be stored sends the follower to
   fetch at once, and one that the leader was cancelled sends it back to step 1.
   After ``wait_ms``, fetch uncoordinated. A follower that is cancelled simply
   stops: it holds nothing.
4. A Redis error anywhere in the lock path: fall back to a plain local fetch
   (the caller's process already coalesced its own callers). Whatever a command
   raises counts as a Redis error, not only redis-py's ``RedisError``: a client
   that fails inside itself (a bug, a race in its set-up) must not fail the
   caller when the fetch can still run. The fetch's own exceptions are told
   apart by the step they are thrown at. Two failures are not Redis failing:
   a full connection pool (the command waits for a connection and is sent again),
   and a blocking wait that timed out (the follower reads the data key and
   keeps following; the wait is sized to end before the socket time-out, but
   Redis ends it on its own timer and a busy process may read it late).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Generator
from typing import Any

import attrs

from memofill.codec import (
    CORRUPT,
    NEGATIVE,
    ErrorMarker,
    decode_special,
    payload_size,
    read_header,
)
from memofill.commands import is_hold, new_token, newest_entry, stream_entries
from memofill.errors import FillError
from memofill.failures import RedisUnavailable, is_pool_refusal, is_timeout
from memofill.keys import lock_key, wake_key
from memofill.outcomes import Outcome
from memofill.policy import CacheFill
from memofill.steps import (
    CANCELLED,
    FETCH,
    LEASE_EXPIRED,
    RAISED,
    REFUSALS,
    REFUSED,
    RETURNED_NONE,
    STORED,
    UNSTORED,
    Command,
    Plan,
    Result,
    Sleep,
    Step,
    Steps,
)
from memofill.values import decode_stored


def fill(plan: Plan, clock: Callable[[], float], rng: random.Random) -> Steps:
    """The miss algorithm (see the module docstring): yields steps, returns a
    :class:`~memofill.steps.Result`.

    A caller holding a stale value (:attr:`~memofill.steps.Plan.stale`) gets it back when the fill
    fails, here or in the leader it followed, as ``stale_on_error``.
    """
    result = yield from _fill(plan, clock, rng)
    if plan.stale is None or result.outcome is not Outcome.FETCH_ERROR:
        return result
    stale = decode_stored(plan.codec, plan.stale)
    if stale is CORRUPT or stale is NEGATIVE or isinstance(stale, ErrorMarker):
        return result
    return attrs.evolve(
        result, outcome=Outcome.STALE_ON_ERROR, value=stale, exception=None, stored=plan.stale
    )


def _fill(plan: Plan, clock: Callable[[], float], rng: random.Random) -> Steps:
    """:func:`fill` without the stale value's rescue."""
    policy = plan.cache_fill
    if policy is None:
        return (yield from _uncoordinated(plan, Outcome.LEGACY))
    if not plan.redis_ok:
        error = plan.redis_error or RedisUnavailable.__name__
        return (yield from _uncoordinated(plan, Outcome.LOCK_ERROR, error))
    lock, token = lock_key(plan.redis_key), new_token()
    try:
        acquired, recheck, newest, stamp = yield from _acquire(plan, policy, lock, token)
    except Exception as exc:  # from Redis: see the module doc
        return (yield from _uncoordinated(plan, Outcome.LOCK_ERROR, type(exc).__name__))
    if acquired:
        return (yield from _lead(plan, policy, lock, token, recheck, stamp))
    if is_hold(newest):
        # Held after a failed fetch: nobody fetches before it lapses, so its word is the answer.
        _, told = newest_entry(newest, "0-0")
        return _told(plan, told or RAISED, 0, 0.0)
    # The value may have landed since this caller's miss: then there is nothing to wait for.
    reusable = not plan.refresh and not isinstance(recheck, Exception)
    landed = _landed(plan, recheck, 0, 0.0) if reusable else None
    if landed is not None:
        return landed
    # Signals from here on are this fill's: an earlier fill's entry may still be there.
    since, _ = ("0-0", None) if isinstance(newest, Exception) else newest_entry(newest, "0-0")
    return (yield from _follow(plan, policy, clock, rng, since))


def _lead(  # noqa: PLR0917  # what the lock's round trip gave
    plan: Plan, policy: CacheFill, lock: str, token: str, recheck: Any, stamp: int
) -> Steps:
    """Fill as the lock holder; ``recheck`` is the data key read with the lock (or its error)."""
    error = None
    if isinstance(recheck, Exception):
        recheck, error = None, type(recheck).__name__
    reusable = recheck is not None and not plan.refresh and _fresh_enough(plan, recheck)
    found = decode_stored(plan.codec, recheck) if reusable else CORRUPT
    if found is not CORRUPT and not isinstance(found, ErrorMarker):
        _, release_error = yield from _write_and_release(
            plan, policy, lock, token, payload=None, ttl_ms=0, result=STORED
        )
        value = None if found is NEGATIVE else found
        error = release_error or error
        stored = None if value is None else recheck
        return Result(Outcome.LEADER_RECHECK_HIT, value=value, led=True, error=error, stored=stored)
    try:
        value, started_ms, delta_ms = yield from _timed_fetch(plan)
    except asyncio.CancelledError:
        # Nothing was fetched for the followers: free the lock and send them back to it.
        yield from _write_and_release(
            plan, policy, lock, token, payload=None, ttl_ms=0, result=CANCELLED
        )
        raise
    except Exception as exc:
        if plan.hold_on_error:
            # The stale value stays and the fleet backs off, as after a failed refresh.
            yield from _hold(plan, policy, lock, token, RAISED + type(exc).__name__)
            return Result(Outcome.FETCH_ERROR, exception=exc, led=True, error=type(exc).__name__)
        # The followers waiting now learn of the failure from the wake signal. Nothing is
        # stored for later callers unless the dataset asks (error_ttl_s): the next call
        # fetches again, one at a time across processes, since it takes the lock first.
        marker = plan.stored_failure(type(exc).__name__, stamp)
        raised = RAISED + type(exc).__name__
        yield from _write_and_release(
            plan, policy, lock, token, payload=marker, ttl_ms=plan.error_ttl_ms, result=raised,
            stamp=stamp,
        )  # fmt: skip
        return Result(Outcome.FETCH_ERROR, exception=exc, led=True, error=type(exc).__name__)
    outcome = Outcome.FORCED_FILL if plan.refresh else Outcome.LEADER_FILL
    outcome = Outcome.NEGATIVE if value is None else outcome
    fetched = (outcome, value, started_ms, delta_ms, stamp)
    stored = yield from _store(plan, policy, lock, token, fetched)
    # Report the first thing that went wrong: a failed recheck, then the encoding, the write,
    # the release.
    return stored if error is None else attrs.evolve(stored, error=error)


def refresh(plan: Plan, seen_start_ms: int) -> Steps:
    """The refresh of a value that is stale or due early: one fetch fleet-wide, nobody waits.

    Its callers were served the value it replaces already, so it never waits and
    never fetches without the lock:

    1. Take the lock (the same one round trip as a miss: ``SET NX PX``, the recheck,
       the newest wake entry). Held by another process: ``refresh_busy``.
       A Redis error: ``refresh_lock_error``, and no fetch at all (the
       stale value is the right answer while Redis misbehaves; a miss would instead
       fetch uncoordinated, having nothing to serve).
    2. The recheck shows a value whose fetch began after ``seen_start_ms`` (the one
       that was read): another process refreshed it meanwhile; release and stop
       (``refresh_recheck_hit``).
    3. Fetch, write the value with a new header, release token-safely (followers of
       a key that hard-expired meanwhile are woken as after any fill).
    4. The fetch raised: the stale value is left alone and the lock is **held** for
       ``refresh_retry_ms`` (:data:`~memofill.scripts.HOLD_SCRIPT`) rather than
       released: every process finds it held and keeps serving the stale value, so
       the origin sees one call per ``refresh_retry_ms`` while it fails.
    5. Cancelled (asyncio; the loop shutting down): release as a cancelled leader does.
    """
    policy = plan.cache_fill
    if policy is None or not plan.redis_ok:
        return Result(Outcome.REFRESH_LOCK_ERROR, error=plan.redis_error or "RedisUnavailable")
    lock, token = lock_key(plan.redis_key), new_token()
    try:
        acquired, recheck, _, stamp = yield from _acquire(plan, policy, lock, token)
    except Exception as exc:  # from Redis: see the module doc
        return Result(Outcome.REFRESH_LOCK_ERROR, error=type(exc).__name__)
    if not acquired:
        return Result(Outcome.REFRESH_BUSY)
    header = read_header(recheck) if isinstance(recheck, bytes) else None
    if header is not None and header.fetch_start_ms > seen_start_ms and header.stamp > plan.floor:
        _, release_error = yield from _write_and_release(
            plan, policy, lock, token, payload=None, ttl_ms=0, result=STORED
        )
        return Result(Outcome.REFRESH_RECHECK_HIT, error=release_error, stored=recheck)
    try:
        value, started_ms, delta_ms = yield from _timed_fetch(plan)
    except asyncio.CancelledError:
        yield from _write_and_release(
            plan, policy, lock, token, payload=None, ttl_ms=0, result=CANCELLED
        )
        raise
    except Exception as exc:
        # The fetch's error is the one to report: a hold that failed only shortens the back-off.
        yield from _hold(plan, policy, lock, token, RAISED + type(exc).__name__)
        return Result(Outcome.REFRESH_ERROR, error=type(exc).__name__)
    outcome = Outcome.REFRESH_NEGATIVE if value is None else Outcome.REFRESH_FILL
    fetched = (outcome, value, started_ms, delta_ms, stamp)
    return (yield from _store(plan, policy, lock, token, fetched))


def _acquire(
    plan: Plan, policy: CacheFill, lock: str, token: str
) -> Generator[Step, Any, tuple[bool, Any, list[Any], int]]:
    """Try the lock, recheck the key, read the newest wake entry and the clock: one round trip.

    Returns ``(acquired, recheck, newest, stamp)``, the newest entry as
    ``[(id, fields)]``; raises what Redis raised.
    """
    acquired, recheck, newest, seconds, micros = yield from _ask(
        plan,
        Command(
            "acquire", (lock, token, policy.lease_ms, plan.redis_key, wake_key(plan.redis_key))
        ),
    )
    if isinstance(acquired, Exception):
        raise acquired
    entries = [(entry[0], _fields(entry[1])) for entry in newest or () if len(entry) > 1]
    return bool(acquired), recheck, entries, int(seconds) * 1_000_000 + int(micros)


def _fields(flat: Any) -> dict[Any, Any]:
    """A stream entry's fields as a script returns them (a flat list) made a dict."""
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=False))


def _store(
    plan: Plan,
    policy: CacheFill,
    lock: str,
    token: str,
    fetched: tuple[Outcome, Any, int, int, int],
) -> Steps:
    """Store what a fetch made with the lock held, release the lock and tell the followers.

    ``fetched`` is the outcome so far, the value, when its fetch began (wall ms),
    how long it took and the fill's stamp. The result reports the first thing
    that went wrong: the encoding, the write, then the release; a write Redis
    refused makes the outcome ``fill_refused`` (or ``refresh_refused``).
    """
    outcome, value, started_ms, delta_ms, stamp = fetched
    payload, ttl_ms, unstorable = plan.stored_form(value, started_ms, delta_ms, stamp)
    encode_error = None if unstorable is None else unstorable.partition(":")[0]
    if value is None:
        told = RETURNED_NONE
    else:
        told = STORED if encode_error is None else UNSTORED + encode_error
    write_error, release_error = yield from _write_and_release(
        plan, policy, lock, token, payload=payload, ttl_ms=ttl_ms, result=told, stamp=stamp
    )
    if write_error in REFUSALS:
        refused = Outcome.REFRESH_REFUSED if outcome in _REFRESHES else Outcome.FILL_REFUSED
        result = _fetched(refused, value, None, write_error, unstorable)
        return attrs.evolve(result, delta_ms=delta_ms)
    error = encode_error or write_error or release_error
    return attrs.evolve(_fetched(outcome, value, payload, error, unstorable), delta_ms=delta_ms)


_REFRESHES = frozenset({Outcome.REFRESH_FILL, Outcome.REFRESH_NEGATIVE})


def _hold(
    plan: Plan, policy: CacheFill, lock: str, token: str, result: str
) -> Generator[Step, Any, None]:
    """Hold the lock for ``refresh_retry_ms`` after a failed fetch, and tell; see :func:`refresh`.

    A Redis error here, or a lock that is no longer ours, holds nothing: the
    lock lapses with its lease, and the next stale read may retry then.
    """
    wake_ttl_ms = max(policy.poll_max_ms, 100)
    command = Command(
        "hold",
        (lock, wake_key(plan.redis_key), token, policy.refresh_retry_ms, wake_ttl_ms, result),
    )
    with contextlib.suppress(Exception):  # from Redis: see the module doc
        yield from _ask(plan, command)


def _fresh_enough(plan: Plan, raw: bytes) -> bool:
    """Whether ``raw`` can end a fill: fresh after ``fresh_after_ms``, stamped after ``floor``.

    Bytes without a header are a marker of a release before markers had one
    (``None`` or a failure, which live a short TTL of their own) or a value written
    by an older release, which is older than any dataset invalidation.
    """
    if not plan.fresh_after_ms and not plan.floor:
        return True
    header = read_header(raw)
    if header is None:
        return plan.unstamped_ok or decode_special(raw) is not CORRUPT
    return header.soft_until_ms > plan.fresh_after_ms and header.stamp > plan.floor


def _landed(plan: Plan, raw: bytes | None, polls: int, waited_ms: float) -> Result | None:
    """A follower's result if ``raw`` is what a leader stored (value, ``None`` or failure)."""
    landed = raw is not None and _fresh_enough(plan, raw)
    found = decode_stored(plan.codec, raw) if raw is not None and landed else CORRUPT
    if isinstance(found, ErrorMarker):
        failure = FillError(plan.dataset, plan.redis_key, found.error)
        return Result(
            Outcome.FETCH_ERROR,
            exception=failure,
            waited_ms=waited_ms,
            polls=polls,
            error=found.error,
        )
    if found is CORRUPT:
        return None
    return Result(
        Outcome.FOLLOWER_HIT,
        value=None if found is NEGATIVE else found,
        waited_ms=waited_ms,
        polls=polls,
        payload_bytes=payload_size(raw) if raw else 0,
        stored=None if found is NEGATIVE else raw,
    )


def _follow(
    plan: Plan, policy: CacheFill, clock: Callable[[], float], rng: random.Random, since: str
) -> Steps:
    """Wait for the value: woken by the leader's signal after ``since``, or on a timer."""
    wake = wake_key(plan.redis_key)
    start = clock()
    deadline = start + policy.wait_ms / 1000
    interval_ms, polls, last_id, wake_error = float(policy.poll_min_ms), 0, since, None
    while (remaining_ms := (deadline - clock()) * 1000) > 0:
        # Jitter within the upper half of the interval, but never under poll_min_ms: that is
        # the shortest wait the policy allows between two reads.
        jittered_ms = max(interval_ms * (0.5 + rng.random() / 2), policy.poll_min_ms)
        pause_ms = max(1.0, min(jittered_ms, remaining_ms, _block_cap_ms(plan.block_limit_ms)))
        told = None
        try:
            if wake_error:
                raise RedisUnavailable("wake stream not used")
            reply = yield from _ask(plan, Command("wait", (wake, last_id, round(pause_ms))))
            last_id, told = newest_entry(stream_entries(reply), last_id)
            if told in (CANCELLED, REFUSED):
                # The lock is free again: whoever of the followers takes it fills (or finds the
                # later value that refused the leader's write).
                return (yield from _fill(plan, clock, rng))
            if told is not None and told.startswith(UNSTORED):
                # The value will not appear: fetch now rather than after wait_ms.
                waited = (clock() - start) * 1000
                error = told.removeprefix(UNSTORED)
                result = yield from _uncoordinated(plan, Outcome.FOLLOWER_TIMEOUT, error)
                return attrs.evolve(result, waited_ms=waited, polls=polls)
            if told is not None and told != STORED:
                # None or a failure: the leader's word is the answer, stored or not.
                return _told(plan, told, polls, (clock() - start) * 1000)
            if plan.refresh and told is None:
                continue  # the key still holds the value being replaced: wait for the word
        except Exception as exc:  # from Redis: see the module doc
            if not is_timeout(exc):
                # The data key stays the source of truth: poll it on a timer.
                wake_error = wake_error or type(exc).__name__
                yield Sleep(pause_ms / 1000)
            # A wait that timed out took its time already: it means "not yet", so read the
            # data key and keep following (a busy process can be late to read the reply).
        try:
            raw = yield from _ask(plan, Command("get", (plan.redis_key,)))
        except Exception as exc:  # from Redis: see the module doc
            waited = (clock() - start) * 1000
            error = wake_error or type(exc).__name__
            result = yield from _uncoordinated(plan, Outcome.LOCK_ERROR, error)
            return attrs.evolve(result, waited_ms=waited, polls=polls)
        polls += 1
        landed = _landed(plan, raw, polls, (clock() - start) * 1000)
        if landed is not None:
            return landed
        if told == STORED and plan.floor and raw is not None:
            # The leader's value began before a dataset invalidation this caller knows of (it
            # did not know yet): the lock is free again, and one of the followers fills anew.
            return (yield from _fill(plan, clock, rng))
        interval_ms = min(interval_ms * 2, float(policy.poll_max_ms))
    waited = (clock() - start) * 1000
    result = yield from _uncoordinated(plan, Outcome.FOLLOWER_TIMEOUT)
    return attrs.evolve(result, waited_ms=waited, polls=polls)


#: Redis ends a blocked ``XREAD`` on its timer (``hz 10``: every 100 ms), so a ``BLOCK``
#: returns up to about this much after it asked for, plus the reply's own trip.
SERVER_TIMER_SLACK_MS = 150.0
#: The longest a command waits, in all, for a connection from a full pool when the dataset
#: has no ``wait_ms`` (a legacy dataset's write): a burst queues instead of failing.
POOL_WAIT_MS = 1000.0
#: The longest pause between two tries for a connection from a full pool.
POOL_PAUSE_MAX_MS = 20.0


def _block_cap_ms(socket_timeout_ms: float | None) -> float:
    """The longest ``XREAD BLOCK`` that ends before the client's socket time-out.

    Half the time-out, and at least :data:`SERVER_TIMER_SLACK_MS` under it:
    with 0.3 s, blocks of 150 ms, which Redis ends by about 250 ms. A wait that
    still times out (a busy process reads the reply late) is "not yet" to
    :func:`_follow`, never a sign that Redis is gone.
    """
    if socket_timeout_ms is None:
        return float("inf")
    return min(socket_timeout_ms / 2, socket_timeout_ms - SERVER_TIMER_SLACK_MS)


def _ask(plan: Plan, command: Command) -> Generator[Step, Any, Any]:
    """Send ``command``; when the client's pool is full, wait for a connection and send again.

    A full pool is this process's own congestion (more callers than
    connections), not Redis failing, so it must not make a caller fetch
    uncoordinated. The pauses double from 1 ms to :data:`POOL_PAUSE_MAX_MS`,
    for at most the dataset's ``wait_ms`` in all; then the error is the
    caller's, as any other Redis error. Only a plain pool's refusal is sent
    again: a blocking pool has already waited its own ``timeout`` for a
    connection, and that is the bound the application chose.
    """
    budget_ms = POOL_WAIT_MS if plan.cache_fill is None else float(plan.cache_fill.wait_ms)
    waited_ms, pause_ms = 0.0, 1.0
    while True:
        try:
            return (yield command)
        except Exception as exc:  # from Redis: see the module doc
            if not is_pool_refusal(exc) or waited_ms >= budget_ms:
                raise
        yield Sleep(pause_ms / 1000)
        waited_ms += pause_ms
        pause_ms = min(pause_ms * 2, POOL_PAUSE_MAX_MS)


def _told(plan: Plan, told: str, polls: int, waited_ms: float) -> Result:
    """A follower's result from the leader's word alone: ``None``, or its fetch's failure."""
    if told.startswith(RAISED):
        error = told.removeprefix(RAISED)
        failure = FillError(plan.dataset, plan.redis_key, error)
        return Result(
            Outcome.FETCH_ERROR, exception=failure, waited_ms=waited_ms, polls=polls, error=error
        )
    return Result(Outcome.FOLLOWER_HIT, value=None, waited_ms=waited_ms, polls=polls)


def _uncoordinated(plan: Plan, outcome: Outcome, error: str | None = None) -> Steps:
    """Fetch without a lock (legacy, degraded or timed out), then write if Redis lets us."""
    try:
        value, started_ms, delta_ms = yield from _timed_fetch(plan)
    except Exception as exc:
        return Result(Outcome.FETCH_ERROR, exception=exc, led=True, error=type(exc).__name__)
    payload, ttl_ms, unstorable = plan.stored_form(value, started_ms, delta_ms, plan.stamp)
    encode_error = None if unstorable is None else unstorable.partition(":")[0]
    write_error = None
    if payload is not None and plan.redis_ok:
        try:
            written = yield from _ask(
                plan, Command("write", (plan.redis_key, payload, ttl_ms, plan.stamp))
            )
        except Exception as exc:  # from Redis: see the module doc
            write_error = type(exc).__name__
        else:
            refusal = _refusal(written)
            if refusal is not None:  # the outcome says why there was no lock; error, why no write
                return _fetched(outcome, value, None, error or refusal, unstorable)
    # The Redis error that sent this caller here says more than a write refused after it.
    return _fetched(outcome, value, payload, error or encode_error or write_error, unstorable)


def _fetched(
    outcome: Outcome, value: Any, payload: bytes | None, error: str | None, unstorable: str | None
) -> Result:
    """The result of a fetch this caller ran: its value, and the bytes stored for it, if any."""
    return Result(
        outcome,
        value=value,
        led=True,
        payload_bytes=0 if value is None or payload is None else payload_size(payload),
        error=error,
        stored=None if value is None else payload,
        unstorable=unstorable,
    )


def _timed_fetch(plan: Plan) -> Generator[Step, Any, tuple[Any, int, int]]:
    """Call the fetch: ``(value, when it began in wall ms, how long it took in ms)``."""
    started = plan.wall()
    value = yield FETCH
    return value, round(started * 1000), max(0, round((plan.wall() - started) * 1000))


def _refusal(written: Any) -> str | None:
    """Why ``STORE_SCRIPT`` refused a write, or ``None`` if it wrote."""
    reply = written.decode() if isinstance(written, bytes) else str(written)
    return reply if reply in REFUSALS else None


def _write_and_release(
    plan: Plan,
    policy: CacheFill,
    lock: str,
    token: str,
    *,
    payload: bytes | None,
    ttl_ms: int,
    result: str,
    stamp: int = 0,
) -> Generator[Step, Any, tuple[str | None, str | None]]:
    """Write ``payload`` (if any) as of ``stamp``, then release token-safely and wake followers.

    ``result`` is what the wake entry tells the followers; a value whose write
    failed is told as :data:`~memofill.steps.UNSTORED`, so that they do not wait for it, and one
    Redis refused as ``REFUSED``. Returns the errors worth reporting,
    ``(write, release)``: a Redis error or the refusal's reason, or
    :data:`~memofill.steps.LEASE_EXPIRED` when the lock no longer held this caller's token. On a
    release error the lock simply expires after ``lease_ms``. Two round trips,
    on purpose: a pipeline would save one, but with a payload of megabytes it
    measured slower than the two commands sent one after the other.
    """
    write_error = None
    cancelled: asyncio.CancelledError | None = None
    if payload is not None:
        try:
            command = Command("write", (plan.redis_key, payload, ttl_ms, stamp, lock, token))
            written = yield from _ask(plan, command)
        except asyncio.CancelledError as exc:
            # The write may not have landed: followers must not wait for it.
            cancelled, result = exc, CANCELLED
        except Exception as exc:  # from Redis: see the module doc
            write_error = type(exc).__name__
            result = UNSTORED + write_error if result == STORED else result
        else:
            write_error = _refusal(written)
            result = result if write_error is None else REFUSED
    wake_ttl_ms = max(policy.poll_max_ms, 100)
    try:
        released = yield from _ask(
            plan, Command("release", (lock, wake_key(plan.redis_key), token, wake_ttl_ms, result))
        )
    except Exception as exc:  # from Redis: see the module doc
        return write_error, type(exc).__name__
    if cancelled is not None:
        raise cancelled
    return write_error, (None if released else LEASE_EXPIRED)
