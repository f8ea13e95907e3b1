"""Whole-dataset invalidation: the marks a process knows, and the values they reject."""

from __future__ import annotations

from memofill.generations import Generations, mark_field


def test_a_value_below_its_datasets_mark_is_rejected_and_one_at_or_above_is_not() -> None:
    generations = Generations(1.0)
    changes: list[None] = []
    generations.on_change = lambda: changes.append(None)
    generations.loaded({b"seq": b"7", b"hard:q:{s}": b"5", b"soft:r": b"7", b"junk": b"x"}, 10.0)
    assert generations.seq == 7
    assert generations.rejects("q:{s}", 4)
    assert generations.rejects("q:{s}", None)  # written before headers: older than any mark
    assert not generations.rejects("q:{s}", 5)
    assert generations.rejects("r", 6)  # soft acts as hard until serve-stale is built
    assert not generations.rejects("other", 0)
    assert not generations.rejects("other", None)
    assert len(changes) == 1
    generations.loaded({b"seq": b"7", b"hard:q:{s}": b"5", b"soft:r": b"7"}, 11.0)
    assert len(changes) == 1  # the same marks: nothing to drop


def test_the_hash_is_read_again_after_the_interval_or_when_told() -> None:
    generations = Generations(1.0)
    assert generations.due(0.0)  # before the first call
    generations.loaded({}, 5.0)
    assert not generations.due(5.5)
    assert generations.due(6.0)
    generations.loaded(None, 6.0)  # Redis did not answer: asked again after the interval
    assert generations.due(7.0)
    generations.expire()
    assert generations.due(6.1)


def test_this_processs_own_invalidation_is_known_at_once() -> None:
    generations = Generations(1.0)
    generations.invalidated("q", 3)
    assert generations.rejects("q", 2)
    assert generations.seq == 3
    assert mark_field("q", soft=False) == "hard:q"
    assert mark_field("q", soft=True) == "soft:q"
