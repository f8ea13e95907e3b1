"""Configuration that composes, finds its policies by one rule, and changes atomically under load.

Each test here states one finding of wiring memofill into real services: the
configuration a call sees, where the policies come from, caching off or
forced, and reconfiguring while calls are in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.exceptions import NoPermissionError

import memofill
from memofill import NO_CLIENT, ConfigurationError, Dataset, Memofill
from memofill.codegen import render
from memofill.testing import stored_payload
from registry import DATASETS
from tests.conftest import POLICIES
from tests.support.redis_servers import RedisServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def sync_client(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


def async_client(server: fakeredis.FakeServer) -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis(server=server)


class Origin:
    """Counts its calls and returns a new value each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, name: str) -> str:
        self.calls += 1
        return f"{name}-{self.calls}"


# --- the public surface ------------------------------------------------------------------


def test_exported_members_are_pinned() -> None:
    assert memofill.__all__ == [
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
    assert all(hasattr(memofill, name) for name in memofill.__all__)


def test_default_instance_is_the_one_configure_and_cached_dataset_use() -> None:
    default = memofill.default_instance()
    assert isinstance(default, Memofill)
    with default.override():
        assert memofill.configure(prefix="d:") is default
        assert default.prefix == "d:"


# --- configure() changes what it is given ------------------------------------------------


def test_an_asyncio_client_given_later_keeps_the_blocking_one(
    server: fakeredis.FakeServer,
) -> None:
    mf = Memofill(sync_client(server), policies=POLICIES)
    fetch = mf.cached_dataset("item:{name}")(Origin())
    mf.configure(async_client=async_client(server))
    assert fetch("a") == "a-1"
    assert stored_payload(sync_client(server).get("item:a")) == b'"a-1"'


def test_a_prefix_given_later_keeps_the_clients_and_policies(
    server: fakeredis.FakeServer,
) -> None:
    mf = Memofill(sync_client(server), policies=POLICIES)
    fetch = mf.cached_dataset("item:{name}")(Origin())
    mf.configure(prefix="p:")
    assert fetch("a") == "a-1"
    assert stored_payload(sync_client(server).get("p:item:a")) == b'"a-1"'
    assert fetch.dataset is POLICIES["item:{name}"]


def test_no_client_removes_only_the_client_of_its_kind(server: fakeredis.FakeServer) -> None:
    mf = Memofill(sync_client(server), async_client=async_client(server), policies=POLICIES)
    mf.configure(async_client=NO_CLIENT)
    assert mf.commands_for(False) is not None
    with pytest.raises(ConfigurationError, match="needs an asyncio Redis client"):
        mf.commands_for(True)
    mf.configure(client=NO_CLIENT)
    assert mf.commands_for(False) is None
    assert mf.commands_for(True) is None


def test_the_registry_list_of_datasets_is_accepted_and_validated() -> None:
    mf = Memofill(policies=DATASETS)
    assert set(mf.policies) == {dataset.key for dataset in DATASETS}
    with pytest.raises(memofill.RegistryError, match="ttl_s"):
        Memofill(policies=[Dataset("bad:v1", ttl_s=0)]).policies  # noqa: B018
    with pytest.raises(TypeError, match="policies must be a module"):
        Memofill(policies=42).policies  # type: ignore[arg-type]  # noqa: B018


# --- where the policies come from --------------------------------------------------------


def _project(directory: Path, out: str, ttl_s: int) -> Path:
    """A project whose pyproject names ``out``, generated with one dataset of ``ttl_s``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(f'[tool.memofill]\nout = "{out}"\n')
    path = directory / out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render([Dataset("own:v1", ttl_s=ttl_s)], "registry.py"))
    return path


def test_the_out_of_the_project_is_loaded_from_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _project(tmp_path, "src/app/policies.py", ttl_s=7)
    (tmp_path / "src" / "app" / "deep").mkdir()
    monkeypatch.chdir(tmp_path / "src" / "app" / "deep")  # found from below, as ruff finds it
    monkeypatch.delenv("MEMOFILL_POLICIES", raising=False)
    assert Memofill().policy("own:v1").ttl_s == 7


def test_a_package_named_gen_elsewhere_cannot_stand_in_for_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _project(tmp_path / "project", "gen/cache_fill_registry.py", ttl_s=7)
    installed = tmp_path / "site" / "gen"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    (installed / "cache_fill_registry.py").write_text(
        render([Dataset("theirs:v1", ttl_s=1)], "registry.py")
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.delenv("MEMOFILL_POLICIES", raising=False)
    assert set(Memofill().policies) == {"own:v1"}


def test_the_environment_comes_before_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _project(tmp_path, "gen/cache_fill_registry.py", ttl_s=7)
    other = tmp_path / "elsewhere.py"
    other.write_text(render([Dataset("env:v1", ttl_s=3)], "registry.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMOFILL_POLICIES", str(other))
    assert set(Memofill().policies) == {"env:v1"}
    monkeypatch.setenv("MEMOFILL_POLICIES", "no_such_policy_module")
    with pytest.raises(ConfigurationError, match=r"\$MEMOFILL_POLICIES=no_such_policy_module"):
        Memofill().policies  # noqa: B018
    # policies= comes first of all
    assert set(Memofill(policies=POLICIES).policies) == set(POLICIES)


def test_the_environment_is_a_path_by_its_form_and_not_set_when_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _project(tmp_path, "gen/cache_fill_registry.py", ttl_s=7)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "env.py").write_text(render([Dataset("env:v1", ttl_s=3)], "r.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMOFILL_POLICIES", "")
    assert set(Memofill().policies) == {"own:v1"}  # empty: not set, the project's out loads
    monkeypatch.setenv("MEMOFILL_POLICIES", "policies/env.py")  # relative to the current directory
    assert set(Memofill().policies) == {"env:v1"}
    monkeypatch.setenv("MEMOFILL_POLICIES", "policies/env")  # a separator: a path, not a module
    with pytest.raises(ConfigurationError, match=r"\(policies/env: no such file\)"):
        Memofill().policies  # noqa: B018


def test_the_run_time_refuses_an_unknown_key_and_warns_once_of_a_misspelt_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.memofill]\nout = "gen/p.py"\npolicies = "gen/p.py"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEMOFILL_POLICIES", raising=False)
    with pytest.raises(ConfigurationError) as failure:
        Memofill().policies  # noqa: B018
    assert (
        f"{pyproject}: [tool.memofill] has an unknown key 'policies'; "
        "known keys: out, prefix, registry, url"
    ) in str(failure.value)
    _project(tmp_path, "gen/p.py", ttl_s=7)
    pyproject.write_text(pyproject.read_text() + '[tool.memofil]\nout = "other.py"\n')
    with caplog.at_level(logging.WARNING, "memofill"):
        assert Memofill().policy("own:v1").ttl_s == 7
        assert Memofill().policy("own:v1").ttl_s == 7
    [warning] = [r for r in caplog.records if "[tool.memofil]" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == (
        f"{pyproject}: [tool.memofil] is not read by memofill (its table is [tool.memofill], "
        "with the keys out, prefix, registry, url): rename it, or memofill ignores its settings"
    )


def test_a_missing_out_lists_every_place_looked_and_falls_through_to_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _project(tmp_path, "gen/cache_fill_registry.py", ttl_s=7)
    path.unlink()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEMOFILL_POLICIES", raising=False)
    with pytest.raises(ConfigurationError) as failure:
        Memofill().policies  # noqa: B018
    message = str(failure.value)
    assert "policies= (not given)" in message
    assert "$MEMOFILL_POLICIES (not set)" in message
    assert f"[tool.memofill] out of {tmp_path / 'pyproject.toml'}" in message
    assert "memofill gen" in message
    assert "gen.cache_fill_registry" not in message, "a missing out never loads another module"


# --- without a client; caching off; refresh ----------------------------------------------


def test_no_client_logs_one_warning_per_process_naming_the_function(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import logging
        import memofill
        from memofill import Dataset

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        mf = memofill.Memofill(policies={"a:{n}": Dataset("a:{n}", ttl_s=60)})

        @mf.cached_dataset("a:{n}")
        def first_function(n):
            return n

        @mf.cached_dataset("a:{n}")
        def second_function(n):
            return n

        for n in range(3):
            first_function(n)
            second_function(n + 10)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr
    assert "first_function" in warnings[0]
    assert "no Redis client" in warnings[0]
    assert "memofill.configure(client=" in warnings[0]


class _RefusingRedis(fakeredis.FakeRedis):
    """A client whose ACL user may read but not lock or write."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if str(args[0]).upper() != "GET":
            raise NoPermissionError("this user has no permissions to run this command")
        return super().execute_command(*args, **options)


def test_a_refusal_by_acl_is_logged_once_per_client_configured(
    server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    mf = Memofill(_RefusingRedis(server=server), prefix="t:", policies=POLICIES)
    fetch = mf.cached_dataset("item:{name}")(Origin())

    def refusals() -> list[str]:
        told = (r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        return [message for message in told if "invalidation marks" not in message]

    with caplog.at_level(logging.INFO, "memofill"):
        assert (fetch("a"), fetch("b")) == ("a-1", "b-2")  # the origin serves, uncoordinated
        assert len(refusals()) == 1
        assert "grant it: " in refusals()[0]
        mf.configure(_RefusingRedis(server=server))  # another client may have other rights
        fetch("c")
        fetch("d")
    assert len(refusals()) == 2


def test_memofill_disabled_sends_every_call_to_the_function(
    server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMOFILL_DISABLED", "1")
    mf = Memofill(sync_client(server), policies=POLICIES)
    origin = Origin()
    fetch = mf.cached_dataset("item:{name}")(origin)
    assert [fetch("a"), fetch("a")] == ["a-1", "a-2"]
    assert fetch.call_with_outcome("a").outcome == "disabled"
    assert mf.counters.snapshot() == {"item:{name}": {"disabled": 3}}
    assert sync_client(server).keys() == []
    monkeypatch.setenv("MEMOFILL_DISABLED", "0")
    mf.configure()  # read again at configure()
    assert fetch("a") == fetch("a") == "a-4"
    monkeypatch.setenv("MEMOFILL_DISABLED", "maybe")
    with pytest.raises(ConfigurationError, match="MEMOFILL_DISABLED='maybe'"):
        mf.configure()


def test_a_disabled_block_bypasses_only_its_own_thread(server: fakeredis.FakeServer) -> None:
    mf = Memofill(sync_client(server), policies=POLICIES)
    origin = Origin()
    fetch = mf.cached_dataset("item:{name}")(origin)
    assert fetch("a") == "a-1"
    inside, outside = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def other_thread() -> None:
        inside.wait(10)
        seen["other"] = fetch("a")
        outside.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with memofill.disabled():
        inside.set()
        assert outside.wait(10)
        seen["blocked"] = fetch("a")
    thread.join()
    assert seen == {"other": "a-1", "blocked": "a-2"}
    assert fetch("a") == "a-1"  # the block wrote nothing
    assert mf.counters.snapshot()["item:{name}"]["disabled"] == 1


async def test_a_disabled_block_bypasses_only_its_own_task(server: fakeredis.FakeServer) -> None:
    mf = Memofill(async_client=async_client(server), policies=POLICIES)
    calls = 0

    @mf.cached_dataset("item:{name}")
    async def fetch(name: str) -> str:
        nonlocal calls
        calls += 1
        return f"{name}-{calls}"

    assert await fetch("a") == "a-1"
    entered = asyncio.Event()

    async def bypassing() -> str:
        with memofill.disabled():
            entered.set()
            await asyncio.sleep(0.01)
            return await fetch("a")

    async def caching() -> str:
        await entered.wait()
        return await fetch("a")

    assert await asyncio.gather(bypassing(), caching()) == ["a-2", "a-1"]
    result = await fetch.call_with_outcome("a")
    assert (result.value, result.outcome) == ("a-1", "hit")


def test_refresh_fetches_over_a_present_value_and_stores_it(
    server: fakeredis.FakeServer,
) -> None:
    mf = Memofill(sync_client(server), policies=POLICIES)
    origin = Origin()
    fetch = mf.cached_dataset("item:{name}")(origin)
    assert fetch("a") == "a-1"
    assert fetch.refresh("a") == "a-2"
    assert fetch("a") == "a-2"
    assert stored_payload(sync_client(server).get("item:a")) == b'"a-2"'
    assert sync_client(server).keys("*lock*") == []  # released
    counts = mf.counters.snapshot()["item:{name}"]
    assert counts == {"leader_fill": 1, "forced_fill": 1, "hit": 1}


async def test_refresh_of_a_coroutine_function_is_awaitable(server: fakeredis.FakeServer) -> None:
    mf = Memofill(async_client=async_client(server), policies=POLICIES)
    calls = 0

    @mf.cached_dataset("item:{name}")
    async def fetch(name: str) -> str:
        nonlocal calls
        calls += 1
        return f"{name}-{calls}"

    assert await fetch("a") == "a-1"
    assert await fetch.refresh("a") == "a-2"
    assert await fetch("a") == "a-2"


def test_refresh_waits_for_the_fill_in_flight_rather_than_the_old_value(
    server: fakeredis.FakeServer,
) -> None:
    """A refresh that finds the lock held takes that fill's value, not the one it replaces."""
    mf = Memofill(sync_client(server), policies=POLICIES)
    other = Memofill(sync_client(server), policies=POLICIES)  # another process
    release = threading.Event()
    started = threading.Event()

    def slow(name: str) -> str:
        started.set()
        release.wait(10)
        return "new"

    fetch = mf.cached_dataset("item:{name}")(lambda name: "unused")
    elsewhere = other.cached_dataset("item:{name}")(slow)
    sync_client(server).set("item:a", b'"old"')
    leader = threading.Thread(target=elsewhere.refresh, args=("a",))
    leader.start()
    assert started.wait(10)
    timer = threading.Timer(0.2, release.set)
    timer.start()
    assert fetch.refresh("a") == "new"
    leader.join()
    timer.join()


# --- reconfiguring while calls are in flight ---------------------------------------------


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter allows, so races show on every run."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def _hammer(call: Callable[[int], object], stop: threading.Event) -> Callable[[], list[Any]]:
    """Four threads call ``call`` with new arguments until ``stop``; returns a join.

    The join waits for the threads and returns their errors; each thread made calls.
    """
    errors: list[Any] = []
    counts = [0] * 4

    def run(index: int) -> None:
        n = index * 10_000_000
        while not stop.is_set():
            n += 1
            try:
                call(n)
            except Exception as exc:  # the test counts every one
                errors.append(exc)
            counts[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()

    def join() -> list[Any]:
        stop.set()
        for thread in threads:
            thread.join(30)
        assert all(counts), counts
        return errors

    return join


@pytest.mark.redis_server
def test_configure_during_calls_pairs_each_prefix_with_its_client(
    redis_server: RedisServer, fast_switching: None
) -> None:
    own = RedisServer().start()
    try:
        first, second = redis_server.client(), own.client()
        tag = uuid.uuid4().hex[:8]
        a, b = f"A{tag}:", f"B{tag}:"
        mf = Memofill(first, prefix=a, policies=POLICIES)
        fetch = mf.cached_dataset("plain:{name}")(lambda name: name)
        stop = threading.Event()
        join = _hammer(lambda n: fetch(str(n)), stop)
        for round_ in range(100):
            if round_ % 2:
                mf.configure(first, prefix=a)
            else:
                mf.configure(second, prefix=b)
        assert join() == []
        on_first = [k.decode() for k in first.scan_iter(match=f"*{tag}:*", count=1000)]
        on_second = [k.decode() for k in second.scan_iter(match=f"*{tag}:*", count=1000)]
        assert on_first, "the first client was written"
        assert all(key.startswith(a) for key in on_first), [k for k in on_first if k[0] != "A"]
        assert all(key.startswith(b) for key in on_second), [k for k in on_second if k[0] != "B"]
    finally:
        own.close()


def test_override_while_calls_run_raises_nothing(
    server: fakeredis.FakeServer, fast_switching: None
) -> None:
    base, inner = sync_client(server), sync_client(fakeredis.FakeServer())
    mf = Memofill(base, prefix="base:", policies=POLICIES)
    fetch = mf.cached_dataset("plain:{name}")(lambda name: name)
    stop = threading.Event()
    join = _hammer(lambda n: fetch(str(n)), stop)
    for _ in range(100):
        with mf.override(inner, prefix="o:"):
            pass
    assert join() == []
    assert all(key.startswith(b"base:") for key in base.scan_iter())
    assert all(key.startswith(b"o:") for key in inner.scan_iter())


def test_decorating_while_configure_runs_binds_each_function_to_one_state(
    fast_switching: None,
) -> None:
    mf = Memofill(policies=POLICIES)
    errors: list[Exception] = []
    decorated: list[Any] = []
    stop = threading.Event()

    def decorate() -> None:
        while not stop.is_set():
            try:
                decorated.append(mf.cached_dataset("item:{name}")(lambda name: name))
            except Exception as exc:  # the test counts every one
                errors.append(exc)

    threads = [threading.Thread(target=decorate) for _ in range(3)]
    for thread in threads:
        thread.start()
    for round_ in range(60):
        mf.configure(prefix=f"r{round_}:")
    stop.set()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert {fn.redis_key("x") for fn in decorated} == {"r59:item:x"}
