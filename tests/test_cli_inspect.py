"""``memofill inspect``: one entry as Redis holds it, read-only, and one-line errors."""

from __future__ import annotations

import uuid

import pytest

from memofill import Memofill
from memofill.cli import main
from memofill.codec import NEGATIVE_MARKER
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.redis_server
QUOTES = "market:quotes:{symbol}"


@pytest.fixture
def prefix() -> str:
    return f"inspect-{uuid.uuid4().hex[:8]}:"


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
    seconds = float(shown["data ttl left"].removesuffix(" s"))
    assert 55 < seconds <= 60
    assert shown["lock ttl left"] == "absent"
    assert shown["lock holder"] == "none"


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
