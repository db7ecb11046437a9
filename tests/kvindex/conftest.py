"""Fixtures shared by the kvindex tests. `index_factory` is parametrised over every index
backend, so one behaviour suite runs against all of them."""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import fakeredis
import pytest
import redis

from kvindex.index import BlockIndex, MemoryIndex
from kvindex.index.redis import RedisIndex, RedisIndexConfig

IndexFactory = Callable[[], BlockIndex]


def _memory() -> Iterator[IndexFactory]:
    yield MemoryIndex


# -- Redis ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
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

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None


_shared_url: str | None = None


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


def _redis_real() -> Iterator[IndexFactory]:
    client = redis.Redis.from_url(shared_redis_url())
    prefixes: list[str] = []

    def make() -> BlockIndex:
        prefixes.append(unique_prefix())
        return RedisIndex(client, RedisIndexConfig(prefix=prefixes[-1]))

    yield make
    for prefix in prefixes:
        delete_prefix(client, prefix)
    client.close()


def _redis_fake() -> Iterator[IndexFactory]:
    # fakeredis runs the same Lua (via lupa, Lua 5.1, without Redis' `bit` library: the
    # scripts fall back to arithmetic) in-process: fast, and a second implementation to
    # disagree with.
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield lambda: RedisIndex(client, RedisIndexConfig(prefix=unique_prefix()))
    client.close()


# Each backend registers a generator yielding a factory; it cleans up after the test.
BACKENDS: dict[str, Callable[[], Iterator[IndexFactory]]] = {
    "memory": _memory,
    "redis": _redis_real,
    "fakeredis": _redis_fake,
}


@pytest.fixture(params=sorted(BACKENDS))
def index_factory(request: pytest.FixtureRequest) -> Iterator[IndexFactory]:
    yield from BACKENDS[request.param]()


@pytest.fixture
def redis_url() -> str:
    return shared_redis_url()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix on the shared Redis, deleted afterwards."""
    prefix = unique_prefix()
    yield prefix
    client = redis.Redis.from_url(redis_url)
    delete_prefix(client, prefix)
    client.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServerProcess]:
    server = RedisServerProcess()
    server.start()
    yield server
    server.stop()
