"""The hit path's cost, counted in Python frames rather than timed.

A hit is what a cache does almost all the time, and its whole overhead over a
raw ``GET`` + ``orjson.loads`` is meant to stay within ~2-3 µs. Each Python
function frame entered on it costs ~0.05-0.1 µs, so one more helper on the hit
path is a measurable share of that budget. Timing it in a test would flake on a
busy machine; counting frames does not. Each test here counts the Python frames
(``sys.setprofile`` ``call`` events) entered during one call of an already warm
cached function and fails when memofill's own frames exceed today's count: a
new frame on the hit path has to be a decision, taken by raising the budget
here. Frames outside memofill (redis-py, fakeredis) are counted and printed
(``pytest -rP`` shows them), not asserted: they are not memofill's to keep.

A plain hit must also build no :class:`memofill.CallResult` (only
``call_with_outcome`` needs one).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from types import CodeType, FrameType
from typing import Any

import fakeredis
import pytest

import memofill
from memofill import Dataset, Memofill, NearCache
from tests.support.redis_servers import RedisServer

#: memofill's frames: its own files, and the methods attrs generates for its classes
#: (their file names read ``<attrs generated ... memofill.<module>.<class>>``).
PACKAGE = os.path.dirname(os.path.abspath(memofill.__file__)) + os.sep
CALL_RESULT_INIT = memofill.CallResult.__init__.__code__

PLAIN = {"plain:{name}": Dataset("plain:{name}", ttl_s=60)}
NEAR = {"hot:{name}": Dataset("hot:{name}", ttl_s=60, near_ms=60_000)}

# The budgets: memofill's frames on one hit today, as measured (the same on CPython 3.10 and 3.13).
# Each extra Python frame costs ~0.05-0.1 µs on a hit whose whole overhead budget is
# ~2-3 µs over a raw GET + orjson.loads. Raise a budget only on purpose, with the reason.
#: direct call, lookup, key from the arguments, hit, decode of the stored bytes.
PLAIN_HIT_FRAMES = 5
#: direct call, lookup, key from the arguments, the near copy served.
NEAR_HIT_FRAMES = 4
#: as the plain hit, the lookup being a coroutine.
ASYNC_HIT_FRAMES = 5
#: as the plain hit, and: the tags' fields, one per tag built from the arguments; the read
#: of the value and the marks together (its buffer packed once, its replies put together);
#: the marks read and judged.
TAGGED_HIT_FRAMES = 13
#: A page of hits, whatever its size: the call, its driver, the items listed, the page made
#: and keyed, the marks' check before and after the read, near copies and the breaker,
#: the request, MGET, what it found, the judging loop. (The page's state is one object
#: whose methods both drivers share, which costs three frames a page over two twins.)
PAGE_FRAMES = 16
#: And for each item of the page: its bytes judged (the hit rule), and nothing else.
PAGE_FRAMES_PER_ITEM = 1

#: Hits measured per case; the fewest frames count. A hit refreshes the copy kept for
#: outages once a second and rereads the dataset generations now and then; on a busy
#: machine one of those can fall due between two calls, and that is not the hit's cost.
TRIES = 3


def _is_memofill(code: CodeType) -> bool:
    name = code.co_filename
    return name.startswith(PACKAGE) or (
        name.startswith("<attrs generated") and " memofill." in name
    )


def _name(code: CodeType) -> str:
    qualname = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
    return f"{os.path.basename(code.co_filename)}:{qualname}"


class Frames:
    """The Python frames a profile function saw entered (C functions are not frames)."""

    def __init__(self) -> None:
        self.memofill: list[str] = []
        self.other: list[str] = []
        self.call_results = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        code = frame.f_code
        if code is EXIT:  # the end of the measurement, entered under the profile function
            return
        if code is CALL_RESULT_INIT:
            self.call_results += 1
        (self.memofill if _is_memofill(code) else self.other).append(_name(code))


class Profiled:
    """Counts frames for one call: no garbage collection meanwhile (no finalizer runs in it)."""

    def __enter__(self) -> Frames:
        self.gc_was_on = gc.isenabled()
        gc.disable()
        self.frames = Frames()
        sys.setprofile(self.frames)
        return self.frames

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)
        if self.gc_was_on:
            gc.enable()


EXIT = Profiled.__exit__.__code__


def _count(mf: Memofill, dataset: str, outcome: str) -> int:
    return mf.counters.snapshot().get(dataset, {}).get(outcome, 0)


def _fewest(measured: list[Frames], outcome: str) -> Frames:
    assert measured, f"none of {TRIES} calls was a {outcome}"
    return min(measured, key=lambda frames: len(frames.memofill))


def hit_frames(mf: Memofill, cached: Callable[[str], Any], dataset: str, outcome: str) -> Frames:
    """The frames of the cheapest of :data:`TRIES` calls that were each one ``outcome``."""
    measured = []
    for _ in range(TRIES):
        before = _count(mf, dataset, outcome)
        with Profiled() as frames:
            cached("k")
        if _count(mf, dataset, outcome) == before + 1:
            measured.append(frames)
    return _fewest(measured, outcome)


async def hit_frames_async(
    mf: Memofill, cached: Callable[[str], Awaitable[Any]], dataset: str, outcome: str
) -> Frames:
    """:func:`hit_frames` inside the event loop (the profile function is per thread)."""
    measured = []
    for _ in range(TRIES):
        before = _count(mf, dataset, outcome)
        with Profiled() as frames:
            await cached("k")
        if _count(mf, dataset, outcome) == before + 1:
            measured.append(frames)
    return _fewest(measured, outcome)


def check(frames: Frames, budget: int) -> None:
    print(f"{len(frames.memofill)} memofill frames, {len(frames.other)} other Python frames")
    assert len(frames.memofill) <= budget, (
        f"a hit entered {len(frames.memofill)} memofill frames, over the budget of {budget}: "
        f"{frames.memofill}"
    )
    assert frames.call_results == 0, "a plain hit built a CallResult"


def test_the_profile_function_sees_a_call_result_being_built() -> None:
    # call_with_outcome builds one on every call: proof the check in check() can fail.
    mf = Memofill(fakeredis.FakeRedis(), prefix="budget:", policies=PLAIN)
    plain = mf.cached_dataset("plain:{name}")(lambda name: {"name": name})
    plain("k")
    with Profiled() as frames:
        plain.call_with_outcome("k")
    assert frames.call_results == 1


def test_a_plain_hit_stays_within_its_frame_budget() -> None:
    mf = Memofill(fakeredis.FakeRedis(), prefix="budget:", policies=PLAIN)
    plain = mf.cached_dataset("plain:{name}")(lambda name: {"name": name})
    plain("k")
    plain("k")
    check(hit_frames(mf, plain, "plain:{name}", "hit"), PLAIN_HIT_FRAMES)


async def test_an_asyncio_hit_stays_within_its_frame_budget() -> None:
    mf = Memofill(async_client=fakeredis.FakeAsyncRedis(), prefix="budget:", policies=PLAIN)

    @mf.cached_dataset("plain:{name}")
    async def plain(name: str) -> dict[str, str]:
        return {"name": name}

    await plain("k")
    await plain("k")
    frames = await hit_frames_async(mf, plain, "plain:{name}", "hit")
    check(frames, ASYNC_HIT_FRAMES)


@pytest.mark.redis_server
def test_a_tagged_hit_stays_within_its_frame_budget(redis_server: RedisServer) -> None:
    """One fixed tag and one built from the arguments, on a real client (the read that
    writes both commands at once is the one a tagged hit takes there)."""
    tagged = {"t:{name}": Dataset("t:{name}", ttl_s=60, tags=("user:{name}", "all"))}
    mf = Memofill(redis_server.client(), prefix="budget-tags:", policies=tagged)
    cached = mf.cached_dataset("t:{name}")(lambda name: {"name": name})
    mf.invalidate_tag("user:k")  # a mark to read and pass
    cached("k")
    check(hit_frames(mf, cached, "t:{name}", "hit"), TAGGED_HIT_FRAMES)


@pytest.mark.parametrize("size", [10, 50])
def test_a_page_of_hits_enters_one_frame_per_item(size: int) -> None:
    mf = Memofill(fakeredis.FakeRedis(), prefix="budget:", policies=PLAIN)
    plain = mf.cached_dataset("plain:{name}")(lambda name: {"name": name})
    names = [f"k{index}" for index in range(size)]
    plain.many(names)
    measured = []
    for _ in range(TRIES):
        before = _count(mf, "plain:{name}", "hit")
        with Profiled() as frames:
            assert plain.many(names) == [{"name": name} for name in names]
        if _count(mf, "plain:{name}", "hit") == before + size:
            measured.append(frames)
    check(_fewest(measured, "page of hits"), PAGE_FRAMES + PAGE_FRAMES_PER_ITEM * size)


@pytest.fixture
def near_cache(redis_server: RedisServer) -> Iterator[Memofill]:
    """An instance whose near copies a tracking listener vouches for; stopped at the end."""
    # Heartbeats of 1 s: a busy machine delaying the listener must not stop the copies.
    mf = Memofill(
        redis_server.client(),
        prefix="budget-near:",
        policies=NEAR,
        near=NearCache(heartbeat_ms=1000),
    )
    yield mf
    mf.configure(memofill.NO_CLIENT)  # no client: the listener stops


@pytest.mark.redis_server
def test_a_near_hit_stays_within_its_frame_budget(near_cache: Memofill) -> None:
    hot = near_cache.cached_dataset("hot:{name}")(lambda name: {"name": name})
    deadline = time.monotonic() + 20
    while hot.call_with_outcome("k").outcome != "near_hit":  # the listener is live
        assert time.monotonic() < deadline, "no near hit within 20 s"
        time.sleep(0.01)
    hot("k")
    check(hit_frames(near_cache, hot, "hot:{name}", "near_hit"), NEAR_HIT_FRAMES)
