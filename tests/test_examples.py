"""The example applications in examples/, run for real.

Their own tests (on the plugin's fake Redis) run in a pytest of their own, from
examples/, as an application's would: the examples are a project with their own
registry and generated policies, which this process cannot load beside
memofill's. Then each app is served by its real server (uvicorn, gunicorn,
Django's server) or run as its real worker pool, against a private
redis-server, and a burst of concurrent requests on a cold key must call the
upstream exactly once and give every caller the right value.

The upstreams count their calls in a file (examples/upstream_calls.py), which
every process of a server appends to.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memofill import Dataset, Memofill
from tests.support.redis_servers import RedisCluster, RedisServer, free_port

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: A server has this long to answer its first request: a loaded two-core machine is slow.
READY_TIMEOUT_S = 60.0


def example_env(**extra: str) -> dict[str, str]:
    """The environment of an example's process: examples/ first on the path, as when served."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("REDIS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES), env.get("PYTHONPATH")]))
    env.pop("UPSTREAM_CALLS_FILE", None)
    return {**env, **extra}


def test_the_examples_own_tests_pass() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=EXAMPLES,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    last_line = result.stdout.strip().splitlines()[-1]
    assert " passed" in last_line, output
    assert "skipped" not in last_line, output


def test_the_examples_generated_policies_match_their_registry() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memofill", "check"],
        cwd=EXAMPLES,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@contextlib.contextmanager
def serving(command: list[str], port: int, env: dict[str, str], log: Path) -> Iterator[str]:
    """Start ``command`` from examples/, wait until it answers /healthz, yield its base URL."""
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=EXAMPLES,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its workers go with it
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[2]} exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{command[2]} did not answer in {READY_TIMEOUT_S} s:\n{log.read_text()}"
                )
            time.sleep(0.1)
        yield base
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server (a graceful stop), then SIGKILL whatever is left of its group."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def stampede(url: str, requests: int) -> list[tuple[int, Any]]:
    """``requests`` concurrent GETs of ``url``, one thread each."""
    with ThreadPoolExecutor(max_workers=requests) as pool:
        return list(pool.map(get_json, [url] * requests))


def upstream_calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def final_key(prefix: str, key: str, **fields: str) -> str:
    """The Redis key an app with ``prefix`` stores dataset ``key``'s entry under."""
    return Memofill(prefix=prefix, policies={key: Dataset(key, ttl_s=60)}).final_key(key, **fields)


def assert_one_upstream_call(
    responses: list[tuple[int, Any]], expected: Any, calls: Path, call: str
) -> None:
    assert {status for status, _ in responses} == {200}
    assert [body for _, body in responses] == [expected] * len(responses)
    # The server's log (in tmp_path) has memofill's warnings, if any: lock_error, follower_timeout.
    assert upstream_calls(calls) == [call]


#: What the FastAPI example's def route answers for ACME (fastapi_app.exchange_of).
LISTING = {"symbol": "ACME", "exchange": "LSE"}


