"""A least-privilege ACL user on a private redis-server: the documented rule is enough, and exact.

Lock and wake keys start with ``{`` so that they share their data key's Cluster
slot; a user limited to ``~<prefix>*`` cannot touch them. The rule
:func:`memofill.commands.acl_rule` prints (and the deployment docs show) adds
``~{<prefix>*`` and the commands memofill sends: a stampede of processes under
that user calls the origin once, and Redis logs no denial at all. A user
without the second pattern is told once, at ERROR, with the rule to grant.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from memofill import Dataset, Memofill, NearCache
from memofill.commands import acl_rule
from memofill.inspection import inspect_entry
from tests.conftest import POLICIES
from tests.support.fault_helpers import Stampede, Target, dataset, origin_calls, run_stampede
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis_server]

PASSWORD = "acl-test-secret"


def set_user(admin: redis.Redis, name: str, rule: str) -> None:
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{PASSWORD}", *rule.split())


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private server, so that its ACL LOG holds this test's denials only."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.mark.parametrize("prefix", ["app:", "{app}:"])
def test_a_stampede_under_the_documented_acl_user_calls_the_origin_once(
    server: RedisServer, prefix: str
) -> None:
    admin = server.client()
    set_user(admin, "memofill", acl_rule(prefix))
    admin.execute_command("ACL", "LOG", "RESET")
    spec = Stampede(
        target=Target(server.port, username="memofill", password=PASSWORD),
        counter_port=server.port,
        prefix=prefix,
        dataset=dataset(),
        threads=3,
    )
    result = run_stampede(spec, processes=3)
    result.assert_every_caller_got_its_value()
    assert origin_calls(admin, spec) == 1
    assert not [r for r in result.records if r["error"]], result.errors
    # Nothing memofill sent was refused: not the lock, the script, the wake stream.
    assert admin.execute_command("ACL", "LOG") == []
    # invalidate, and what `memofill inspect` reads, are covered too.
    url = f"redis://memofill:{PASSWORD}@127.0.0.1:{server.port}/0"
    lines, value = inspect_entry(
        url, spec.dataset, f"{prefix}fault:x", prefix=prefix, show_value=True
    )
    assert dict(lines)["payload"].endswith("JSON value")
    assert dict(lines)["servable"] == "yes: fresh"  # the marks read: HGETALL <prefix>#meta
    assert value is not None
    assert '"name": "x"' in value
    client = server.client(username="memofill", password=PASSWORD)
    mf = Memofill(client, prefix=prefix, policies={spec.dataset.key: spec.dataset})

    @mf.cached_dataset(spec.dataset.key)
    def fetch(name: str) -> str:
        return name

    fetch.invalidate("x")
    assert admin.exists(f"{prefix}fault:x") == 0
    assert admin.execute_command("ACL", "LOG") == []
    # A missing key asks for a hint with SCAN, which this user may not run: no hint, no error.
    missing, _ = inspect_entry(url, spec.dataset, f"{prefix}fault:absent", prefix=prefix)
    assert dict(missing)["payload"] == "0 bytes, none"
    client.close()
    admin.close()


def test_a_user_limited_to_the_prefix_is_told_once_at_error_with_the_rule_to_grant(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"p{uuid.uuid4().hex[:6]}:"
    admin = server.client()
    # The rule as it was once written: the prefix alone, which leaves the lock keys out.
    set_user(admin, "narrow", acl_rule(prefix).replace(f" ~{{{prefix}*", ""))
    client = server.client(username="narrow", password=PASSWORD)
    mf = Memofill(client, prefix=prefix, policies=POLICIES)
    calls: list[str] = []

    @mf.cached_dataset("item:{name}")
    def fetch(name: str) -> dict[str, str]:
        calls.append(name)
        time.sleep(0.05)
        return {"name": name}

    caplog.set_level(logging.INFO, logger="memofill")
    for name in ("a", "b", "c"):
        assert fetch(name) == {"name": name}  # callers are still served
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelno for r in errors] == [logging.ERROR], errors
    assert acl_rule(prefix) in errors[0].getMessage()
    assert "item:{name}" in errors[0].getMessage()
    outcomes = [getattr(r, "outcome", None) for r in caplog.records if hasattr(r, "outcome")]
    assert outcomes == ["lock_error"] * 3
    assert calls == ["a", "b", "c"]
    client.close()
    admin.close()


def test_a_user_with_the_previous_releases_rule_is_told_it_cannot_see_invalidations(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The rule before stamps had no TIME, HGET or INFO: such a process is blind to marks."""
    prefix = f"p{uuid.uuid4().hex[:6]}:"
    admin = server.client()
    dropped = {"+hget", "+time", "+info"}
    previous = " ".join(word for word in acl_rule(prefix).split() if word not in dropped)
    set_user(admin, "previous", previous)
    clients = [server.client(username="previous", password=PASSWORD) for _ in range(2)]
    caplog.set_level(logging.INFO, logger="memofill")
    for client in clients:  # two instances: told once per instance and dataset
        mf = Memofill(client, prefix=prefix, policies=POLICIES)
        fetch = mf.cached_dataset("item:{name}")(lambda name: {"name": name})
        plain = mf.cached_dataset("plain:{name}")(lambda name: {"name": name})
        for name in ("a", "b", "c"):
            assert fetch(name) == plain(name) == {"name": name}  # callers are still served
    about_marks = [r.getMessage() for r in caplog.records if "invalidation marks" in r.getMessage()]
    assert len(about_marks) == 4, about_marks  # 2 instances x 2 datasets
    assert all(f"acl_rule({prefix!r})" in message for message in about_marks)
    assert all(r.levelno == logging.ERROR for r in caplog.records if r.levelno >= logging.ERROR)
    for client in clients:
        client.close()
    admin.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_near_cache_listener_runs_under_the_documented_acl_user(
    server: RedisServer, protocol: int
) -> None:
    prefix = "near:"
    admin = server.client()
    set_user(admin, "memofill", acl_rule(prefix))
    admin.execute_command("ACL", "LOG", "RESET")
    client = server.client(username="memofill", password=PASSWORD, protocol=protocol)
    policies = {"hot:{name}": Dataset("hot:{name}", ttl_s=60, near_ms=60_000)}
    mf = Memofill(client, prefix=prefix, policies=policies, near=NearCache(heartbeat_ms=50))

    @mf.cached_dataset("hot:{name}")
    def hot(name: str) -> dict[str, str]:
        return {"name": name}

    try:
        deadline = time.monotonic() + 20
        while hot.call_with_outcome("k").outcome != "near_hit":  # tracking, subscribed, pinged
            assert time.monotonic() < deadline, "no near hit under the ACL user"
            time.sleep(0.01)
        admin.set(f"{prefix}hot:k", b'{"name": "written"}')  # the listener hears of it
        while hot("k") != {"name": "written"}:
            assert time.monotonic() < deadline, "the write never dropped the near copy"
            time.sleep(0.01)
        assert admin.execute_command("ACL", "LOG") == []
    finally:
        mf.local_store.attach(None)
        client.close()
        admin.close()


