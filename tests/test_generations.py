"""Whole-dataset invalidation: the marks a process knows, and the values they reject."""

from __future__ import annotations

from memofill.freshness import EXPIRED, STALE
from memofill.generations import Generations, mark_field


def test_a_value_below_its_datasets_mark_is_rejected_and_one_at_or_above_is_not() -> None:
    generations = Generations(1.0)
    changes: list[None] = []
    generations.on_change = lambda: changes.append(None)
    q = generations.of("q:{s}")  # a function's cell, made before the marks are read
    generations.loaded({b"seq": b"7", b"hard:q:{s}": b"5", b"soft:r": b"7", b"junk": b"x"}, 10.0)
    assert generations.seq == 7
    assert generations.of("q:{s}") is q
    assert (q.hard, q.soft, q.top) == (5, 0, 5)
    assert q.behind(4, serves_stale=True) == EXPIRED
    assert q.behind(None, serves_stale=True) == EXPIRED  # written before headers: older
    assert q.behind(5, serves_stale=False) is None
    r = generations.of("r")
    assert r.behind(6, serves_stale=True) == STALE  # soft: served while one refreshes
    assert r.behind(6, serves_stale=False) == EXPIRED  # no stale window: soft acts as hard
    assert r.behind(7, serves_stale=True) is None
    other = generations.of("other")
    assert other.behind(0, serves_stale=False) is None
    assert other.behind(None, serves_stale=False) is None
    assert len(changes) == 1
    generations.loaded({b"seq": b"7", b"hard:q:{s}": b"5", b"soft:r": b"7"}, 11.0)
    assert len(changes) == 1  # the same marks: nothing to drop


def test_the_hash_is_read_again_after_the_interval_or_when_told() -> None:
    generations = Generations(1.0)
    assert generations.next_check <= 0.0  # before the first call
    generations.loaded({}, 5.0)
    assert generations.next_check > 5.5
    assert generations.next_check <= 6.0
    generations.loaded(None, 6.0)  # Redis did not answer: asked again after the interval
    assert generations.next_check <= 7.0
    generations.expire()
    assert generations.next_check <= 6.1


def test_this_processs_own_invalidation_is_known_at_once() -> None:
    generations = Generations(1.0)
    generations.invalidated("q", 3)
    assert generations.of("q").behind(2, serves_stale=True) == EXPIRED
    generations.invalidated("q", 4, soft=True)
    assert generations.of("q").behind(3, serves_stale=True) == STALE
    assert generations.seq == 4
    assert mark_field("q", soft=False) == "hard:q"
    assert mark_field("q", soft=True) == "soft:q"