@pytest.mark.parametrize("workers", [1, 2])
def test_uvicorn_serves_a_stampede_with_one_upstream_call(
    own_redis_server: RedisServer, tmp_path: Path, workers: int
) -> None:
    calls, port = tmp_path / "calls", free_port()
    command = [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--port", str(port)]
    env = example_env(REDIS_URL=own_redis_server.url, UPSTREAM_CALLS_FILE=str(calls))
    with serving([*command, "--workers", str(workers)], port, env, tmp_path / "log") as base:
        responses = stampede(f"{base}/quotes/ACME", 200)
        metrics = urllib.request.urlopen(f"{base}/metrics/", timeout=60).read().decode()
        assert_one_upstream_call(responses, {"symbol": "ACME", "price": 27.8}, calls, "quote ACME")
        # A def route, on the blocking client the lifespan configures beside the asyncio one.
        listings = stampede(f"{base}/listings/ACME", 50)

    assert {status for status, _ in listings} == {200}
    assert [body for _, body in listings] == [LISTING] * len(listings)
    assert upstream_calls(calls) == ["quote ACME", "listing ACME"]
    if workers == 1:  # with two, a scrape reads whichever worker answers it
        outcomes = {
            sample.labels["outcome"]: sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "memofill_calls_total" and sample.value
        }
        # A request that a busy machine starts late finds the value: a hit.
        assert outcomes.pop("leader_fill") == 1.0
        assert set(outcomes) <= {"local_join", "hit"}
        assert sum(outcomes.values()) == 199.0
    with own_redis_server.client() as redis:
        assert redis.exists(final_key("quotes-api:", "fastapi:quotes:{symbol}", symbol="ACME"))


#: Put in front of an example's path, it starts a CPU-bound thread in every Python process
#: it starts (the server and each of its workers), as a busy service would have.
BUSY_SITECUSTOMIZE = """
import threading


def _spin() -> None:
    while True:
        pass


threading.Thread(target=_spin, name="cpu-bound", daemon=True).start()
"""


@pytest.mark.slow
def test_three_busy_uvicorn_workers_call_the_upstream_once_per_cold_key_in_five_runs(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    """300 concurrent requests across 3 workers, each with a CPU-bound thread, five cold keys."""
    calls, port, busy = tmp_path / "calls", free_port(), tmp_path / "busy"
    busy.mkdir()
    (busy / "sitecustomize.py").write_text(BUSY_SITECUSTOMIZE)
    env = example_env(REDIS_URL=own_redis_server.url, UPSTREAM_CALLS_FILE=str(calls))
    env["PYTHONPATH"] = os.pathsep.join([str(busy), env["PYTHONPATH"]])
    command = [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--port", str(port)]
    symbols = [f"RUN{run}" for run in range(5)]
    with serving([*command, "--workers", "3"], port, env, tmp_path / "log") as base:
        for symbol in symbols:
            responses = stampede(f"{base}/quotes/{symbol}", 300)
            assert {status for status, _ in responses} == {200}
            assert len({json.dumps(body) for _, body in responses}) == 1
            assert responses[0][1]["symbol"] == symbol
    # One upstream call per cold key, in every run (the servers' log says why, if not).
    log = (tmp_path / "log").read_text(errors="replace")
    assert upstream_calls(calls) == [f"quote {symbol}" for symbol in symbols], log[-4000:]


@pytest.fixture
def own_redis_cluster() -> Iterator[RedisCluster]:
    """A cluster of this test's own: the session's is one that fault tests stall and restore."""
    cluster = RedisCluster().start()
    yield cluster
    cluster.close()


def test_uvicorn_on_a_redis_cluster_serves_a_stampede_with_one_upstream_call(
    own_redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    calls, port, symbol = tmp_path / "calls", free_port(), "ACME"
    cluster_url = f"redis://127.0.0.1:{own_redis_cluster.nodes[0].port}/0"
    command = [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--port", str(port)]
    env = example_env(REDIS_CLUSTER_URL=cluster_url, UPSTREAM_CALLS_FILE=str(calls))
    with serving(command, port, env, tmp_path / "log") as base:
        responses = stampede(f"{base}/quotes/{symbol}", 200)
        assert_one_upstream_call(responses, {"symbol": "ACME", "price": 27.8}, calls, "quote ACME")
        listings = stampede(f"{base}/listings/{symbol}", 50)  # the blocking cluster client

    assert {status for status, _ in listings} == {200}
    assert [body for _, body in listings] == [LISTING] * len(listings)
    assert upstream_calls(calls) == ["quote ACME", "listing ACME"]
    with contextlib.closing(own_redis_cluster.client()) as cluster:
        assert cluster.exists(final_key("quotes-api:", "fastapi:quotes:{symbol}", symbol="ACME"))


def test_gunicorn_serves_a_stampede_with_one_upstream_call(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    calls, port = tmp_path / "calls", free_port()
    command = [
        sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
        "--bind", f"127.0.0.1:{port}", "flask_app:create_app()",
    ]  # fmt: skip
    env = example_env(REDIS_URL=own_redis_server.url, UPSTREAM_CALLS_FILE=str(calls))
    with serving(command, port, env, tmp_path / "log") as base:
        responses = stampede(f"{base}/forecasts/Oslo", 200)

    assert_one_upstream_call(responses, {"city": "Oslo", "high_c": 28}, calls, "forecast Oslo")
    with own_redis_server.client() as redis:
        assert redis.exists(final_key("weather-web:", "flask:forecasts:{city}", city="Oslo"))


def test_django_runserver_serves_a_stampede_with_one_upstream_call(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    calls, port = tmp_path / "calls", free_port()
    command = [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]
    env = example_env(REDIS_URL=own_redis_server.url, UPSTREAM_CALLS_FILE=str(calls))
    with serving(command, port, env, tmp_path / "log") as base:
        # Fewer at once than the others: runserver's listen backlog is 10, and a refused
        # connection costs the client a retransmit, not an error, but seconds.
        responses = stampede(f"{base}/books/9780262510875", 50)

    book = {"isbn": "9780262510875", "pages": 475}
    assert_one_upstream_call(responses, book, calls, "book 9780262510875")
    with own_redis_server.client() as redis:
        assert redis.exists(final_key("catalogue:", "django:books:{isbn}", isbn="9780262510875"))


def test_a_worker_pool_fetches_a_shared_rate_once(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    result = subprocess.run(
        [sys.executable, "worker.py", "--processes", "4", "--invoices", "100", "--currency", "NOK"],
        cwd=EXAMPLES,
        env=example_env(REDIS_URL=own_redis_server.url, UPSTREAM_CALLS_FILE=str(calls)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    converted = json.loads(result.stdout)
    assert [job["eur"] for job in converted] == [round(10.0 * n / 11.6, 2) for n in range(100)]
    assert upstream_calls(calls) == ["rate NOK"]
    with own_redis_server.client() as redis:
        assert redis.exists(final_key("invoicing:", "worker:rates:{currency}", currency="NOK"))