@pytest.mark.parametrize("prefix", ["app:", "{app}:"])
def test_tags_run_under_the_documented_acl_user(server: RedisServer, prefix: str) -> None:
    """A tagged read (GET and HMGET, the hash born by its script), a page of them, near
    copies, invalidate_tag and inspect: nothing refused."""
    admin = server.client()
    set_user(admin, "memofill", acl_rule(prefix))
    admin.execute_command("ACL", "LOG", "RESET")
    tagged = Dataset("profile:{user_id}", ttl_s=600, tags=("user:{user_id}",))
    near = Dataset("card:{user_id}", ttl_s=600, near_ms=60_000, tags=("user:{user_id}",))
    client = server.client(username="memofill", password=PASSWORD)
    mf = Memofill(client, prefix=prefix, policies=[tagged, near], near=NearCache())
    versions = iter(range(1, 100))
    profile = mf.cached_dataset(tagged.key)(lambda user_id: next(versions))
    card = mf.cached_dataset(near.key)(lambda user_id: -next(versions))
    try:
        assert profile(42) == 1
        assert profile.many([42, 7]) == [1, 2]
        assert card(42) == -3
        mf.invalidate_tag("user:42")
        assert profile(42) == 4
        url = f"redis://memofill:{PASSWORD}@127.0.0.1:{server.port}/0"
        lines, _ = inspect_entry(url, tagged, f"{prefix}profile:42", prefix=prefix)
        assert dict(lines)["servable"] == "yes: fresh"
        assert admin.execute_command("ACL", "LOG") == []
    finally:
        mf.local_store.attach(None)
        client.close()
        admin.close()
