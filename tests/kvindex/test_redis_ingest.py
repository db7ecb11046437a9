"""The event applier (kvindex.ingest) over the Redis index ends where it ends over the
in-memory index: same counts (held parents resolved through Redis), same lookups of the
prompts that the stored chains spell."""

from __future__ import annotations

import random
from typing import Any

import fakeredis
import pytest
import redis
from redis_servers import delete_prefix, shared_redis_url, unique_prefix

from kvindex.index import BlockIndex, MemoryIndex, PrefixMatch
from kvindex.index.redis import RedisIndex, RedisIndexConfig
from kvindex.ingest import EventApplier
from kvindex.keys import chain_keys, root_key
from kvindex.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    EngineHash,
    Event,
)

MODEL = "m"


Stream = list[tuple[str, DecodedBatch]]
Paths = dict[tuple[str, int], list[int]]


def random_stream(seed: int, n_batches: int = 80) -> tuple[Stream, Paths]:
    """Per engine: chains of 16-token blocks grown from known blocks (sometimes from a block
    stored only in a later batch: held, then resolved), removes and clears."""
    rng = random.Random(seed)
    paths: Paths = {}
    next_hash = 1
    out: Stream = []
    for _ in range(n_batches):
        engine = rng.choice(["a:1", "b:1"])
        events: list[Event] = []
        for _ in range(rng.randrange(1, 4)):
            mine = [h for (e, h) in paths if e == engine]
            roll = rng.random()
            if roll < 0.65 or not mine:
                parent = rng.choice(mine) if mine and rng.random() < 0.8 else None
                n = rng.randrange(1, 4)
                tokens = [rng.randrange(50) for _ in range(16 * n)]
                hashes: list[EngineHash] = list(range(next_hash, next_hash + n))
                next_hash += n
                base = paths[(engine, parent)] if parent is not None else []
                for i in range(n):
                    paths[(engine, next_hash - n + i)] = base + tokens[: 16 * (i + 1)]
                medium = rng.choice(["GPU", "GPU", "CPU"])
                events.append(BlockStored(hashes, parent, tokens, 16, medium=medium))
            elif roll < 0.9:
                victims: list[EngineHash] = list(rng.sample(mine, min(len(mine), 2)))
                events.append(BlockRemoved(victims, medium=rng.choice(["GPU", "CPU"])))
            else:
                events.append(AllBlocksCleared())
        out.append((engine, DecodedBatch(events=events)))
    # A batch whose parent arrives only later: held, then resolved through the index.
    late = next_hash
    out.append(("a:1", DecodedBatch(events=[BlockStored([late + 1], late, [7] * 16, 16)])))
    out.append(("a:1", DecodedBatch(events=[BlockStored([late], None, [9] * 16, 16)])))
    paths[("a:1", late)] = [9] * 16
    paths[("a:1", late + 1)] = [9] * 16 + [7] * 16
    return out, paths


def run(index: BlockIndex, seed: int) -> tuple[list[Any], list[dict[str, PrefixMatch]]]:
    stream, paths = random_stream(seed)
    applier = EventApplier(index)
    counts: list[Any] = []
    for engine, decoded in stream:
        c = applier.apply_batch(engine, decoded, MODEL)
        counts.append((c.events, c.stored_blocks, c.removed_blocks, c.skipped, c.pending))
    lookups = [index.lookup(chain_keys(root_key(MODEL), tokens)) for tokens in paths.values()]
    return counts, lookups


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fakeredis_ingest_matches_memory(seed: int) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    assert run(RedisIndex(client), seed) == run(MemoryIndex(), seed)
    client.close()


def test_redis_ingest_matches_memory() -> None:
    client = redis.Redis.from_url(shared_redis_url())
    prefix = unique_prefix()
    try:
        counts, lookups = run(RedisIndex(client, RedisIndexConfig(prefix=prefix)), 4)
        assert (counts, lookups) == run(MemoryIndex(), 4)
        assert any(lookups) and any(c[4] for c in counts)  # matches happened, parents held
    finally:
        delete_prefix(client, prefix)
        client.close()
