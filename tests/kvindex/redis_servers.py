"""Real Redis servers for the Redis index tests: the shared 127.0.0.1:6379 (or a private
server when it does not answer), private restartable servers, and a private 3-node Redis
Cluster. Imported by conftest.py and the test_redis_* modules (a uniquely named module, so
`import` is unambiguous whatever other conftest.py files exist)."""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest
import redis

from tests.ports import free_port


class RedisServerProcess:
    """A private, non-persistent redis-server on a free loopback port (restartable on the
    same port, so clients see the same URL come back empty)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra_args: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self._proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_ping(self.port)

    def signal(self, signum: int) -> None:
        """Send a signal (SIGSTOP / SIGCONT: a server that hangs, then resumes)."""
        assert self._proc is not None
        self._proc.send_signal(signum)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None


class RedisClusterProcess:
    """Three private cluster-enabled redis-servers joined by ``redis-cli --cluster create``
    (no replicas): the smallest real Redis Cluster, so slots really live on several nodes."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kvindex-cluster-")
        self.ports = self._ports(3)
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"
        self._procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def _ports(n: int) -> list[int]:
        ports: list[int] = []
        while len(ports) < n:  # the cluster bus listens on port + 10000
            port = free_port()
            if port + 10000 < 65536 and port not in ports:
                with socket.socket() as sock:
                    try:
                        sock.bind(("127.0.0.1", port + 10000))
                    except OSError:
                        continue
                ports.append(port)
        return ports

    def start(self) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            pytest.skip("redis-server / redis-cli are not installed")
        for port in self.ports:
            self._procs.append(
                subprocess.Popen(
                    [
                        server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        self.dir,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            _wait_ping(port)
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        deadline = time.monotonic() + 20
        for port in self.ports:
            node = redis.Redis(port=port, decode_responses=True)
            while node.cluster("info").get("cluster_state") != "ok":
                assert time.monotonic() < deadline, "cluster did not converge"
                time.sleep(0.05)
            node.close()

    def stop(self) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait(timeout=10)
        self._procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_ping(port: int) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    client.close()


_shared_url: str | None = None
_cluster: RedisClusterProcess | None = None
_cluster_error: Exception | None = None


def shared_cluster() -> RedisClusterProcess:
    """A private 3-node cluster, started once per session on first use."""
    global _cluster, _cluster_error
    if _cluster_error is not None:
        raise RuntimeError("the test cluster failed to start") from _cluster_error
    if _cluster is None:
        cluster = RedisClusterProcess()
        atexit.register(cluster.stop)
        try:
            cluster.start()
        except Exception as exc:  # not retried by every later test
            _cluster_error = exc
            cluster.stop()
            raise
        _cluster = cluster
    return _cluster


def shared_redis_url() -> str:
    """127.0.0.1:6379 if it answers, else a private server started once per session."""
    global _shared_url
    if _shared_url is None:
        try:
            redis.Redis(port=6379, socket_connect_timeout=0.5).ping()
            _shared_url = "redis://127.0.0.1:6379/0"
        except redis.RedisError:
            server = RedisServerProcess()
            server.start()
            atexit.register(server.stop)
            _shared_url = server.url
    return _shared_url


def unique_prefix() -> str:
    return "kvitest-" + uuid.uuid4().hex[:12]


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match="{" + prefix + "}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
