"""Private redis-server processes for the tests, on free loopback ports: start, stop, pause, kill.

Nothing here touches the machine's own Redis on 6379: every server is a child
process of the test run with its own port and directory, and is gone when the
test run ends.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from memofill.demo import private_server_command

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: A cluster node also listens on its port + 10000 (the cluster bus), so its port must be <= 55535.
CLUSTER_BUS_OFFSET = 10_000
MAX_CLUSTER_PORT = 65_535 - CLUSTER_BUS_OFFSET


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port for a cluster node: at most 55535, with its bus port (+10000) free as well.

    The kernel hands out ephemeral ports above 32768, often too high for a cluster
    node (redis-server refuses to start), so the port is drawn below that range.
    """
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(20_000, min(32_000, MAX_CLUSTER_PORT))
        if bindable(port) and bindable(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """One redis-server child process on 127.0.0.1:``port``.

    ``stop``/``start`` keep the port, so clients reconnect to the same address,
    as they would after a real restart.
    """

    def __init__(self, *extra: str, port: int | None = None, directory: Path | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH (CI installs it; see .ci/run)")
        self.port = port or free_port()
        self.extra = extra
        self.directory = directory or Path(tempfile.mkdtemp(prefix="memofill-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A blocking client for this server (bytes, not decoded)."""
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        assert REDIS_SERVER is not None
        args = [
            *private_server_command(REDIS_SERVER, self.port, str(self.directory)),
            "--logfile",
            str(self.directory / f"redis-{self.port}.log"),
            *self.extra,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with contextlib.closing(self.client(socket_timeout=0.5)) as probe:
                    if probe.ping():
                        return self
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Terminate the server (SIGKILL if needed) and wait for it to be gone."""
        if self.process is None:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-command, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisCluster:
    """Three cluster-enabled masters on free ports, joined with ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="memofill-cluster-"))
        self.nodes = []
        for _ in range(masters):
            port = free_cluster_port()
            node_dir = self.directory / str(port)
            node_dir.mkdir()
            self.nodes.append(
                RedisServer(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    port=port,
                    directory=node_dir,
                )
            )

    def start(self, timeout_s: float = 30.0) -> RedisCluster:
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli is not on PATH (CI installs it; see .ci/run)")
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout_s,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [node.client().cluster("info") for node in self.nodes]
            if all(_cluster_ok(state) for state in states):
                return self
            time.sleep(0.1)
        raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")

    def client(self, **kwargs: object) -> redis.cluster.RedisCluster:
        first = self.nodes[0]
        return redis.cluster.RedisCluster(host="127.0.0.1", port=first.port, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _cluster_ok(info: object) -> bool:
    if isinstance(info, dict):
        return str(info.get("cluster_state", "")) == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


@contextlib.contextmanager
def running_server(*extra: str) -> Iterator[RedisServer]:
    """A started private server, closed afterwards."""
    server = RedisServer(*extra).start()
    try:
        yield server
    finally:
        server.close()
