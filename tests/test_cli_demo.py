"""``memofill demo``: the README's first command, run as users run it, in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

SMALL = ["--procs", "2", "--threads", "4", "--origin-ms", "50"]
SUMMARY_KEYS = {"callers", "origin_calls", "outcomes", "latency_ms", "redis_round_trips"}


def demo(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "memofill", "demo", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
        check=False,
    )


def last_json(stdout: str) -> dict[str, object]:
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    return summary


def test_embedded_redis_server_one_origin_call_against_one_per_caller() -> None:
    done = demo(*SMALL, "--json")
    assert done.returncode == 0, done.stderr
    summary = last_json(done.stdout)
    assert set(summary) == SUMMARY_KEYS | {"redis", "uncoordinated"}
    assert summary["redis"] == "redis-server"
    assert summary["callers"] == 8
    assert summary["origin_calls"] == 1
    outcomes = summary["outcomes"]
    assert isinstance(outcomes, dict)
    assert sum(outcomes.values()) == 8
    assert outcomes.get("leader_fill") == 1
    latency = summary["latency_ms"]
    assert isinstance(latency, dict)
    assert set(latency) == {"p50", "p95", "p99", "max"}
    assert 50 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    plain = summary["uncoordinated"]
    assert isinstance(plain, dict)
    assert set(plain) == SUMMARY_KEYS
    assert plain["origin_calls"] == 8
    assert plain["redis_round_trips"] == 16  # a GET and a SET per caller
    assert "redis: redis-server at" in done.stderr
    assert "burst 1/2" in done.stderr
    assert "burst 2/2" in done.stderr


def test_table_names_both_runs() -> None:
    done = demo(*SMALL)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^origin calls\s+1\s+8$", done.stdout, re.MULTILINE), done.stdout
    for row in ("callers", "redis round trips", "latency p99 (ms)", "leader_fill"):
        assert row in done.stdout


def test_redis_url_is_used_and_left_as_found(own_redis_server: RedisServer) -> None:
    client = own_redis_server.client()
    client.set("someone-elses-key", b"untouched")
    before = set(client.keys("*"))
    done = demo(*SMALL, "--json", env={"REDIS_URL": own_redis_server.url})
    assert done.returncode == 0, done.stderr
    summary = last_json(done.stdout)
    assert summary["redis"] == "url"
    assert summary["origin_calls"] == 1
    assert set(client.keys("*")) == before
    assert client.get("someone-elses-key") == b"untouched"


def test_fakeredis_when_no_redis_server_on_path(tmp_path: Path) -> None:
    done = demo(*SMALL, "--json", env={"PATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    summary = last_json(done.stdout)
    assert summary["redis"] == "fakeredis"
    assert summary["origin_calls"] == 1


def test_trace_and_svg_are_written(tmp_path: Path) -> None:
    trace, svg = tmp_path / "trace.json", tmp_path / "stampede.svg"
    done = demo(*SMALL, "--trace", str(trace), "--svg", str(svg))
    assert done.returncode == 0, done.stderr
    data = json.loads(trace.read_text())
    assert data["origin_calls"] == 1
    assert len(data["callers"]) == 8
    assert sum(caller["led"] for caller in data["callers"]) == 1
    assert svg.read_text().lstrip().startswith("<svg")


def test_builtin_policy_outside_a_project(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "memofill", "demo", *SMALL, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "REDIS_URL"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "using the built-in demo policy" in done.stderr
    assert last_json(done.stdout)["origin_calls"] == 1


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--procs", "0"], "--procs: 0 is outside 1..64"),
        (["--procs", "many"], "--procs: 'many' is not a whole number"),
        (["--threads", "-3"], "--threads: -3 is outside"),
        (["--origin-ms", "1.5"], "--origin-ms: '1.5' is not a whole number"),
        (["--colour"], "unrecognized arguments: --colour"),
        (["--policies", "no/such/file.py"], "no/such/file.py: no such file"),
    ],
)
def test_bad_flags_one_line_exit_2(argv: list[str], fragment: str) -> None:
    done = demo(*argv)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("memofill: error: ")
    assert fragment in lines[0]


def test_ctrl_c_stops_the_embedded_server_and_the_callers() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONFAULTHANDLER"] = "1"  # a demo that hangs says where, on SIGABRT
    process = subprocess.Popen(
        [sys.executable, "-m", "memofill", "demo", *SMALL[:4], "--origin-ms", "20000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # As from a terminal: a suite run in a background job (nohup, `&` in a script) has
        # SIGINT ignored, and a child would inherit that and never see the Ctrl-C.
        preexec_fn=_default_sigint,  # noqa: PLW1509  # only sets a signal disposition
    )
    with process:
        port, code, rest, elapsed = _interrupt_during_first_burst(process)
    assert port is not None
    assert code == 130
    assert elapsed < 15
    assert rest.strip().splitlines()[-1] == "memofill: error: interrupted"
    assert "Traceback" not in rest
    probe = redis.Redis(port=port, socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        probe.ping()
    probe.close()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_during_first_burst(
    process: subprocess.Popen[str],
) -> tuple[int | None, int, str, float]:
    """Ctrl-C once the callers are inside the origin call: port, exit code, stderr, seconds."""
    assert process.stderr is not None
    port = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        found = re.search(r"redis-server at redis://127\.0\.0\.1:(\d+)/", line)
        port = int(found.group(1)) if found else port
        if line.startswith("burst 1/2"):
            break
    time.sleep(1.0)  # the callers are inside the 20 s origin call now
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        process.wait(timeout=30)
        pytest.fail("the demo did not stop within 30 s of Ctrl-C:\n" + process.stderr.read())
    return port, code, process.stderr.read(), time.monotonic() - started


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis://127.0.0.1:1/0", "cannot reach Redis at REDIS_URL redis://127.0.0.1:1/0: "),
        ("redis://user:s3cret@127.0.0.1:1/0", "cannot reach Redis at REDIS_URL redis://***@"),
        ("redis://user:s3cret@host:notaport/0", "is not a Redis URL: Port could not be cast"),
        ("mysql://127.0.0.1/0", "is not a Redis URL"),
    ],
)
def test_unreachable_or_malformed_redis_url_is_one_line_exit_2(url: str, fragment: str) -> None:
    """Checked with one PING before any caller process starts (no 60 s barrier wait)."""
    done = demo(*SMALL, env={"REDIS_URL": url})
    assert (done.returncode, done.stdout) == (2, "")
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("memofill: error: ")
    assert fragment in lines[0]
    assert "s3cret" not in done.stderr


def test_a_silent_server_is_reported_not_waited_for() -> None:
    """A port that accepts connections but never answers: the PING times out, no retries."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        done = demo(*SMALL, env={"REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert (done.returncode, done.stdout) == (2, "")
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(
        f"memofill: error: cannot reach Redis at REDIS_URL redis://127.0.0.1:{port}/0"
    )
    assert len(done.stderr.splitlines()) == 1, done.stderr
