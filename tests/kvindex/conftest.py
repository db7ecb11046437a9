"""Fixtures shared by the kvindex tests. `index_factory` is parametrised over every index
backend, so one behaviour suite runs against all of them, each built by
`kvindex.index.make_index`: the tests exercise the objects the services use (the
LockedIndex, and for Redis the service's RedisBackend over a RedisIndex)."""

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

from kvindex.index import BlockIndex, IndexConfig, LockedIndex, MemoryIndex, make_index
from kvindex.index.native import NATIVE_AVAILABLE, NativeIndex
from kvindex.index.redis import RedisIndex, redis_client_from_url
from kvindex.service.redis_backend import RedisBackend

IndexFactory = Callable[[], BlockIndex]


def _redis_index(index: LockedIndex) -> RedisIndex:
    assert isinstance(index.inner, RedisBackend)
    return index.inner.redis


def _python() -> Iterator[IndexFactory]:
    def make() -> BlockIndex:
        index = make_index(IndexConfig(backend="python"))
        assert type(index.inner) is MemoryIndex
        return index

    yield make


def _native() -> Iterator[IndexFactory]:
    # `make test` installs editable, which compiles the extension: its absence is a failure.
    assert NATIVE_AVAILABLE, "kvindex._native is not built (pip install -e . needs gcc)"

    def make() -> BlockIndex:
        index = make_index(IndexConfig(backend="native"))
        assert isinstance(index.inner, NativeIndex)
        return index

    yield make


# -- Redis (servers in redis_servers.py) ------------------------------------------------------


def _redis_real() -> Iterator[IndexFactory]:
    # From the URL, as `kvindex serve --backend redis` builds it (its own connection pool).
    url = shared_redis_url()
    made: list[LockedIndex] = []

    def make() -> BlockIndex:
        config = IndexConfig(backend="redis", redis_url=url, redis_prefix=unique_prefix())
        made.append(make_index(config))
        _redis_index(made[-1])
        return made[-1]

    yield make
    client = redis.Redis.from_url(url)
    for index in made:
        delete_prefix(client, _redis_index(index).config.prefix)
        index.close()
    client.close()


def _redis_cluster() -> Iterator[IndexFactory]:
    # One cluster client shared by every index (a client per index would rediscover slots).
    client = redis_client_from_url(shared_cluster().url)
    assert isinstance(client, redis.RedisCluster)
    made: list[LockedIndex] = []

    def make() -> BlockIndex:
        config = IndexConfig(backend="redis", redis_prefix=unique_prefix())
        made.append(make_index(config, redis_client=client))
        _redis_index(made[-1])
        return made[-1]

    yield make
    for index in made:
        schema = _redis_index(index).schema
        node = client.get_node_from_key(schema.epoch)
        keys = list(client.scan_iter(match=schema.all_patterns, target_nodes=node))
        if keys:
            client.delete(*keys)
    client.close()


def _redis_fake() -> Iterator[IndexFactory]:
    # fakeredis runs the same Lua (via lupa, Lua 5.1, without Redis' `bit` library: the
    # scripts fall back to arithmetic) in-process: fast, and a second implementation to
    # disagree with.
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())

    def make() -> BlockIndex:
        index = make_index(
            IndexConfig(backend="redis", redis_prefix=unique_prefix()), redis_client=client
        )
        _redis_index(index)
        return index

    yield make
    client.close()


# Each backend registers a generator yielding a factory; it cleans up after the test.
BACKENDS: dict[str, Callable[[], Iterator[IndexFactory]]] = {
    "python": _python,
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
