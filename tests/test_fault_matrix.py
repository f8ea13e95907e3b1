"""The fault matrix: twelve ways Redis can fail in the middle of a fill, for blocking and asyncio.

Each case is one leader and three followers on two instances (two processes'
worth: each has its own client and singleflight, so they meet only through
Redis), on a private ``redis-server``. The fault starts while the leader
fetches, or, for the restricted ACL users, is there from the start. Whatever
the fault, the contract is the same:

* every caller gets its value, and no Redis exception reaches one;
* the origin is called at most once per instance;
* nobody waits longer than the fault lasts plus ``wait_ms``, a socket
  time-out and two fetches;
* once the fault is over, no lock outlives its lease and the next call gets
  its value with at most one more origin call.

``tests/test_faults.py`` measures the exact outcomes of the commonest of these
faults; this matrix makes sure none of them breaks the contract.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import redis

from memofill import CacheFill, Memofill
from memofill.commands import acl_rule
from memofill.keys import lock_key
from tests.support.fault_helpers import (
    MARGIN_S,
    SOCKET_TIMEOUT_S,
    Target,
    dataset,
    make_async_client,
    make_client,
    measure,
    recorded,
    wait_until,
)
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis_server]

FILL = CacheFill(lease_ms=2_000, wait_ms=1_000, poll_min_ms=10, poll_max_ms=100)
POLICIES = {"fault:{name}": dataset(FILL)}
FETCH_S = 0.4
FOLLOWERS = 3
#: How long a timed fault (a pause, a server down) lasts.
FAULT_S = 1.0
#: The ACL cases: memofill's documented least-privilege user, less one command.
ACL_CASES = ("evalsha", "xread", "set", "xadd")


@attrs.frozen
class Fault:
    """What to break (``start``), what mends it (``end``), or the command an ACL user lacks."""

    start: Callable[[RedisServer, redis.Redis], object] = lambda server, admin: None
    end: Callable[[RedisServer, redis.Redis], object] = lambda server, admin: None
    denied: str | None = None
    #: Whether ``end`` must wait out :data:`FAULT_S` (a fault that lasts, not a one-off).
    lasts: bool = False


def _restart(server: RedisServer, admin: redis.Redis) -> None:
    server.start()


def _oom(server: RedisServer, admin: redis.Redis) -> None:
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)


FAULTS = {
    "sigstop": Fault(lambda s, a: s.pause(), lambda s, a: s.resume(), lasts=True),
    "sigkill-then-restart": Fault(lambda s, a: s.kill(), _restart, lasts=True),
    "client-pause-write": Fault(
        lambda s, a: a.client_pause(int(FAULT_S * 1000), all=False), lasts=True
    ),
    "client-pause-all": Fault(lambda s, a: a.client_pause(int(FAULT_S * 1000)), lasts=True),
    "client-kill": Fault(lambda s, a: a.client_kill_filter(_type="normal", skipme=True)),
    "script-flush": Fault(lambda s, a: a.script_flush()),
    "flushall": Fault(lambda s, a: a.flushall()),
    "out-of-memory": Fault(_oom, lambda s, a: a.config_set("maxmemory", 0), lasts=True),
    "debug-sleep": Fault(lambda s, a: a.execute_command("DEBUG", "SLEEP", "0.5")),  # type: ignore[no-untyped-call]
    **{f"acl-no-{command}": Fault(denied=command) for command in ACL_CASES},
}


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = RedisServer("--enable-debug-command", "local").start()
    yield server
    server.close()


@attrs.define
class Case:
    """One run: the instances' target, the origin's calls, and what each caller saw."""

    target: Target
    prefix: str
    origins: list[str] = attrs.Factory(list)
    values: list[Any] = attrs.Factory(list)
    errors: list[str] = attrs.Factory(list)
    waits: list[float] = attrs.Factory(list)

    def instance(self, asynchronous: bool) -> tuple[Memofill, Any]:
        if asynchronous:
            mf = Memofill(
                async_client=make_async_client(self.target), prefix=self.prefix, policies=POLICIES
            )

            @mf.cached_dataset("fault:{name}")
            async def fetch_async(name: str) -> dict[str, str]:
                self.origins.append(name)
                await asyncio.sleep(FETCH_S)
                return {"name": name}

            return mf, fetch_async
        mf = Memofill(make_client(self.target), prefix=self.prefix, policies=POLICIES)

        @mf.cached_dataset("fault:{name}")
        def fetch(name: str) -> dict[str, str]:
            self.origins.append(name)
            time.sleep(FETCH_S)
            return {"name": name}

        return mf, fetch

    def seen(self, value: Any, error: BaseException | None, started: float) -> None:
        self.waits.append(time.monotonic() - started)
        if error is not None:
            self.errors.append(f"{type(error).__module__}.{type(error).__name__}: {error}")
        else:
            self.values.append(value)


def _target(server: RedisServer, admin: redis.Redis, fault: Fault, prefix: str) -> Target:
    if fault.denied is None:
        return Target(server.port)
    name = f"no-{fault.denied}"
    rule = acl_rule(prefix).split()
    assert f"+{fault.denied}" in rule
    rule.remove(f"+{fault.denied}")
    admin.execute_command("ACL", "SETUSER", name, "on", ">pw", "resetkeys", "-@all", *rule)  # type: ignore[no-untyped-call]
    return Target(server.port, username=name, password="pw")


def _run_sync(case: Case, fault: Fault, server: RedisServer, admin: redis.Redis) -> None:
    _, leader = case.instance(asynchronous=False)
    _, follower = case.instance(asynchronous=False)

    def call(fetch: Any) -> None:
        started = time.monotonic()
        try:
            value = fetch("x")
        except Exception as exc:
            case.seen(None, exc, started)
        else:
            case.seen(value, None, started)

    threads = [threading.Thread(target=call, args=(leader,))]
    threads[0].start()
    wait_until(lambda: case.origins)
    threads += [threading.Thread(target=call, args=(follower,)) for _ in range(FOLLOWERS)]
    for thread in threads[1:]:
        thread.start()
    _break_and_mend(fault, server, admin)
    for thread in threads:
        thread.join(timeout=60)


def _run_async(case: Case, fault: Fault, server: RedisServer, admin: redis.Redis) -> None:
    async def main() -> None:
        leader_mf, leader = case.instance(asynchronous=True)
        follower_mf, follower = case.instance(asynchronous=True)

        async def call(fetch: Any) -> None:
            started = time.monotonic()
            try:
                value = await fetch("x")
            except Exception as exc:
                case.seen(None, exc, started)
            else:
                case.seen(value, None, started)

        tasks = [asyncio.create_task(call(leader))]
        while not case.origins:
            await asyncio.sleep(0.005)
        tasks += [asyncio.create_task(call(follower)) for _ in range(FOLLOWERS)]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(_break_and_mend, fault, server, admin)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        for mf in (leader_mf, follower_mf):
            commands = mf.commands_for(True)
            assert commands is not None
            await commands.client.aclose()

    asyncio.run(main())


def _break_and_mend(fault: Fault, server: RedisServer, admin: redis.Redis) -> None:
    time.sleep(0.05)
    fault.start(server, admin)
    if fault.lasts:
        time.sleep(FAULT_S)
    fault.end(server, admin)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["blocking", "asyncio"])
@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_fault_mid_fill_breaks_no_promise(
    server: RedisServer, name: str, asynchronous: bool, request: pytest.FixtureRequest
) -> None:
    fault = FAULTS[name]
    admin = server.client(socket_timeout=10)
    prefix = f"m{uuid.uuid4().hex[:8]}:"
    case = Case(_target(server, admin, fault, prefix), prefix)
    try:
        with recorded() as records:
            (_run_async if asynchronous else _run_sync)(case, fault, server, admin)
    finally:
        server.resume()
        if server.process is None:
            server.start()
    admin = server.client(socket_timeout=10)
    mine = [r for r in records if r["redis_key"].startswith(case.prefix)]
    logged = Counter((r["outcome"], r["error"]) for r in mine if r["outcome"] != "local_join")
    measure(request, len(case.origins), max(case.waits), logged)

    assert not case.errors, case.errors
    assert case.values == [{"name": "x"}] * (1 + FOLLOWERS)
    assert len(case.origins) <= 2, case.origins
    longest_allowed = FAULT_S + FILL.wait_ms / 1000 + SOCKET_TIMEOUT_S + 2 * FETCH_S + MARGIN_S
    assert max(case.waits) < longest_allowed, case.waits

    # Over: no lock outlives its lease, and the next call is served (one more fetch at most).
    lock = lock_key(f"{case.prefix}fault:x")
    wait_until(lambda: not admin.exists(lock), timeout_s=FILL.lease_ms / 1000 + MARGIN_S)
    before = len(case.origins)
    if asynchronous:
        _run_async_once(case)
    else:
        _, fetch = case.instance(asynchronous=False)
        assert fetch("x") == {"name": "x"}
    assert len(case.origins) <= before + 1
    admin.close()


def _run_async_once(case: Case) -> None:
    async def main() -> None:
        mf, fetch = case.instance(asynchronous=True)
        assert await fetch("x") == {"name": "x"}
        commands = mf.commands_for(True)
        assert commands is not None
        await commands.client.aclose()

    asyncio.run(main())
