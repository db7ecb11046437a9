"""Physical copies in the Redis index (docs/index.md, "Duplicates"): the Lua scripts count
copies per (engine, engine block hash) as MemoryIndex does. A side-by-side hypothesis test
(as test_native_index.py runs the C core against MemoryIndex) drives MemoryIndex and
RedisIndex (on real Redis, one group and three groups, and on fakeredis, whose Lua has no
`bit` library) through the same operations, including `copies_from` and `age_copies`, and
compares every answer; plus the documented cases one by one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_servers import shared_redis_url, unique_prefix

from kvindex.index import (
    Clear,
    IndexOp,
    MemoryIndex,
    PrefixMatch,
    Remove,
    Store,
    StoredBlock,
    Tier,
)
from kvindex.index.redis import RedisIndex, RedisIndexConfig

ENGINES = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]

engine_hashes = st.one_of(st.integers(0, 8), st.integers(-3, -1), st.sampled_from([b"\x01" * 4]))
tiers = st.sampled_from(list(Tier))


def _keys_of(engine_hash: Any) -> tuple[int, ...]:
    """Keys fixed by the engine hash: a hash never names two different blocks here, since a
    block overwritten under its hash leaves orphan bits that the backends re-attribute at
    different times (MemoryIndex allocates a slot on any apply, Redis only on a store) -- an
    orphan quirk outside copy counting."""
    n = int.from_bytes(repr(engine_hash).encode(), "little")
    return (n % 11,) if n % 3 else (n % 11, (n // 11) % 11)


stored_block = engine_hashes.map(lambda h: StoredBlock(h, _keys_of(h)))
index_op = st.one_of(
    st.builds(Store, tiers, st.lists(stored_block, max_size=4), st.none() | st.integers(0, 4)),
    st.builds(Remove, tiers, st.lists(engine_hashes, max_size=4)),
    st.builds(Clear, st.one_of(st.none(), tiers)),
)
step = st.one_of(
    st.tuples(st.just("apply"), st.sampled_from(ENGINES), st.lists(index_op, max_size=3)),
    st.tuples(st.just("purge"), st.sampled_from(ENGINES), st.none()),
    st.tuples(st.just("age"), st.none(), st.none()),
)


def _cleanup(client: redis.Redis, index: RedisIndex) -> None:
    for keys in index.schema.group_keys:
        found = list(client.scan_iter(match=keys.base + "*", count=1000))
        if found:
            client.delete(*found)


@pytest.fixture(params=["redis", "redis-3-groups", "fakeredis"])
def make_redis(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "fakeredis":
        client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        client = redis.Redis.from_url(shared_redis_url())
    groups = 3 if request.param == "redis-3-groups" else 1
    made: list[RedisIndex] = []

    def make() -> RedisIndex:
        index = RedisIndex(
            client, RedisIndexConfig(prefix=unique_prefix(), ttl_seconds=None, groups=groups)
        )
        made.append(index)
        return index

    yield make
    for index in made:
        _cleanup(client, index)
    client.close()


def _same(red: RedisIndex, memory: MemoryIndex, hashes: list[Any]) -> None:
    everything = list(range(11))
    for prefix_len in (1, 3, 11):
        keys = everything[:prefix_len]
        assert red.lookup(keys) == memory.lookup(keys)
    for start in range(11):  # chains starting anywhere: every key's holders
        assert red.lookup([start]) == memory.lookup([start])
    assert red.engines() == memory.engines()
    for engine in ENGINES:
        for h in hashes:
            assert red.resolve(engine, h) == memory.resolve(engine, h), (engine, h)
    r, m = red.stats(), memory.stats()
    assert (r.keys, r.entries, r.engines) == (m.keys, m.entries, m.engines)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(step, max_size=14))
def test_redis_matches_memory_index_with_copies(
    make_redis: Any, steps: list[tuple[str, Any, Any]]
) -> None:
    red, memory = make_redis(), MemoryIndex()
    hashes: list[Any] = [0, -1, b"\x01" * 4]
    for kind, engine, ops in steps:
        if kind == "apply":
            batch: list[IndexOp] = ops
            red.apply(engine, batch)
            memory.apply(engine, batch)
            for op in batch:
                if isinstance(op, Store):
                    hashes.extend(b.engine_hash for b in op.blocks)
        elif kind == "purge":
            red.purge(engine)
            memory.purge(engine)
        else:
            red.age_copies()
            memory.age_copies()
        _same(red, memory, hashes[-8:])


def _block(h: int) -> StoredBlock:
    return StoredBlock(h, (h * 10,))


def test_duplicates_as_documented(make_redis: Any) -> None:
    """Two copies of block 2 (stored again after its parent: copies_from), one removed:
    still held; the copy that absorbed the remove is dropped when no store confirms it
    within two ticks; a confirming store keeps it; at most MAX_COPIES copies count."""
    index: RedisIndex = make_redis()
    e = ENGINES[0]
    chain = [_block(1), _block(2)]
    index.apply(e, [Store(Tier.GPU, chain)])
    index.apply(e, [Store(Tier.GPU, chain, copies_from=1)])  # block 2 again: a 2nd copy
    index.apply(e, [Remove(Tier.GPU, [2])])
    assert index.lookup([10, 20]) == {e: PrefixMatch(2, [2, 0, 0])}  # one copy left
    index.apply(e, [Remove(Tier.GPU, [2])])
    assert index.lookup([10, 20]) == {e: PrefixMatch(1, [1, 0, 0])}  # the last one went

    # An absorbed remove needs a confirming store within two ticks.
    index.apply(e, [Store(Tier.GPU, chain)])
    index.apply(e, [Store(Tier.GPU, chain, copies_from=1)])
    index.apply(e, [Remove(Tier.GPU, [2])])
    index.age_copies()
    index.age_copies()
    assert index.lookup([10, 20]) == {e: PrefixMatch(1, [1, 0, 0])}

    index.apply(e, [Store(Tier.GPU, chain)])
    index.apply(e, [Store(Tier.GPU, chain, copies_from=1)])
    index.apply(e, [Remove(Tier.GPU, [2])])
    index.age_copies()
    index.apply(e, [Store(Tier.GPU, chain)])  # a re-announced hit confirms it
    index.age_copies()
    index.age_copies()
    assert index.lookup([10, 20]) == {e: PrefixMatch(2, [2, 0, 0])}

    # Capped: six more copies count as three extra (MAX_COPIES = 4 in all).
    index.apply(e, [Clear()])
    index.apply(e, [Store(Tier.GPU, chain)])
    for _ in range(6):
        index.apply(e, [Store(Tier.GPU, chain, copies_from=1)])
    for held in (True, True, True, False):
        index.apply(e, [Remove(Tier.GPU, [2])])
        assert (index.lookup([10, 20])[e].blocks == 2) is held


def test_replicas_age_once_per_interval() -> None:
    """Every replica's ingest calls age_copies; with copy_age_interval_s the copy clock of
    a group ticks once per interval whoever calls, so N replicas do not age N times faster."""
    client = redis.Redis.from_url(shared_redis_url())
    prefix = unique_prefix()
    a, b = (
        RedisIndex(client, RedisIndexConfig(prefix=prefix, copy_age_interval_s=60.0))
        for _ in range(2)
    )
    try:
        e = ENGINES[0]
        chain = [_block(1), _block(2)]
        a.apply(e, [Store(Tier.GPU, chain)])
        a.apply(e, [Store(Tier.GPU, chain, copies_from=1)])
        a.apply(e, [Remove(Tier.GPU, [2])])
        a.age_copies()
        b.age_copies()  # within the interval: no second tick
        assert b.lookup([10, 20]) == {e: PrefixMatch(2, [2, 0, 0])}
    finally:
        _cleanup(client, a)
        client.close()
