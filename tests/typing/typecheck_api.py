"""What a type checker sees of the public API: checked by ``mypy --strict`` in CI, never run.

Each ``type: ignore[...]`` marks a line that must be an error; mypy's
``warn_unused_ignores`` (part of ``--strict``) fails the check if it is not.
"""

from __future__ import annotations

from typing import Any

import memofill
from memofill import CachedDataset, Dataset, Memofill

cache = Memofill(None, policies={"item:{name}": Dataset("item:{name}", ttl_s=60)})


@cache.cached_dataset("item:{name}")
def fetch(name: str) -> dict[str, int]:
    return {name: 1}


@cache.cached_dataset("item:{name}")
async def fetch_async(name: str) -> dict[str, int]:
    return {name: 1}


class Repository:
    @cache.cached_dataset("item:{name}")
    def item(self, name: str) -> dict[str, int]:
        return {name: 2}


@memofill.cached_dataset("item:{name}")
def fetch_default(name: str) -> list[str]:
    return [name]


@cache.cached_dataset("item:{name}", ignore=("db",))
def fetch_with(db: object, name: str) -> int:
    return 1


@memofill.cached_dataset("item:{name}", ignore=["db"])
def fetch_default_with(db: object, name: str) -> int:
    return 1


cache.cached_dataset("item:{name}", ignore=(1,))  # type: ignore[arg-type]


def uses() -> None:
    wrapper: CachedDataset[[str], dict[str, int]] = fetch
    value: dict[str, int] = wrapper("a")
    key: str = fetch.redis_key("a")
    deleted: int | None = fetch.invalidate(name="a")
    mark: int = fetch.invalidate_dataset(soft=True)
    fresh: dict[str, int] = fetch.refresh("a")
    outcome: Any = fetch.call_with_outcome("a")
    # No typing.cast: the decorated function is a CachedDataset to the type checker, whose
    # methods take the function's own parameters (docs/api.rst says so).
    result: memofill.CallResult[dict[str, int]] = fetch.call_with_outcome("a")
    served: dict[str, int] = result.value
    page: list[dict[str, int]] = fetch.many(["a", "b", {"name": "c"}])
    fetch.call_with_outcome(1)  # type: ignore[arg-type]
    fetch.invalidate(1)  # type: ignore[arg-type]
    fetch(1)  # type: ignore[arg-type]
    fetch.redis_key("a", "b")  # type: ignore[call-arg]
    text: str = fetch("a")  # type: ignore[assignment]

    repository = Repository()
    method_value: dict[str, int] = repository.item("a")
    method_key: str = repository.item.redis_key("a")
    repository.item.invalidate("a")
    repository.item(2)  # type: ignore[arg-type]
    method_result: memofill.CallResult[dict[str, int]] = repository.item.call_with_outcome("a")
    repository.item.call_with_outcome(2)  # type: ignore[arg-type]
    method_mark: int = repository.item.invalidate_dataset()

    default: list[str] = fetch_default("a")
    print(value, key, deleted, mark, fresh, outcome, result, served, text)
    print(method_value, method_key, method_result, method_mark, default, page)


class AsyncRepository:
    @cache.cached_dataset("item:{name}")
    async def item(self, name: str) -> dict[str, int]:
        return {name: 2}


async def uses_async() -> None:
    value: dict[str, int] = await fetch_async("a")
    # A coroutine function's helpers are awaited, and give what a plain function's give.
    deleted: int | None = await fetch_async.invalidate("a")
    mark: int = await fetch_async.invalidate_dataset(soft=True)
    fresh: dict[str, int] = await fetch_async.refresh("a")
    result: memofill.CallResult[dict[str, int]] = await fetch_async.call_with_outcome("a")
    page: list[dict[str, int]] = await fetch_async.many(["a", "b"])
    # A forgotten await is an error (tests/test_typing.py shows what mypy says).
    fetch_async.many(["a"])  # type: ignore[unused-coroutine]
    fetch_async.invalidate("a")  # type: ignore[unused-coroutine]
    fetch_async.invalidate_dataset()  # type: ignore[unused-coroutine]
    fetch_async.refresh("a")  # type: ignore[unused-coroutine]
    fetch_async.call_with_outcome("a")  # type: ignore[unused-coroutine]
    fetch_async.call_with_outcome(1)  # type: ignore[call-overload]
    await fetch.invalidate("a")  # type: ignore[misc]

    repository = AsyncRepository()
    method_value: dict[str, int] = await repository.item("a")
    method_deleted: int | None = await repository.item.invalidate("a")
    method_mark: int = await repository.item.invalidate_dataset()
    method_result: memofill.CallResult[dict[str, int]] = await repository.item.call_with_outcome(
        "a"
    )
    repository.item.invalidate("a")  # type: ignore[unused-coroutine]
    print(value, deleted, mark, fresh, result, method_value, method_deleted, method_mark)
    print(method_result, page)


def configures_refresh() -> None:
    memofill.configure(refresh="inline", refresh_workers=2)
    Memofill(None, refresh="background", refresh_workers=4)
    Memofill(None, refresh="later")  # type: ignore[arg-type]
    stale = Dataset(
        "news:{lang}",
        ttl_s=60,
        stale_s=30,
        stale_if_error_s=300,
        cache_fill=memofill.CacheFill(
            2_500, 2_000, 25, 500, early_beta=1.0, refresh_retry_ms=5_000
        ),
    )
    print(stale.window_s)


def uses_metrics(cache: memofill.Memofill) -> None:
    from memofill.contrib.otel import instrument  # noqa: PLC0415  # the extras, if installed
    from memofill.contrib.prometheus import MemofillCollector  # noqa: PLC0415
    from memofill.outcomes import MissRecord  # noqa: PLC0415

    def slow_misses(record: MissRecord) -> None:
        print(record.dataset, record.fetch_ms)

    stop = cache.events.subscribe(slow_misses)
    stop()
    collector = MemofillCollector(cache)
    handle = instrument(cache)
    handle.uninstrument()
    print(list(collector.collect()))
