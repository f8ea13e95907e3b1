"""Invalidation marks as one process knows them, and the values they reject."""

from __future__ import annotations

from memofill.freshness import EXPIRED, STALE
from memofill.generations import Generations, mark_field


def hash_reply(clock: int, version: str, **fields: int | str) -> list[object]:
    """What READ_META_SCRIPT returns when the version changed: the hash as a flat list."""
    flat: list[object] = []
    for name, value in fields.items():
        flat += [name.replace("__", ":").encode(), str(value).encode()]
    return [str(clock).encode(), version.encode(), flat]


def test_a_value_stamped_at_or_before_its_datasets_mark_is_rejected_and_after_it_is_not() -> None:
    generations = Generations(1.0)
    changes: list[None] = []
    generations.on_change = lambda: changes.append(None)
    q = generations.of("q")  # a function's cell, made before the marks are read
    reply = hash_reply(100, "1:2", born=1, v=2, hard__q=50, soft__r=70, junk="x")
    generations.loaded(reply, now=10.0)
    assert generations.of("q") is q
    assert (q.hard, q.soft, q.top, q.explicit) == (50, 0, 50, True)
    assert q.behind(49, serves_stale=True) == EXPIRED
    assert q.behind(50, serves_stale=True) == EXPIRED  # the same µs: not after it
    assert q.behind(None, serves_stale=True) == EXPIRED  # no stamp, and the dataset has a mark
    assert q.behind(51, serves_stale=False) is None
    r = generations.of("r")
    assert r.behind(60, serves_stale=True) == STALE  # soft: served while one refreshes
    assert r.behind(60, serves_stale=False) == EXPIRED  # no stale window: soft acts as hard
    assert r.behind(71, serves_stale=True) is None
    other = generations.of("other")
    assert other.behind(1, serves_stale=False) == EXPIRED  # not after the hash was born
    assert other.behind(2, serves_stale=False) is None
    assert other.behind(None, serves_stale=False) is None  # never invalidated: no stamp needed
    assert len(changes) == 1
    generations.loaded([b"101", b"1:2"], now=11.0)  # the version known: no hash sent
    assert len(changes) == 1
    assert generations.clock_us == 101


def test_losing_the_marks_makes_values_less_servable_never_more() -> None:
    generations = Generations(1.0)
    q = generations.of("q")
    generations.loaded(hash_reply(100, "1:1", born=1, v=1, hard__q=50), now=1.0)
    # The hash was deleted (or Redis restarted) and born again at 200, without q's mark.
    generations.loaded(hash_reply(210, "200:0", born=200), now=2.0)
    assert q.hard == 200  # every value stamped before the rebirth is behind
    assert q.explicit  # and bytes without a stamp stay behind the mark once known
    assert q.behind(150, serves_stale=True) == EXPIRED
    assert q.behind(201, serves_stale=True) is None
    # An older hash read again (a replica behind, a restored snapshot) moves nothing back.
    generations.loaded(hash_reply(220, "1:1", born=1, v=1, hard__q=50), now=3.0)
    assert q.hard == 200
    assert generations.of("new").hard == 200  # a cell made later starts at the birth too


def test_a_fill_without_the_lock_stamps_one_us_past_the_clock_it_read() -> None:
    generations = Generations(1.0)
    assert generations.stamp() == 0  # no clock read: a write with it is refused as old
    generations.loaded(hash_reply(100, "100:0", born=100), now=1.0)
    assert generations.stamp() == 101  # after the born it read
    generations.heard_clock(500)  # an invalidate() of a key in this process
    assert generations.stamp() == 501
    generations.loaded([b"300", b"100:0"], now=2.0)
    assert generations.stamp() == 501  # the clock never goes back


def test_the_hash_is_read_again_after_the_interval_or_when_told() -> None:
    generations = Generations(1.0)
    assert generations.next_check <= 0.0  # before the first call
    generations.loaded(hash_reply(1, "1:0", born=1), now=5.0)
    assert generations.next_check > 5.5
    assert generations.next_check <= 6.0
    generations.loaded(None, now=6.0)  # Redis did not answer: asked again after the interval
    assert generations.next_check <= 7.0
    generations.loaded(None, "NoPermissionError", now=7.0)
    assert generations.unread == "NoPermissionError"
    generations.expire()
    assert generations.next_check <= 7.1


def test_this_processs_own_invalidation_is_known_at_once() -> None:
    generations = Generations(1.0)
    generations.invalidated("q", 300)
    assert generations.of("q").behind(300, serves_stale=True) == EXPIRED
    assert generations.of("q").behind(301, serves_stale=True) is None
    generations.invalidated("q", 400, soft=True)
    assert generations.of("q").behind(350, serves_stale=True) == STALE
    assert generations.clock_us == 400
    assert mark_field("q", soft=False) == "hard:q"
    assert mark_field("q", soft=True) == "soft:q"
