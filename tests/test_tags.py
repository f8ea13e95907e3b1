"""Tags: the declaration and its rules, the generated policies, and the write side of invalidation.

What a tag's marks do to reads is tested where reads judge them; here: each bad
declaration is one line naming its dataset and tag, ``memofill gen`` and
``check`` carry tags, ``INVALIDATE_TAG_SCRIPT`` on a real redis-server keeps its
storage rules (``born``, marks that never go backward, bounded clean-up), and
the API and the command line mark a tag and refuse one no dataset bears.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

import memofill
from memofill import CacheFill, Dataset, Memofill, RegistryError, UnknownTagError, load_policies
from memofill.cli import main
from memofill.codegen import render
from memofill.commands import Commands, acl_rule
from memofill.errors import KeyTemplateError
from memofill.keys import tags_key
from memofill.policy import tag_index, validate
from memofill.project import import_file
from memofill.scripts import TOMB_MS
from memofill.tags import KEEP_MARGIN_MS
from tests.support.redis_servers import RedisServer

FILL = CacheFill(lease_ms=5_000, wait_ms=3_000, poll_min_ms=10, poll_max_ms=200)
PROFILE = Dataset("profile:{user_id}", ttl_s=600, tags=("user:{user_id}",))
ORDERS = Dataset(
    "orders:{user_id}:{page}",
    ttl_s=60,
    stale_s=30,
    cache_fill=FILL,
    tags=("user:{user_id}", "orders"),
)
PLAIN = Dataset("plain:{n}", ttl_s=60)
POLICIES = {dataset.key: dataset for dataset in (PROFILE, ORDERS, PLAIN)}


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


def marks(client: redis.Redis, key: str, tag: str) -> tuple[int, int, int]:
    """``(hard, soft, keep_until)`` of ``tag`` in the tags hash ``key``."""
    raw = client.hget(key, "t:" + tag)
    assert raw is not None
    hard, soft, keep = (int(part) for part in raw.split())
    return hard, soft, keep


# -- the declaration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "line"),
    [
        (
            ("user:{uid}",),
            "profile:{user_id}: tags[0]='user:{uid}': "
            "field {uid} is not a field of the key (its fields: user_id)",
        ),
        (("",), "profile:{user_id}: tags[0]='': must not be empty"),
        (
            ("user {user_id}",),
            "profile:{user_id}: tags[0]='user {user_id}': "
            "character ' ' at 4 is not allowed (use A-Z a-z 0-9 _ . - : /)",
        ),
        (
            ("user:{user_id",),
            "profile:{user_id}: tags[0]='user:{user_id': '{' at 5 is never closed",
        ),
        (
            ("user:user_id}",),
            "profile:{user_id}: tags[0]='user:user_id}': '}' at 12 closes no field",
        ),
        (("a", "b", "a"), "profile:{user_id}: tags[2]='a': is declared twice in this dataset"),
        (
            "user",
            "profile:{user_id}: tags='user': must be a tuple of str: write ('user',) for one tag",
        ),
        ((7,), "profile:{user_id}: tags[0]=7: must be a str, such as 'user:{user_id}'"),
    ],
)
def test_each_bad_tag_is_one_line_naming_its_dataset_and_tag(tags: Any, line: str) -> None:
    dataset = Dataset("profile:{user_id}", ttl_s=60, tags=tags)
    assert [str(problem) for problem in validate([dataset])] == [line]
    with pytest.raises(RegistryError) as caught:
        load_policies({dataset.key: dataset})
    assert [str(problem) for problem in caught.value.problems] == [line]
    with pytest.raises(KeyTemplateError, match="cannot render its tags"):
        dataset.tags_for({"user_id": 1})


def test_every_tag_problem_of_every_dataset_is_listed() -> None:
    datasets = [
        Dataset("a:{x}", ttl_s=5, tags=("y:{y}", "", "y:{y}")),
        Dataset("b", ttl_s=0, tags=("b:{x}",)),
    ]
    assert [str(problem) for problem in validate(datasets)] == [
        "a:{x}: tags[0]='y:{y}': field {y} is not a field of the key (its fields: x)",
        "a:{x}: tags[1]='': must not be empty",
        "a:{x}: tags[2]='y:{y}': field {y} is not a field of the key (its fields: x)",
        "a:{x}: tags[2]='y:{y}': is declared twice in this dataset",
        "b: tags[0]='b:{x}': field {x} is not a field of the key (its fields: none)",
        "b: ttl_s=0: must be > 0",
    ]


def test_a_list_of_tags_is_kept_as_a_tuple() -> None:
    dataset = Dataset("profile:{user_id}", ttl_s=600, tags=["user:{user_id}"])
    assert dataset.tags == ("user:{user_id}",)
    assert dataset == PROFILE
    assert hash(dataset) == hash(PROFILE)


def test_a_values_tags_hold_its_fields_as_its_key_does() -> None:
    assert ORDERS.tags_for({"user_id": 42, "page": 1}) == ("user:42", "orders")
    # A str of digits is not the int: its key, and so its tag, say which it was.
    assert ORDERS.tags_for({"user_id": "42", "page": 1}) == ("user:%342", "orders")
    assert PROFILE.tags_for({"user_id": "a b/c"}) == ("user:a%20b%2Fc",)
    assert PROFILE.tags_for({"user_id": None}) == ("user:~n",)
    assert PLAIN.tags_for({"n": 1}) == ()
    key = PROFILE.template.render({"user_id": "a b/c"})
    assert key.removeprefix("profile:") == PROFILE.tags_for({"user_id": "a b/c"})[0][5:]


def test_the_index_finds_every_dataset_a_tag_can_belong_to() -> None:
    index = tag_index(POLICIES.values(), TOMB_MS)
    assert [key for key, _ in index.bearers("user:42")] == [PROFILE.key, ORDERS.key]
    assert [key for key, _ in index.bearers("user:%342")] == [PROFILE.key, ORDERS.key]
    assert [key for key, _ in index.bearers("user:")] == [PROFILE.key, ORDERS.key]  # ""
    assert [key for key, _ in index.bearers("orders")] == [ORDERS.key]
    for stranger in ("user:42:1", "user:4/2", "user: 42", "orders:1", "order", "usr:42"):
        assert index.bearers(stranger) == []
    # As long as a value bearing it may be in Redis, written as late as a fill may write.
    assert ORDERS.life_ms == 120_000  # the negative marker outlives the value (90 s)
    assert index.keep_ms("user:42") == 600_000 + TOMB_MS + KEEP_MARGIN_MS
    assert index.keep_ms("orders") == 120_000 + TOMB_MS + KEEP_MARGIN_MS
    with pytest.raises(UnknownTagError) as caught:
        index.keep_ms("usr:42")
    assert (
        str(caught.value) == "no dataset bears tag 'usr:42' (tag templates: orders, user:{user_id})"
    )
    with pytest.raises(TypeError, match="a tag is a str"):
        index.keep_ms(42)


# -- memofill gen and check ------------------------------------------------------------------

REGISTRY = """from memofill import Dataset

