"""Fixtures shared by the kvindex tests. `index_factory` is parametrised over every index
backend, so one behaviour suite runs against all of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import fakeredis
import pytest
import redis
from redis_servers import (
    RedisServerProcess,
    delete_prefix,
    shared_cluster,
    shared_redis_url,
    unique_prefix,
)

from kvindex.index import BlockIndex, MemoryIndex
from kvindex.index.native import NATIVE_AVAILABLE, NativeIndex
from kvindex.index.redis import RedisIndex, RedisIndexConfig, redis_client_from_url

IndexFactory = Callable[[], BlockIndex]


def _memory() -> Iterator[IndexFactory]:
    yield MemoryIndex


def _native() -> Iterator[IndexFactory]:
    # `make test` installs editable, which compiles the extension: its absence is a failure.
    assert NATIVE_AVAILABLE, "kvindex._native is not built (pip install -e . needs gcc)"
    yield NativeIndex


# -- Redis (servers in redis_servers.py) ------------------------------------------------------


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


def _redis_cluster() -> Iterator[IndexFactory]:
    client = redis_client_from_url(shared_cluster().url)
    assert isinstance(client, redis.RedisCluster)
    indexes: list[RedisIndex] = []

    def make() -> BlockIndex:
        indexes.append(RedisIndex(client, RedisIndexConfig(prefix=unique_prefix())))
        return indexes[-1]

    yield make
    for index in indexes:
        node = client.get_node_from_key(index.schema.epoch)
        keys = list(client.scan_iter(match=index.schema.all_patterns, target_nodes=node))
        if keys:
            client.delete(*keys)
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
    "native": _native,
    "redis": _redis_real,
    "redis-cluster": _redis_cluster,
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
