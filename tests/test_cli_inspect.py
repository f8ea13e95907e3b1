"""``memofill inspect``: one entry as Redis holds it, read-only, and one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from memofill import Memofill
from memofill.cli import main
from memofill.codec import NEGATIVE_MARKER, Header, error_marker, header_bytes
from memofill.commands import Commands, acl_rule
from memofill.inspection import MAX_VALUE_BYTES, MAX_VALUE_LINES
from memofill.keys import meta_key
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis_server
QUOTES = "market:quotes:{symbol}"


def make_marks(redis_server: RedisServer, prefix: str) -> None:
    """``<prefix>#meta`` made as a process's first read makes it: values stamped after it serve."""
    Commands(redis_server.client()).read_meta(meta_key(prefix), "")


def inspect(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, str], str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    return code, {label.rstrip(":"): value.strip() for label, value in fields.items()}, err


def test_filled_entry(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = Memofill(redis_server.client(), prefix=prefix)

    @cache.cached_dataset(QUOTES)
    def quotes(symbol: str) -> dict[str, object]:
        return {"symbol": symbol, "bid": 1.5}

    quotes("ACME")
    code, shown, err = inspect(
        capsys, QUOTES, "ACME", "--url", redis_server.url, "--prefix", prefix
    )
    assert code == 0, err
    assert shown["dataset"] == QUOTES
    assert shown["final key"] == f"{prefix}market:quotes:ACME"
    assert shown["lock key"] == f"{{{prefix}market:quotes:ACME}}#lock"
    assert "lease_ms=5000" in shown["fill policy"]
    payload = b'{"symbol":"ACME","bid":1.5}'
    assert shown["payload"] == f"{len(payload)} bytes, JSON value"
    assert re.fullmatch(
        r"fetched \S+Z \([\d.]+ s ago\), fresh until \S+Z \(in [\d.]+ s\), "
        r"fetch took \d+ ms, stamped \S+Z",
        shown["header"],
    ), shown["header"]
    seconds = float(shown["data ttl left"].removesuffix(" s"))
    assert 55 < seconds <= 60
    assert shown["marks"].startswith("none (never invalidated under this prefix)")
    assert shown["tomb"] == "none (no invalidate() of this key in the last 10 minutes)"
    assert shown["servable"] == "yes: fresh"
    assert shown["lock ttl left"] == "absent"
    assert shown["lock holder"] == "none"


def test_a_typed_word_names_the_entry_of_a_typed_argument(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Command-line text is a str; ``42`` and ``"42"`` are two keys, so an int says so."""
    cache = Memofill(redis_server.client(), prefix=prefix)
    quotes = cache.cached_dataset(QUOTES)(lambda symbol: {"symbol": symbol})
    quotes(42)
    argv = ("--url", redis_server.url, "--prefix", prefix)
    code, typed, err = inspect(capsys, QUOTES, "symbol:int=42", *argv)
    assert code == 0, err
    assert typed["final key"] == f"{prefix}market:quotes:42"
    assert typed["payload"].endswith("JSON value")
    code, text, err = inspect(capsys, QUOTES, "42", *argv)
    assert code == 0, err
    assert text["final key"] == f"{prefix}market:quotes:%342"
    assert text["payload"] == "0 bytes, none"
    code, none, err = inspect(capsys, QUOTES, "symbol:none=", *argv)
    assert none["final key"] == f"{prefix}market:quotes:~n"


# -- whether the stored value is served: invalidation marks and the header's clock ----------------

HEADLINES = "news:headlines:{lang}"  # stale_s=30, stale_if_error_s=300 in registry.py


def test_a_value_below_the_hard_mark_is_shown_as_not_servable(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = Memofill(redis_server.client(), prefix=prefix)
    quotes = cache.cached_dataset(QUOTES)(lambda symbol: {"symbol": symbol})
    argv = (QUOTES, "ACME", "--url", redis_server.url, "--prefix", prefix)
    quotes("ACME")
    cache.invalidate_dataset(QUOTES)
    cache.invalidate_dataset(QUOTES)
    code, shown, err = inspect(capsys, *argv)
    assert code == 0, err
    assert shown["payload"].endswith("JSON value")  # still in Redis, until its TTL
    assert re.fullmatch(r"values stamped at or before \S+Z are not served", shown["marks"])
    assert re.fullmatch(
        r"no: fetched before the dataset was invalidated, or before its marks were lost "
        r"\(stamped \S+Z, not after \S+Z\); a call fetches anew",
        shown["servable"],
    )
    assert quotes.call_with_outcome("ACME").outcome == "leader_fill"  # as the run time decides
    code, shown, err = inspect(capsys, *argv)
    assert (code, shown["servable"]) == (0, "yes: fresh"), err
    assert re.search(r"stamped \S+Z$", shown["header"])


def test_a_value_below_a_soft_mark_is_stale_where_the_dataset_serves_stale(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = Memofill(redis_server.client(), prefix=prefix)
    headlines = cache.cached_dataset(HEADLINES)(lambda lang: {"lang": lang})
    quotes = cache.cached_dataset(QUOTES)(lambda symbol: {"symbol": symbol})
    headlines("en")
    quotes("ACME")
    cache.invalidate_dataset(HEADLINES, soft=True)
    cache.invalidate_dataset(QUOTES, soft=True)  # no stale_s: acts as a hard one
    url = ("--url", redis_server.url, "--prefix", prefix)
    code, shown, err = inspect(capsys, HEADLINES, "en", *url)
    assert code == 0, err
    assert ", stale until stamped after " in shown["marks"]
    assert re.fullmatch(
        r"stale: fetched before the dataset was invalidated softly \(stamped \S+Z, not after "
        r"\S+Z\); served stale while one caller refreshes it",
        shown["servable"],
    )
    code, shown, err = inspect(capsys, QUOTES, "ACME", *url)
    assert code == 0, err
    assert re.fullmatch(
        r"no: fetched before the dataset was invalidated softly \(stamped \S+Z, not after "
        r"\S+Z\), and it has no stale_s to serve it stale; a call fetches anew",
        shown["servable"],
    )
    assert headlines.call_with_outcome("en").outcome == "stale_hit"  # as the run time decides
    assert quotes.call_with_outcome("ACME").outcome == "leader_fill"


@pytest.mark.parametrize(
    ("past_s", "expected"),
    [
        (-30, "yes: fresh"),
        (10, "stale: past fresh until, within stale_s; served while one caller refreshes it"),
        (100, "only if the fill fails: past stale_s, within stale_if_error_s; a call fetches"),
        (400, "no: past fresh until and every stale window; a call fetches anew"),
    ],
)
def test_the_headers_clock_says_fresh_stale_or_gone(
    redis_server: RedisServer,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
    past_s: int,
    expected: str,
) -> None:
    make_marks(redis_server, prefix)
    now_ms = round(time.time() * 1000)
    soft_until_ms = now_ms - past_s * 1000
    stamp = round(time.time() * 1_000_000)  # as a fill made now: after the marks' birth
    header = header_bytes(Header(soft_until_ms - 60_000, soft_until_ms, 5, stamp))
    redis_server.client().set(f"{prefix}news:headlines:en", header + b'{"a":1}', px=30_000)
    code, shown, err = inspect(
        capsys, HEADLINES, "en", "--url", redis_server.url, "--prefix", prefix
    )
    assert code == 0, err
    assert shown["servable"] == expected


def test_values_without_a_generation_and_markers(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_server.client()
    argv = ("--url", redis_server.url, "--prefix", prefix)
    client.set(f"{prefix}market:quotes:OLD", b'{"a":1}', px=30_000)  # an older release's bytes
    client.set(f"{prefix}market:quotes:NONE", NEGATIVE_MARKER, px=30_000)
    assert inspect(capsys, QUOTES, "OLD", *argv)[1]["servable"] == (
        "yes: fresh until Redis expires it"
    )
    Memofill(client, prefix=prefix).invalidate_dataset(QUOTES)
    assert inspect(capsys, QUOTES, "OLD", *argv)[1]["servable"] == (
        "no: written without a stamp (by hand or an older release) and the dataset was "
        "invalidated; a call fetches anew"
    )
    assert inspect(capsys, QUOTES, "NONE", *argv)[1]["servable"] == (
        "yes: as None (a negative hit) until it expires; it carries no stamp, so no mark rejects it"
    )
    client.set(f"{prefix}market:quotes:ERR", error_marker("TimeoutError"), px=30_000)
    assert inspect(capsys, QUOTES, "ERR", *argv)[1]["servable"] == (
        "no: callers raise FillError (the last fill raised TimeoutError) until it expires; "
        "it carries no stamp, so no mark rejects it"
    )
    # What fills store: markers behind a header, judged by their stamps as values are.
    before, after = (header_bytes(Header(1, 2**40, 0, stamp)) for stamp in (5, 2**55))
    client.set(f"{prefix}market:quotes:NONE", before + NEGATIVE_MARKER, px=30_000)
    assert inspect(capsys, QUOTES, "NONE", *argv)[1]["servable"].startswith(
        "no: cached before the dataset was invalidated, or before its marks were lost"
    )
    client.set(f"{prefix}market:quotes:NONE", after + NEGATIVE_MARKER, px=30_000)
    assert inspect(capsys, QUOTES, "NONE", *argv)[1]["servable"] == (
        "yes: as None (a negative hit) until it expires"
    )
    long_name = "VeryLong" * 20  # more than the first 64 bytes hold behind a header
    client.set(f"{prefix}market:quotes:ERR", after + error_marker(long_name), px=30_000)
    assert inspect(capsys, QUOTES, "ERR", *argv)[1]["servable"] == (
        f"no: callers raise FillError (the last fill raised {long_name}) until it expires"
    )
    client.set(f"{prefix}market:quotes:BAD", b"\xff\xfe", px=30_000)
    shown = inspect(capsys, QUOTES, "BAD", *argv)[1]
    assert shown["payload"] == "2 bytes, not a memofill value (corrupt or foreign bytes)"
    assert shown["servable"] == "no: not a memofill value (a call fetches and overwrites it)"
    client.set(f"{prefix}market:quotes:LONG", b"\xff" * 100, px=30_000)  # more than is read
    assert inspect(capsys, QUOTES, "LONG", *argv)[1]["servable"].startswith("no: not a memofill")
    assert inspect(capsys, QUOTES, "ABSENT", *argv)[1]["servable"] == (
        "no: nothing stored (the next call fetches)"
    )


def test_a_key_deleted_by_invalidate_is_shown_invalidated_beside_its_tomb(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = Memofill(redis_server.client(), prefix=prefix)
    quotes = cache.cached_dataset(QUOTES)(lambda symbol: {"symbol": symbol})
    argv = (QUOTES, "ACME", "--url", redis_server.url, "--prefix", prefix)
    quotes("ACME")
    quotes.invalidate("ACME")
    code, shown, err = inspect(capsys, *argv)
    assert code == 0, err
    tomb = re.fullmatch(
        r"invalidate\(\) at (\S+Z): a fill whose fetch began before it is not written "
        r"\(for another ([\d.]+) s\)",
        shown["tomb"],
    )
    assert tomb is not None, shown["tomb"]
    assert 590 < float(tomb[2]) <= 600
    assert shown["servable"] == (
        f"no: invalidated (deleted by invalidate() at {tomb[1]}); the next call fetches anew"
    )
    assert quotes.call_with_outcome("ACME").outcome == "leader_fill"  # as the run time decides
    code, shown, err = inspect(capsys, *argv)
    assert (code, shown["servable"]) == (0, "yes: fresh"), err
    assert shown["tomb"].startswith(f"invalidate() at {tomb[1]}: ")  # the refill came after it
    assert "no fill wrote it" not in shown["tomb"]


def test_a_value_stamped_before_its_keys_tomb_is_named_as_no_fills(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only a hand-made write can sit under a tomb it predates; calls serve it all the same."""
    client = redis_server.client()
    cache = Memofill(client, prefix=prefix)
    quotes = cache.cached_dataset(QUOTES)(lambda symbol: {"symbol": symbol})
    make_marks(redis_server, prefix)
    time.sleep(0.01)
    stamp = round(time.time() * 1_000_000)  # after the marks' birth, before the tomb
    time.sleep(0.01)
    quotes.invalidate("ACME")
    now_ms = round(time.time() * 1000)
    header = header_bytes(Header(now_ms - 1000, now_ms + 59_000, 5, stamp))
    client.set(f"{prefix}market:quotes:ACME", header + b'{"a":1}', px=30_000)
    code, shown, err = inspect(
        capsys, QUOTES, "ACME", "--url", redis_server.url, "--prefix", prefix
    )
    assert code == 0, err
    assert shown["tomb"].endswith("; the stored value is stamped before it, so no fill wrote it")
    assert shown["servable"] == "yes: fresh"
    assert quotes.call_with_outcome("ACME").outcome == "hit"  # as the run time decides


def test_a_tomb_that_is_not_a_number_is_named_not_a_crash(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_server.client()
    client.set(f"{{{prefix}market:quotes:ACME}}#tomb", b"junk", px=30_000)
    code, shown, err = inspect(
        capsys, QUOTES, "ACME", "--url", redis_server.url, "--prefix", prefix
    )
    assert code == 0, err
    assert shown["tomb"] == "not a number (b'junk'): the next fill of this key fails to write"
    assert shown["servable"] == "no: nothing stored (the next call fetches)"


def test_a_value_of_the_release_before_stamps_is_refilled(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_server.client()
    now_ms = round(time.time() * 1000)
    old_header = b"\x011%012x%012x%08x%08x" % (now_ms, now_ms + 60_000, 5, 0)  # no stamp
    client.set(f"{prefix}market:quotes:OLD", old_header + b'{"a":1}', px=30_000)
    code, shown, err = inspect(capsys, QUOTES, "OLD", "--url", redis_server.url, "--prefix", prefix)
    assert code == 0, err
    assert shown["payload"] == "49 bytes, value of a release before stamps (header version 1)"
    assert shown["header"] == "version 1, of a release before stamps (read as a miss and refilled)"
    assert shown["servable"] == (
        "no: stored by a release before stamps; a call fetches anew and overwrites it"
    )
    quotes = Memofill(client, prefix=prefix).cached_dataset(QUOTES)(lambda symbol: {"s": symbol})
    assert quotes.call_with_outcome("OLD").outcome == "leader_fill"  # as the run time decides


@pytest.mark.parametrize("lost", ["deleted", "another run"])
def test_a_value_stamped_before_marks_made_anew_is_not_servable(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str], lost: str
) -> None:
    """Lost marks are made anew by the next read, and nothing stamped before it is served."""
    client = redis_server.client()
    Memofill(client, prefix=prefix).cached_dataset(QUOTES)(lambda symbol: {"s": symbol})("ACME")
    if lost == "deleted":  # evicted, or a restart without persistence
        client.delete(meta_key(prefix))
        expected = "missing (never made, or lost)"
    else:  # a restart from a snapshot: the hash is there, made by another run of the server
        client.hset(meta_key(prefix), "run", "0" * 40)
        expected = "from an earlier run of the server (a restart)"
    code, shown, err = inspect(
        capsys, QUOTES, "ACME", "--url", redis_server.url, "--prefix", prefix
    )
    assert code == 0, err
    assert re.fullmatch(
        r"values stamped at or before \S+Z are not served \(the next read makes them anew: "
        rf"the marks are {re.escape(expected)}\)",
        shown["marks"],
    ), shown["marks"]
    assert re.fullmatch(
        r"no: fetched before the dataset was invalidated, or before its marks were lost "
        r"\(stamped \S+Z, not after \S+Z\); a call fetches anew",
        shown["servable"],
    ), shown["servable"]
    assert client.exists(meta_key(prefix)) == (lost != "deleted")  # inspect wrote nothing
    quotes = Memofill(client, prefix=prefix).cached_dataset(QUOTES)(lambda symbol: {"s": symbol})
    assert quotes.call_with_outcome("ACME").outcome == "leader_fill"  # as the run time decides
    code, shown, err = inspect(
        capsys, QUOTES, "ACME", "--url", redis_server.url, "--prefix", prefix
    )
    assert (code, shown["servable"]) == (0, "yes: fresh"), err
    assert shown["marks"].startswith("none (never invalidated under this prefix)")


def test_marks_under_another_prefix_do_not_count(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = Memofill(redis_server.client(), prefix=prefix)
    cache.cached_dataset(QUOTES)(lambda symbol: {"symbol": symbol})("ACME")
    Memofill(redis_server.client(), prefix="other-" + prefix).invalidate_dataset(QUOTES)
    Memofill(redis_server.client(), prefix=prefix).invalidate_dataset(HEADLINES)
    code, shown, err = inspect(
        capsys, QUOTES, "ACME", "--url", redis_server.url, "--prefix", prefix
    )
    assert (code, shown["servable"]) == (0, "yes: fresh"), err


def test_marks_that_the_acl_does_not_let_it_read_are_unknown_not_an_error(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = redis_server.client()
    Memofill(admin, prefix=prefix).cached_dataset(QUOTES)(lambda symbol: {"symbol": symbol})("A")
    user = f"inspect-{prefix.strip(':')}"
    rule = acl_rule(prefix).replace("+hgetall", "")
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">secret", *rule.split())
    try:
        url = redis_server.url.replace("redis://", f"redis://{user}:secret@")
        code, shown, err = inspect(capsys, QUOTES, "A", "--url", url, "--prefix", prefix)
        assert code == 0, err
        assert shown["marks"].startswith(f"unknown: cannot read {prefix}#meta (")
        assert shown["servable"] == shown["marks"]
        assert shown["payload"].endswith("JSON value")
    finally:
        admin.execute_command("ACL", "DELUSER", user)


def test_lock_holder_and_negative_marker(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_server.client()
    final = f"{prefix}market:quotes:ZZZ"
    client.set(final, NEGATIVE_MARKER, px=30_000)
    client.set(f"{{{final}}}#lock", b"token-of-the-holder", px=4_000)
    code, shown, err = inspect(
        capsys, QUOTES, "symbol=ZZZ", "--url", redis_server.url, "--prefix", prefix
    )
    assert code == 0, err
    assert "negative marker" in shown["payload"]
    assert shown["lock holder"] == "token-of-the-holder"
    assert 0 < float(shown["lock ttl left"].removesuffix(" s")) <= 4


def test_reads_only(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_server.client()
    before = set(client.keys(f"*{prefix}*"))
    code, _, _ = inspect(capsys, QUOTES, "ACME", "--url", redis_server.url, "--prefix", prefix)
    assert code == 0
    assert set(client.keys(f"*{prefix}*")) == before == set()


def test_redis_url_from_environment(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    code, shown, err = inspect(capsys, "news:digest:v1")
    assert code == 0, err
    assert shown["final key"] == "news:digest:v1"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["no:such:{x}", "1"], "no dataset 'no:such:{x}'"),
        ([QUOTES], "needs a value for symbol"),
        ([QUOTES, "A", "B"], "takes 1 field value(s), got more"),
        ([QUOTES, "colour=red"], "has no field 'colour'"),
        ([QUOTES, "symbol:int=x"], "symbol:int='x': cannot be read as int"),
        ([QUOTES, "symbol:float=1.5"], "unknown type 'float' (types: str, int, bool, none"),
        ([QUOTES, "A", "--prefix", "{a"], "--prefix '{a'"),
        ([QUOTES, "A", "--policies", "nowhere.py"], "nowhere.py: no such file"),
        ([], "the following arguments are required: KEY"),
    ],
)
def test_bad_input_one_line_exit_2(
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    fragment: str,
) -> None:
    code = main(["inspect", *argv, "--url", redis_server.url])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("memofill: error: ")
    assert fragment in err


def test_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", QUOTES, "A", "--url", "redis://127.0.0.1:1/0"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("memofill: error: cannot read from Redis at redis://127.0.0.1:1/0")
    assert len(err.splitlines()) == 1


def test_no_url(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["inspect", QUOTES, "A"]) == 2
    assert "pass --url, set REDIS_URL, or set url in [tool.memofill]" in capsys.readouterr().err


def test_final_key_as_logged_names_its_dataset(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    final = f"{prefix}market:quotes:AAPL"
    redis_server.client().set(final, b'{"bid":2}', px=30_000)
    code, shown, err = inspect(capsys, final, "--url", redis_server.url, "--prefix", prefix)
    assert code == 0, err
    assert shown["dataset"] == QUOTES
    assert shown["final key"] == final
    assert shown["payload"] == "9 bytes, JSON value"


def test_final_key_takes_no_field_values(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = inspect(
        capsys, f"{prefix}market:quotes:A", "B", "--url", redis_server.url, "--prefix", prefix
    )
    assert code == 2
    assert "is a final key of 'market:quotes:{symbol}': give no field values" in err


def test_a_final_key_without_its_prefix_gets_a_hint(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = inspect(capsys, "prod:market:quotes:AAPL", "--url", redis_server.url)
    assert (code, out) == (2, {})
    assert len(err.splitlines()) == 1
    assert "no dataset 'prod:market:quotes:AAPL'" in err
    assert "it is a key of 'market:quotes:{symbol}' under the prefix 'prod:'" in err
    assert "pass --prefix 'prod:'" in err


def test_an_absent_key_that_exists_under_another_prefix_gets_a_hint(
    own_redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A server of its own: the hint comes from one SCAN step, which must see the key.
    own_redis_server.client().set(f"{prefix}market:quotes:HINT", b"1", px=30_000)
    code, shown, err = inspect(capsys, QUOTES, "HINT", "--url", own_redis_server.url)
    assert code == 0, err
    assert shown["data ttl left"] == "absent"
    assert shown["hint"] == (
        f"'market:quotes:HINT' is absent but '{prefix}market:quotes:HINT' exists: "
        f"is the prefix {prefix!r} missing?"
    )


def test_no_hint_when_the_key_exists(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_server.client().set(f"{prefix}market:quotes:HERE", b"1", px=30_000)
    code, shown, _ = inspect(capsys, QUOTES, "HERE", "--url", redis_server.url, "--prefix", prefix)
    assert code == 0
    assert "hint" not in shown


def inspect_value(
    capsys: pytest.CaptureFixture[str], client_url: str, prefix: str, symbol: str
) -> tuple[int, str]:
    code = main(["inspect", QUOTES, symbol, "--url", client_url, "--prefix", prefix, "--value"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[12].startswith("lock holder:")
    return code, "\n".join(lines[13:])


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (b'{"bid":1.5,"tags":["a"]}', '{\n  "bid": 1.5,\n  "tags": [\n    "a"\n  ]\n}'),
        (NEGATIVE_MARKER, "(negative marker: the fetch returned None;"),
        (error_marker("TimeoutError"), "(error marker: the last fill raised TimeoutError;"),
        (
            b"\x00\xff{not json",
            "(not a memofill value; the first bytes are b'\\x00\\xff{not json')",
        ),
        (b"\xff\xfe", "(not a memofill value; the first bytes are b'\\xff\\xfe')"),
        (None, "(no value: the key does not exist)"),
    ],
    ids=["json", "negative", "error", "corrupt-nul", "corrupt", "absent"],
)
def test_value_is_decoded_or_named(
    redis_server: RedisServer,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
    stored: bytes | None,
    expected: str,
) -> None:
    if stored is not None:
        redis_server.client().set(f"{prefix}market:quotes:V", stored, px=30_000)
    _, value = inspect_value(capsys, redis_server.url, prefix, "V")
    assert value.startswith(expected), value


def test_a_long_value_is_cut_with_a_note(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = list(range(MAX_VALUE_LINES * 2))
    redis_server.client().set(f"{prefix}market:quotes:LONG", orjson.dumps(rows), px=30_000)
    _, value = inspect_value(capsys, redis_server.url, prefix, "LONG")
    lines = value.splitlines()
    assert len(lines) == MAX_VALUE_LINES + 1
    assert lines[-1] == f"... ({MAX_VALUE_LINES + 2} more lines not shown)"


def test_a_huge_value_is_described_not_fetched(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    size = MAX_VALUE_BYTES + 1
    redis_server.client().set(f"{prefix}market:quotes:HUGE", b"1" * size, px=30_000)
    _, value = inspect_value(capsys, redis_server.url, prefix, "HUGE")
    assert value == f"(not shown: {size} bytes is more than {MAX_VALUE_BYTES})"


# -- settings from pyproject.toml ------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """Writes a pyproject.toml naming the repository's policies, a url and a prefix; cwd is it."""
    policies = Path(__file__).parent.parent / "gen" / "cache_fill_registry.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REDIS_URL", raising=False)

    def write(url: str, prefix: str) -> None:
        (tmp_path / "pyproject.toml").write_text(
            f'[tool.memofill]\nout = "{policies}"\nurl = "{url}"\nprefix = "{prefix}"\n'
        )

    return write


def test_prefix_and_url_from_pyproject(
    redis_server: RedisServer,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
    project: Callable[[str, str], None],
) -> None:
    redis_server.client().set(f"{prefix}market:quotes:P", b"1", px=30_000)
    project(redis_server.url, prefix)
    code, shown, err = inspect(capsys, f"{prefix}market:quotes:P")
    assert code == 0, err
    assert shown["dataset"] == QUOTES
    assert shown["payload"] == "1 bytes, JSON value"


def test_flags_then_environment_override_pyproject(
    redis_server: RedisServer,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
    project: Callable[[str, str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project("redis://127.0.0.1:1/0", "wrong:")
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    code, shown, err = inspect(capsys, QUOTES, "F", "--prefix", prefix)
    assert code == 0, err  # REDIS_URL beat the unreachable url in pyproject.toml
    assert shown["final key"] == f"{prefix}market:quotes:F"
    code, _, err = inspect(capsys, QUOTES, "F", "--url", "redis://127.0.0.1:1/0")
    assert code == 2  # --url beat REDIS_URL
    assert "cannot read from Redis at redis://127.0.0.1:1/0" in err


def test_a_bad_prefix_in_pyproject_is_named(
    capsys: pytest.CaptureFixture[str], project: Callable[[str, str], None]
) -> None:
    project("redis://127.0.0.1:1/0", "{a")
    code, _, err = inspect(capsys, QUOTES, "A")
    assert code == 2
    assert "[tool.memofill] prefix '{a'" in err


# -- as a process: no secret, no traceback ---------------------------------------------------


def inspect_process(
    *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "memofill", "inspect", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


def assert_one_line_exit_2(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert (done.returncode, done.stdout) == (2, ""), done.stdout
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("memofill: error: ")
    assert fragment in lines[0]


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:s3cret-pw@host:notaport/0",
        "redis://:s3cret-pw@host:99999/0",
        "http://user:s3cret-pw@host/0",
        "redis://user:s3cret-pw@127.0.0.1:1/0",
        "redis://127.0.0.1:1/0?password=s3cret-pw",
    ],
)
@pytest.mark.parametrize("via", ["flag", "env"])
def test_a_bad_url_never_prints_its_password(url: str, via: str) -> None:
    if via == "flag":
        done = inspect_process(QUOTES, "A", "--url", url)
    else:
        done = inspect_process(QUOTES, "A", env={"REDIS_URL": url})
    assert_one_line_exit_2(done, "Redis")
    assert "s3cret" not in done.stderr


def test_a_policy_module_that_exits_is_an_error(tmp_path: Path) -> None:
    policies = tmp_path / "policies.py"
    policies.write_text("import sys\nsys.exit(0)\n")
    done = inspect_process(
        QUOTES, "A", "--url", "redis://127.0.0.1:1/0", "--policies", str(policies)
    )
    assert_one_line_exit_2(done, f"{policies}: cannot load: exited (sys.exit(0))")


def test_a_tagged_value_shows_its_tags_and_is_not_servable_behind_one(
    redis_server: RedisServer, prefix: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from memofill import Dataset  # noqa: PLC0415
    from memofill.codegen import render  # noqa: PLC0415

    profile = Dataset("profile:{user_id}", ttl_s=600, tags=("user:{user_id}", "people"))
    module = tmp_path / "policies.py"
    module.write_text(render([profile], "registry.py"))
    cache = Memofill(redis_server.client(), prefix=prefix, policies=[profile])
    fetch = cache.cached_dataset(profile.key)(lambda user_id: {"user": user_id})
    fetch(42)
    common = ("--url", redis_server.url, "--prefix", prefix, "--policies", str(module))
    code, shown, err = inspect(capsys, profile.key, "user_id:int=42", *common)
    assert code == 0, err
    assert re.fullmatch(
        rf"user:42 \(never invalidated\); people \(never invalidated\); {prefix}#tags born \S+Z",
        shown["tags"],
    ), shown["tags"]
    assert shown["servable"] == "yes: fresh"
    cache.invalidate_tag("user:42")
    code, shown, err = inspect(capsys, f"{prefix}profile:42", *common)  # as the logs print it
    assert code == 0, err
    assert re.match(r"user:42 \(invalidated \S+Z\); people \(never invalidated\)", shown["tags"])
    assert shown["servable"].startswith("no: fetched before one of its tags was invalidated")
    assert fetch.call_with_outcome(42).outcome == "legacy"  # a fill, as the run time decides
    cache.invalidate_dataset(profile.key)
    code, shown, err = inspect(capsys, f"{prefix}profile:42", *common)
    assert shown["servable"].startswith("no: fetched before the dataset was invalidated")