DATASETS = [
    Dataset("profile:{user_id}", ttl_s=600, tags=("user:{user_id}",)),
    Dataset("orders:{user_id}:{page}", ttl_s=60, tags=("user:{user_id}", "orders")),
]
"""


def test_gen_carries_tags_and_check_sees_them_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "registry.py").write_text(REGISTRY)
    assert main(["gen", "--registry", "registry.py", "--out", "gen/policies.py"]) == 0
    text = (tmp_path / "gen" / "policies.py").read_text()
    assert (
        '        "tags": [\n            "user:{user_id}",\n            "orders",\n        ],\n'
        in text
    )
    loaded = load_policies(import_file(tmp_path / "gen" / "policies.py"))
    assert loaded["orders:{user_id}:{page}"].tags == ("user:{user_id}", "orders")
    assert main(["check", "--registry", "registry.py", "--out", "gen/policies.py"]) == 0
    (tmp_path / "registry.py").write_text(REGISTRY.replace('"orders")', '"orders", "shop")'))
    capsys.readouterr()
    assert main(["check", "--registry", "registry.py", "--out", "gen/policies.py"]) == 1
    assert '+            "shop",' in capsys.readouterr().out


def test_a_registry_without_tags_generates_the_same_bytes_as_before() -> None:
    assert '"tags"' not in render([PLAIN], "registry.py")


def test_gen_and_check_list_every_tag_problem_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = REGISTRY.replace('"user:{user_id}", "orders"', '"user:{uid}", "", "orders", "orders"')
    (tmp_path / "registry.py").write_text(bad)
    for command in ("gen", "check"):
        assert main([command, "--registry", "registry.py", "--out", "gen/policies.py"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            "memofill: error: registry.py is invalid (3 problems):",
            "memofill: error: registry.py: orders:{user_id}:{page}: tags[0]='user:{uid}': "
            "field {uid} is not a field of the key (its fields: page, user_id)",
            "memofill: error: registry.py: orders:{user_id}:{page}: tags[1]='': must not be empty",
            "memofill: error: registry.py: orders:{user_id}:{page}: tags[3]='orders': "
            "is declared twice in this dataset",
        ]
    assert not (tmp_path / "gen").exists()


def test_a_hand_edited_generated_tag_is_refused_when_loaded(tmp_path: Path) -> None:
    module = tmp_path / "policies.py"
    module.write_text(render([PROFILE], "registry.py").replace('"user:{user_id}"', '"user:{id}"'))
    with pytest.raises(RegistryError, match=r"tags\[0\]='user:\{id\}': field \{id\} is not"):
        load_policies(import_file(module))


# -- the script, on a real redis-server ------------------------------------------------------


@pytest.mark.redis_server
def test_marks_never_go_backward_and_hard_and_soft_are_kept_apart(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    commands, key = Commands(client), tags_key(prefix())
    first = int(commands.invalidate_tag(key, "user:1", False, 60_000))
    second = int(commands.invalidate_tag(key, "user:1", False, 60_000))
    assert second > first
    soft = int(commands.invalidate_tag(key, "user:1", True, 60_000))
    assert marks(client, key, "user:1")[:2] == (second, soft)
    # A clock that has not moved past the mark (the same µs, or a mark from a faster
    # clock): one µs later, never the same or earlier. The other kind is left alone.
    ahead = second + 10_000_000
    client.hset(key, "t:user:1", f"{ahead} {soft} 0")
    assert int(commands.invalidate_tag(key, "user:1", False, 60_000)) == ahead + 1
    assert int(commands.invalidate_tag(key, "user:1", True, 60_000)) > soft
    hard, _, keep = marks(client, key, "user:1")
    assert hard == ahead + 1
    assert keep >= soft + 60_000_000  # now + keep_ms, in µs
    # keep_until never shrinks: a later, shorter keep leaves it.
    commands.invalidate_tag(key, "user:1", False, 1)
    assert marks(client, key, "user:1")[2] == keep
    client.close()


@pytest.mark.redis_server
def test_the_hash_is_born_when_missing_and_born_again_after_a_del(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    commands, key = Commands(client), tags_key(prefix())
    mark = int(commands.invalidate_tag(key, "orders", False, 60_000))
    born = int(client.hget(key, "born") or 0)
    assert 0 < born <= mark
    assert client.hget(key, "run") == client.info("server")["run_id"].encode()
    commands.invalidate_tag(key, "orders", False, 60_000)
    assert int(client.hget(key, "born") or 0) == born  # kept while the hash lives
    client.delete(key)
    again = int(commands.invalidate_tag(key, "user:7", False, 60_000))
    reborn = int(client.hget(key, "born") or 0)
    assert born < reborn <= again
    assert not client.hexists(key, "t:orders")
    client.close()


@pytest.mark.redis_server
def test_marks_past_their_time_are_removed_by_later_invalidations(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    commands, key = Commands(client), tags_key(prefix())
    commands.invalidate_tag(key, "live", False, 600_000)
    for n in range(2_000):
        commands.invalidate_tag(key, f"user:{n}", False, 1)
    assert client.hlen(key) <= 100  # each call removed about as many as it added
    # Marks that were live when made and have run out since: a hash of thousands of fields,
    # which HSCAN walks a few buckets per call, from the cursor the call before stored.
    client.hset(key, mapping={f"t:old:{n}": f"1 0 {n}" for n in range(2_000)})
    time.sleep(0.01)
    for n in range(400):
        commands.invalidate_tag(key, f"later:{n}", False, 1)
    fields = client.hkeys(key)
    assert len(fields) <= 100, len(fields)
    assert b"t:live" in fields  # a mark still to be kept is never removed
    assert {b"born", b"run", b"cursor"} <= set(fields)
    client.close()


# -- the API ---------------------------------------------------------------------------------


@pytest.mark.redis_server
def test_invalidate_tag_marks_redis_and_tells_this_process(redis_server: RedisServer) -> None:
    client, where = redis_server.client(), prefix()
    cache = Memofill(client, prefix=where, policies=POLICIES)
    generations = cache._state.generations
    local = generations.local
    mark = cache.invalidate_tag("user:42")
    assert isinstance(mark, int)
    assert marks(client, tags_key(where), "user:42")[0] == mark
    soft = cache.invalidate_tag("user:42", soft=True)
    assert marks(client, tags_key(where), "user:42")[:2] == (mark, soft)
    assert generations.local == local + 2  # later misses join no fill that began before
    assert generations.clock_us >= soft
    keep = marks(client, tags_key(where), "user:42")[2]
    assert keep >= soft + (600_000 + TOMB_MS) * 1000  # profile's 600 s, written late
    with pytest.raises(
        UnknownTagError, match=r"'usr:42' \(tag templates: orders, user:\{user_id\}\)"
    ):
        cache.invalidate_tag("usr:42")
    with pytest.raises(memofill.ConfigurationError, match="needs a Redis client"):
        Memofill(policies=POLICIES).invalidate_tag("orders")
    client.close()


@pytest.mark.redis_server
def test_the_module_level_invalidate_tag_uses_the_default_instance(
    redis_server: RedisServer,
) -> None:
    client, where = redis_server.client(), prefix()
    default = memofill.default_instance()
    # The default's own datasets stay: other tests' functions are decorated on it.
    policies = {**default.policies, **POLICIES}
    with default.override(client, prefix=where, policies=policies):
        mark = memofill.invalidate_tag("orders", soft=True)
    assert marks(client, tags_key(where), "orders")[:2] == (0, mark)
    client.close()


@pytest.mark.redis_server
async def test_invalidate_tag_on_an_asyncio_client_returns_an_awaitable(
    redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    where = prefix()
    cache = Memofill(client, prefix=where, policies=POLICIES)
    mark = await cache.invalidate_tag("user:7")
    assert isinstance(mark, int)
    admin = redis_server.client()
    assert marks(admin, tags_key(where), "user:7")[0] == mark
    admin.close()
    await client.aclose()


# -- the command line ------------------------------------------------------------------------


@pytest.fixture
def policies_module(tmp_path: Path) -> Path:
    module = tmp_path / "policies.py"
    module.write_text(render(list(POLICIES.values()), "registry.py"))
    return module


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("memofill: error: ")
    return lines[0]


@pytest.mark.redis_server
def test_the_invalidate_command_marks_a_tag(
    redis_server: RedisServer, policies_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin, where = redis_server.client(), prefix()
    admin.set(f"{where}profile:7", b"{}")  # a value of a dataset bearing user:{user_id}
    common = ["--url", redis_server.url, "--prefix", where, "--policies", str(policies_module)]
    assert main(["invalidate", "--tag", "user:7", *common]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"invalidated tag user:7 under prefix {where!r} at ")
    assert "(datasets bearing it: orders:{user_id}:{page}, profile:{user_id}; " in out
    hard, soft, _ = marks(admin, tags_key(where), "user:7")
    assert hard > 0
    assert soft == 0
    assert main(["invalidate", "--tag", "user:7", "--soft", *common]) == 0
    assert marks(admin, tags_key(where), "user:7")[:2][0] == hard
    assert marks(admin, tags_key(where), "user:7")[1] > hard
    admin.close()


@pytest.mark.redis_server
def test_the_invalidate_command_refuses_an_unknown_tag_and_a_wrong_prefix(
    redis_server: RedisServer, policies_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin, where, wrong = redis_server.client(), prefix(), prefix()
    admin.set(f"{where}orders:7:1", b"{}")
    admin.set(f"{wrong}plain:1", b"{}")  # a value, but of no dataset bearing the tag
    common = ["--url", redis_server.url, "--policies", str(policies_module)]
    assert main(["invalidate", "--tag", "usr:7", "--prefix", where, *common]) == 2
    assert one_error(capsys) == (
        f"memofill: error: {policies_module.as_posix()}: no dataset bears tag 'usr:7' "
        "(tag templates: orders, user:{user_id})"
    )
    assert main(["invalidate", "--tag", "orders", "--prefix", wrong, *common]) == 2
    line = one_error(capsys)
    assert line.startswith(
        "memofill: error: no value of a dataset bearing tag 'orders' (orders:{user_id}:{page}) "
        f"lives under prefix {wrong!r} at "
    )
    assert "--force" in line
    assert admin.exists(tags_key(wrong)) == 0  # nothing was written
    assert main(["invalidate", "--tag", "orders", "--prefix", wrong, "--force", *common]) == 0
    assert admin.hexists(tags_key(wrong), "t:orders")
    capsys.readouterr()
    assert main(["invalidate", "--tag", "orders", "--prefix", where, *common]) == 0
    assert admin.hexists(tags_key(where), "t:orders")
    capsys.readouterr()
    for bad in (["invalidate", "orders:{user_id}:{page}", "--tag", "orders"], ["invalidate"]):
        assert main([*bad, "--prefix", where, *common]) == 2
        assert one_error(capsys) == "memofill: error: name one DATASET, or one tag with --tag"
    admin.close()


# -- least privilege -------------------------------------------------------------------------


@pytest.mark.redis_server
def test_the_documented_acl_rule_lets_a_user_invalidate_tags(own_redis_server: RedisServer) -> None:
    where = "app:"
    admin = own_redis_server.client()
    password = "tags-acl-secret"
    rule = acl_rule(where).split()
    admin.execute_command("ACL", "SETUSER", "memofill", "reset", "on", f">{password}", *rule)
    admin.execute_command("ACL", "LOG", "RESET")
    client = own_redis_server.client(username="memofill", password=password)
    cache = Memofill(client, prefix=where, policies=POLICIES)
    for n in range(300):  # enough fields for HSCAN to walk a real hash table
        cache.invalidate_tag(f"user:{n}")
    time.sleep(0.002)
    cache.invalidate_tag("orders", soft=True)
    assert admin.execute_command("ACL", "LOG") == []
    assert admin.hexists(tags_key(where), "t:orders")
    client.close()
    admin.close()
