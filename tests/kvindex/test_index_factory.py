"""kvindex.index.make_index: the one place index backends are built (the behaviour suite runs
over its objects, conftest.BACKENDS); here what it adds around them: the backend choice and
capacity, the lock, metrics on a registry, errors naming the field, and a config it never
modifies."""

from __future__ import annotations

import dataclasses

import fakeredis
import pytest
from prometheus_client import CollectorRegistry

from kvindex.errors import ConfigError, KVIndexError
from kvindex.index import (
    IndexConfig,
    IndexConfigError,
    LockedIndex,
    MemoryIndex,
    Store,
    StoredBlock,
    Tier,
    make_index,
    wrap_index,
)
from kvindex.index.native import NativeIndex
from kvindex.index.redis import IndexUnavailable
from kvindex.service.redis_backend import RedisBackend


def test_memory_backends_and_capacity() -> None:
    assert isinstance(make_index().inner, NativeIndex)  # default: memory, the C core
    native = make_index(IndexConfig(backend="native", max_keys=1234)).inner
    assert isinstance(native, NativeIndex) and native.max_keys == 1234
    budget = make_index(IndexConfig(backend="native", memory_budget_bytes=60_000)).inner
    assert isinstance(budget, NativeIndex) and budget.max_keys == 1000
    python = make_index(IndexConfig(backend="python", max_keys=3, evict_fraction=0.5))
    assert type(python.inner) is MemoryIndex
    python.apply("e:1", [Store(Tier.GPU, [StoredBlock(h, (h,)) for h in range(4)])])
    assert python.stats().keys < 4 and python.stats().evictions > 0  # the bound holds


def test_every_index_is_locked_and_a_locked_index_is_not_wrapped_twice() -> None:
    index = make_index(IndexConfig(backend="python"))
    assert isinstance(index, LockedIndex)
    assert wrap_index(index) is index
    assert wrap_index(MemoryIndex()).inner is not None


def test_metrics_registered_on_the_registry() -> None:
    registry = CollectorRegistry()
    index = make_index(IndexConfig(backend="python"), registry=registry)
    index.apply("e:1", [Store(Tier.GPU, [StoredBlock(1, (10,)), StoredBlock(2, (11,))])])
    assert registry.get_sample_value("kvindex_index_keys") == 2.0
    assert registry.get_sample_value("kvindex_index_engines") == 1.0


def test_redis_backend_is_the_services_with_health_metrics() -> None:
    registry = CollectorRegistry()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    index = make_index(
        IndexConfig(backend="redis", redis_prefix="kvitest-factory", redis_ttl_s=0),
        registry=registry,
        redis_client=client,
    )
    assert isinstance(index.inner, RedisBackend)
    assert index.inner.redis.config.ttl_seconds is None  # 0: never expire
    assert index.health() is None
    assert registry.get_sample_value("kvindex_index_degraded") == 0.0
    index.close()


def test_redis_that_is_down_gives_a_degraded_index_not_an_error() -> None:
    index = make_index(IndexConfig(backend="redis", redis_url="redis://127.0.0.1:1/0"))
    with pytest.raises(IndexUnavailable):
        index.apply("e:1", [Store(Tier.GPU, [StoredBlock(1, (10,))])])
    assert index.lookup([10]) == {}
    reason = index.health()
    assert reason is not None and reason.startswith("redis degraded")
    assert isinstance(IndexUnavailable("x"), KVIndexError)
    index.close()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (IndexConfig(backend="nope"), "backend"),
        (IndexConfig(max_keys=0), "max_keys"),
        (IndexConfig(memory_budget_bytes=0), "memory_budget_bytes"),
        (IndexConfig(evict_fraction=1.0), "evict_fraction"),
        (IndexConfig(backend="redis", redis_url="foo://x"), "redis_url"),
        (IndexConfig(backend="redis", redis_options={"bogus": 1}), "redis_options"),
    ],
)
def test_errors_name_the_field(config: IndexConfig, field: str) -> None:
    with pytest.raises(IndexConfigError) as caught:
        make_index(config)
    assert caught.value.field == field
    assert str(caught.value).startswith(field + " ")
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, ValueError)


def test_the_config_is_never_modified() -> None:
    options = {"socket_timeout": 0.5, "max_connections": 4}
    config = IndexConfig(backend="redis", redis_url="redis://127.0.0.1:1/0", redis_options=options)
    before = dataclasses.astuple(config)
    make_index(config).close()
    assert dataclasses.astuple(config) == before
    assert options == {"socket_timeout": 0.5, "max_connections": 4}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backend = "python"  # type: ignore[misc]
