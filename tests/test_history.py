"""A randomized history of calls, refreshes and invalidations under Redis faults, then checked.

``test_a_random_history_keeps_the_consistency_guarantees`` runs a few processes
that call, refresh and invalidate a few keys of three datasets at random while a
nemesis restarts, pauses and kills the cache server and deletes its ``#meta``
hash, then checks the merged history against docs/SPEC.md §6 (see
tests/support/history.py for the rules). The other tests check the checker on
small hand-made histories.

Replay a run, or run longer::

    MEMOFILL_HISTORY_SEED=1234 MEMOFILL_HISTORY_SECONDS=60 \\
        python -m pytest tests/test_history.py -m history

``MEMOFILL_HISTORY_FAULTS`` picks the nemesis's faults (``pause,kill``, or
``none`` for a run without faults). ``MEMOFILL_HISTORY_STRICT_OUTAGE=1`` also
asserts what is otherwise only counted: no outage copy served after another
process's invalidation.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis

from memofill.errors import FillError
from tests.support.fault_helpers import note
from tests.support.history import (
    FAULTS,
    Bounds,
    Op,
    OriginFailure,
    Plan,
    Recorder,
    Run,
    check,
    error_type,
    load,
    report,
    run,
)
from tests.support.redis_servers import running_server

pytestmark = pytest.mark.history

SEED = os.environ.get("MEMOFILL_HISTORY_SEED")
SECONDS = float(os.environ.get("MEMOFILL_HISTORY_SECONDS") or 6)
FAULTS_CHOSEN = os.environ.get("MEMOFILL_HISTORY_FAULTS")
STRICT_OUTAGE = os.environ.get("MEMOFILL_HISTORY_STRICT_OUTAGE") == "1"


def chosen_faults() -> tuple[str, ...]:
    if FAULTS_CHOSEN is None:
        return FAULTS
    faults = tuple(f for f in FAULTS_CHOSEN.replace(" ", "").split(",") if f and f != "none")
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"MEMOFILL_HISTORY_FAULTS: unknown {sorted(unknown)}, known {FAULTS}")
    return faults


@pytest.mark.redis_server
@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 120)
def test_a_random_history_keeps_the_consistency_guarantees(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    seed = int(SEED) if SEED else random.SystemRandom().randrange(1, 1_000_000)
    with running_server() as data, running_server() as counter:
        plan = Plan(
            seed=seed,
            seconds=SECONDS,
            data_port=data.port,
            counter_port=counter.port,
            directory=str(tmp_path / "history"),
            faults=chosen_faults(),
        )
        result = run(plan, data)
    verdict = check(result.ops, Bounds.of(plan, strict_outage=STRICT_OUTAGE))
    text = report(result, verdict)
    print(text)  # shown with -s, and on failure
    note(request, "seed", seed)
    note(request, "wall_s", round(result.wall_s, 1))
    note(request, "stats", verdict.stats)
    assert not result.unfinished, text
    assert not verdict.violations, text


# --- the checker, on hand-made histories ---------------------------------------------------

DATASET = "d:{k}"
OTHER = "e:{k}"
BOUNDS = Bounds(meta_check_s=0.1, windows={DATASET: 60.0, OTHER: 60.0})


def value(n: int, fetch_start: float, dataset: str = DATASET, key: str = "a") -> dict[str, Any]:
    return {"dataset": dataset, "key": key, "fetch_start": fetch_start, "n": n, "pid": 1}


def call(
    start: float,
    end: float,
    got: dict[str, Any] | None = None,
    *,
    process: str = "p0",
    key: str = "a",
    dataset: str = DATASET,
    outcome: str = "hit",
    kind: str = "call",
    raised: BaseException | None = None,
) -> Op:
    if raised is not None:
        return Op(
            process, 0, kind, start, end, dataset, key, ok=False,
            error=f"{error_type(raised)}: {raised}", error_type=error_type(raised),
        )  # fmt: skip
    return Op(process, 0, kind, start, end, dataset, key, value=got, outcome=outcome)


def invalidate(
    start: float,
    end: float,
    *,
    process: str = "p1",
    key: str | None = "a",
    dataset: str = DATASET,
    ok: bool = True,
) -> Op:
    kind = "invalidate" if key is not None else "invalidate_dataset"
    return Op(process, 1, kind, start, end, dataset, key, ok=ok)


def rules(ops: list[Op]) -> list[str]:
    return [violation.rule for violation in check(ops, BOUNDS).violations]


def test_a_clean_history_has_no_violation() -> None:
    old, new = value(1, 0.95), value(2, 1.25)
    ops = [
        call(0.9, 1.1, old, outcome="leader_fill"),
        call(1.0, 1.15, old, process="p2", outcome="follower_hit"),
        invalidate(1.12, 1.13),
        # Started before the invalidation ended: the old value is still allowed.
        call(1.125, 1.14, old, process="p2"),
        call(1.2, 1.4, new, outcome="leader_fill"),
        call(1.5, 1.51, new, process="p2"),
        call(1.6, 1.7, raised=OriginFailure("origin call 3 failed"), outcome="fetch_error"),
        call(1.6, 1.7, process="p2", raised=_fill_error()),
    ]
    verdict = check(ops, BOUNDS)
    assert verdict.violations == []
    assert verdict.stats["reads_after_an_invalidation"] == 2
    assert verdict.stats["origin_values_served"] == 2


def _fill_error() -> BaseException:
    return FillError(DATASET, "hist:d:a", "tests.support.history.OriginFailure")


def test_a_value_fetched_before_a_key_invalidation_is_a_violation_when_served_after_it() -> None:
    old = value(1, 0.95)
    ops = [
        call(0.9, 1.1, old, outcome="leader_fill"),
        invalidate(1.12, 1.13),
        call(1.2, 1.21, old, process="p2"),
    ]
    verdict = check(ops, BOUNDS)
    assert [v.rule for v in verdict.violations] == ["invalidated-value-served"]
    violation = verdict.violations[0]
    assert violation.op is ops[2]
    assert violation.cause is ops[1]
    assert "170.0 ms before" in violation.detail


def test_another_key_or_dataset_is_not_concerned_by_an_invalidation() -> None:
    ops = [
        invalidate(1.12, 1.13, key="b"),
        invalidate(1.12, 1.13, key=None, dataset=OTHER),
        call(1.2, 1.21, value(1, 0.95)),
    ]
    assert rules(ops) == []


def test_the_checker_picks_the_latest_invalidation_that_had_ended() -> None:
    # The value was fetched between two invalidations: only the second one rejects it.
    between = value(1, 1.05)
    ops = [
        invalidate(1.0, 1.01),
        call(1.2, 1.21, between),
        invalidate(1.3, 1.31),
        call(1.4, 1.41, between),
    ]
    verdict = check(ops, BOUNDS)
    assert [(v.op, v.cause) for v in verdict.violations] == [(ops[3], ops[2])]


def test_a_dataset_invalidation_reaches_other_processes_within_meta_check_ms() -> None:
    old = value(1, 0.95)
    inv = invalidate(1.0, 1.01, key=None, process="p1")
    within = call(1.1, 1.11, old, process="p0")  # 90 ms after: allowed
    past = call(1.12, 1.13, old, process="p0")  # 110 ms after: not
    own = call(1.02, 1.03, old, process="p1")  # the invalidating process knows at once
    verdict = check([inv, within, past, own], BOUNDS)
    assert {v.op for v in verdict.violations} == {past, own}
    assert all(v.cause is inv for v in verdict.violations)


def test_an_outage_copy_after_another_process_invalidated_is_counted_unless_strict() -> None:
    old = value(1, 0.95)
    remote = invalidate(1.0, 1.01, process="p1")
    outage = call(1.2, 1.21, old, process="p0", outcome="fallback_hit")
    verdict = check([remote, outage], BOUNDS)
    assert verdict.violations == []
    assert [(n.kind, n.op, n.other) for n in verdict.notes] == [
        ("outage-copy-after-remote-invalidation", outage, remote)
    ]
    assert verdict.stats["outage-copy-after-remote-invalidation"] == {"fallback_hit": 1}
    strict = attrs.evolve(BOUNDS, strict_outage=True)
    assert [v.cause for v in check([remote, outage], strict).violations] == [remote]
    # Its own process's invalidations, of the key or the dataset, it knows: always asserted.
    for own in (invalidate(1.0, 1.01, process="p0"), invalidate(1.0, 1.01, process="p0", key=None)):
        found = check([remote, own, outage], BOUNDS)
        assert [v.cause for v in found.violations] == [own]
        assert found.notes == []


def test_a_failed_invalidation_proves_nothing() -> None:
    ops = [invalidate(1.0, 1.01, ok=False), call(1.2, 1.21, value(1, 0.95))]
    assert rules(ops) == []


def test_a_value_whose_fetch_began_during_the_invalidation_is_allowed() -> None:
    ops = [invalidate(1.0, 1.02), call(1.1, 1.11, value(1, 1.001))]
    assert rules(ops) == []
    # The slack on clock reads: a fetch start 4 ms before the invalidation's start passes,
    # 6 ms does not.
    assert rules([invalidate(1.0, 1.02), call(1.1, 1.11, value(1, 0.996))]) == []
    assert rules([invalidate(1.0, 1.02), call(1.1, 1.11, value(1, 0.994))]) == [
        "invalidated-value-served"
    ]


def test_a_refresh_is_a_read_too() -> None:
    ops = [invalidate(1.0, 1.01), call(1.1, 1.3, value(1, 0.9), kind="refresh", outcome="")]
    assert rules(ops) == ["invalidated-value-served"]


def test_a_redis_exception_reaching_a_caller_is_a_violation() -> None:
    ops = [
        call(1.0, 1.3, raised=redis.ConnectionError("Connection refused")),
        call(1.0, 1.3, raised=redis.TimeoutError("Timeout reading"), kind="refresh"),
        # A FillError must name the origin's own failure, not a Redis error of another process.
        call(1.0, 1.3, raised=FillError(DATASET, "hist:d:a", "ConnectionError")),
        # An invalidation may fail: its caller must know.
        Op("p1", 0, "invalidate", 1.0, 1.3, DATASET, "a", ok=False, error_type="x.Y"),
    ]
    assert rules(ops) == ["redis-error-reached-caller"] * 3


def test_a_value_of_another_key_or_none_is_a_violation() -> None:
    ops = [
        call(1.0, 1.1, value(1, 0.95, key="b")),
        call(1.0, 1.1, value(2, 0.95, dataset=OTHER)),
        call(1.0, 1.1, None),
    ]
    assert rules(ops) == ["wrong-value"] * 3


def test_going_back_in_time_and_overrunning_a_window_are_counted_not_asserted() -> None:
    old, new = value(1, 0.9), value(2, 1.0)
    ops = [
        call(1.0, 1.2, new, outcome="leader_fill"),
        call(1.3, 1.31, old, outcome="fallback_hit", process="p2"),
        call(61.1, 61.11, new),
    ]
    verdict = check(ops, BOUNDS)
    assert verdict.violations == []
    assert verdict.stats["regression"] == {"fallback_hit": 1}
    assert verdict.stats["past-window"] == {"hit": 1}
    assert [(note.kind, note.op, note.other) for note in verdict.notes] == [
        ("regression", ops[1], ops[0]),
        ("past-window", ops[2], None),
    ]


def test_an_older_value_read_from_redis_after_a_newer_one_is_told_apart() -> None:
    old, new = value(1, 0.9), value(2, 1.0)
    newer = call(1.0, 1.2, new, outcome="follower_hit")
    older = call(1.3, 1.31, old, process="p2")
    verdict = check([newer, older], BOUNDS)
    assert verdict.violations == []
    assert [(n.kind, n.op, n.other) for n in verdict.notes] == [
        ("regression", older, newer),
        ("regression-in-redis", older, newer),
    ]
    # Unless Redis lost everything in between.
    kill = Op("nemesis", -1, "nemesis", 1.22, 1.25, fault="kill")
    assert [n.kind for n in check([newer, kill, older], BOUNDS).notes] == ["regression"]


def test_the_report_names_the_seed_the_replay_and_the_operations(tmp_path: Path) -> None:
    old = value(7, 0.95)
    fill = call(0.9, 1.1, old, outcome="leader_fill")
    inv = invalidate(1.12, 1.13)
    late = call(1.2, 1.21, old, process="p2")
    fault = Op("nemesis", -1, "nemesis", 1.0, 1.05, fault="pause")
    plan = Plan(
        seed=4242, seconds=3, data_port=1, counter_port=2, directory=str(tmp_path)
    )  # fmt: skip
    result = Run(plan, [fill, fault, inv, late], {}, 3.0)
    text = report(result, check(result.ops, BOUNDS))
    assert "seed 4242: 1 violations" in text
    assert "MEMOFILL_HISTORY_SEED=4242 MEMOFILL_HISTORY_SECONDS=3" in text
    assert "invalidated-value-served: 1" in text
    assert "p2/t0 call d:{k} a [    300.0 ..     310.0] ms -> value n=7" in text
    assert "after p1/t1 invalidate d:{k} a [    220.0 ..     230.0] ms" in text
    assert "first returned by p0/t0 call" in text
    assert "meanwhile nemesis pause" in text
    only_kills = attrs.evolve(plan, faults=("kill",))
    text = report(attrs.evolve(result, plan=only_kills), check(result.ops, BOUNDS))
    assert "MEMOFILL_HISTORY_SECONDS=3 MEMOFILL_HISTORY_FAULTS=kill python -m pytest" in text


def test_histories_round_trip_through_their_files(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "p0.jsonl")
    second = call(2.0, 2.1, value(1, 1.95))
    first = Op("p0", 0, "call", 1.0, 1.1, DATASET, "a", value=value(1, 0.95), outcome="hit",
               records=({"outcome": "leader_fill", "redis_key": "x", "error": None},))  # fmt: skip
    recorder.write(second)
    recorder.write(first)
    recorder.close()
    (tmp_path / "nemesis.jsonl").write_bytes(b"")
    loaded = load(tmp_path)
    assert [op.start for op in loaded] == [1.0, 2.0]
    assert loaded[0].records == first.records
    assert loaded[1].value == second.value
    assert loaded[1].fetch_start == 1.95
