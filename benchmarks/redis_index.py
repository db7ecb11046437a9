"""Redis index vs in-memory index, side by side in one run.

* lookups/s of an 8k-token prompt (512 content keys) over 64 engines, in two shapes:
  ``all-hold`` (every engine holds the whole prompt: the full walk with every engine alive,
  the worst case) and ``mixed`` (engine i holds the first 8*i keys, some in CPU);
* for Redis, two lookup strategies: the shipped Lua walk (one EVALSHA) and a client-side
  alternative measured for comparison only (one MGET of all 3 x 512 holder bitmaps, then the
  walk in Python) -- both one round trip;
* ingest block-ops/s: batches of 32 stored blocks (+ a remove of 8) per apply, as a vLLM
  event batch;
* resolve/s (one round trip; the applier resolves parents outside the batch);
* Redis memory per holder key and per engine-map entry (MEMORY USAGE), to check the
  estimates in kvindex/index/redis.py.

Run: ``python -m benchmarks.redis_index [--url redis://127.0.0.1:6379/0] [--repeats 5]``.
Uses a fresh key prefix and deletes it afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable, Sequence

import redis

from kvindex.index import BlockIndex, MemoryIndex, Remove, Store, StoredBlock, Tier
from kvindex.index.redis import RedisIndex, RedisIndexConfig

PROMPT_KEYS = 512
ENGINES = 64
_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def engine_name(i: int) -> str:
    return f"10.0.{i // 256}.{i % 256}:8000"


def fill(index: BlockIndex, prompt: Sequence[int], shape: str) -> None:
    for i in range(ENGINES):
        length = PROMPT_KEYS if shape == "all-hold" else 8 * i
        gpu = length if shape == "all-hold" else length // 2
        blocks = [StoredBlock((i << 20) + j, (k,)) for j, k in enumerate(prompt[:length])]
        ops = [Store(Tier.GPU, blocks[:gpu])]
        if gpu < length:
            ops.append(Store(Tier.CPU, blocks[gpu:]))
        index.apply(engine_name(i), ops)


def rate(fn: Callable[[], object], min_seconds: float = 0.5) -> float:
    """Calls per second of ``fn`` over at least ``min_seconds``."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def mget_lookup(client: redis.Redis, index: RedisIndex, keys: Sequence[int]) -> dict[str, int]:
    """The alternative strategy: fetch every holder bitmap in one MGET and walk in Python.
    Returns blocks per engine (tiers left out: this is only for the timing comparison)."""
    schema = index.schema
    names = [schema.holders(tier, k) for k in keys for tier in Tier]
    values = client.mget(names)
    slot_names = {int(s): n.decode() for s, n in client.hgetall(schema.slot_names).items()}
    active, matched = -1, {}
    for position in range(len(keys)):
        held = 0
        for value in values[3 * position : 3 * position + 3]:
            if value:
                held |= int.from_bytes(value.translate(_REVERSED), "little")
        held &= active
        dropped = active & ~held
        if dropped and position and active != -1:
            for slot in range(dropped.bit_length()):
                if dropped >> slot & 1:
                    matched[slot] = position
        active = held
        if not active:
            break
    else:
        for slot in range(active.bit_length()):
            if active >> slot & 1:
                matched[slot] = len(keys)
    return {slot_names[s]: n for s, n in matched.items() if s in slot_names}


def ingest_rate(index: BlockIndex, batches: int) -> float:
    ops_done, start = 0, time.perf_counter()
    for b in range(batches):
        engine = engine_name(b % ENGINES)
        base = b * 32
        blocks = [StoredBlock(base + j, (1_000_000 + base + j,)) for j in range(32)]
        index.apply(
            engine, [Store(Tier.GPU, blocks), Remove(Tier.GPU, [base - 64 + j for j in range(8)])]
        )
        ops_done += 40
    return ops_done / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=1500)
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.url)
    prompt = [(0x9E3779B97F4A7C15 * (i + 1)) % (1 << 64) for i in range(PROMPT_KEYS)]
    prefixes: list[str] = []

    def redis_index() -> RedisIndex:
        prefixes.append("kvibench-" + uuid.uuid4().hex[:8])
        return RedisIndex(client, RedisIndexConfig(prefix=prefixes[-1]))

    try:
        print(f"redis {client.info('server')['redis_version']} at {args.url}")
        print(f"lookups/s, {PROMPT_KEYS}-key prompt, {ENGINES} engines (median of {args.repeats})")
        for shape in ("all-hold", "mixed"):
            memory, red = MemoryIndex(), redis_index()
            fill(memory, prompt, shape)
            fill(red, prompt, shape)
            expected = memory.lookup(prompt)
            assert len(expected) >= ENGINES - 1, "the prompt must match the engines"
            assert red.lookup(prompt) == expected, "redis and memory disagree"
            assert mget_lookup(client, red, prompt) == {e: m.blocks for e, m in expected.items()}
            runs: dict[str, list[float]] = {"memory": [], "redis-lua": [], "redis-mget": []}
            for _ in range(args.repeats):  # interleaved, so load drifts hit all alike
                runs["memory"].append(rate(lambda m=memory: m.lookup(prompt)))
                runs["redis-lua"].append(rate(lambda r=red: r.lookup(prompt)))
                runs["redis-mget"].append(rate(lambda r=red: mget_lookup(client, r, prompt)))
            med = {name: statistics.median(v) for name, v in runs.items()}
            print(
                f"  {shape:9s} memory {med['memory']:9.0f}  redis-lua {med['redis-lua']:7.0f}"
                f"  redis-mget {med['redis-mget']:7.0f}  memory/redis-lua"
                f" {med['memory'] / med['redis-lua']:.1f}x  mget/lua"
                f" {med['redis-mget'] / med['redis-lua']:.2f}x"
            )
        ingest: dict[str, list[float]] = {"memory": [], "redis": []}
        for _ in range(args.repeats):
            ingest["memory"].append(ingest_rate(MemoryIndex(), args.batches))
            ingest["redis"].append(ingest_rate(redis_index(), args.batches))
        med = {name: statistics.median(v) for name, v in ingest.items()}
        print(
            f"ingest block-ops/s (32 stores + 8 removes per apply): memory {med['memory']:.0f}"
            f"  redis {med['redis']:.0f}  ratio {med['memory'] / med['redis']:.1f}x"
            f"  ({med['redis'] / 40:.0f} applies/s)"
        )
        # resolve: the applier's one extra round trip per event whose parent is not in the
        # same batch.
        memory, red = MemoryIndex(), redis_index()
        fill(memory, prompt, "mixed")
        fill(red, prompt, "mixed")
        name = engine_name(ENGINES - 1)
        target = ((ENGINES - 1) << 20) + 100
        assert red.resolve(name, target) == memory.resolve(name, target) is not None
        resolves: dict[str, list[float]] = {"memory": [], "redis": []}
        for _ in range(args.repeats):
            resolves["memory"].append(rate(lambda: memory.resolve(name, target), 0.2))
            resolves["redis"].append(rate(lambda: red.resolve(name, target), 0.2))
        med = {name_: statistics.median(v) for name_, v in resolves.items()}
        print(
            f"resolve/s: memory {med['memory']:.0f}  redis {med['redis']:.0f}"
            f"  ({1e6 / med['redis']:.0f} us per round trip)"
        )
        red = redis_index()
        blocks = [StoredBlock(j, (5_000_000 + j,)) for j in range(20_000)]
        red.apply(engine_name(0), [Store(Tier.GPU, blocks)])
        holder = client.memory_usage(red.schema.holders(Tier.GPU, 5_000_123))
        map_bytes = client.memory_usage(red.schema.engine_map(0, Tier.GPU), samples=0) or 0
        print(
            f"memory: holder key {holder} B, engine-map entry {map_bytes / len(blocks):.0f} B"
            f" (estimates used by stats(): see BYTES_PER_* in kvindex/index/redis.py)"
        )
    finally:
        for prefix in prefixes:
            keys = list(client.scan_iter(match="{" + prefix + "}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        client.close()


if __name__ == "__main__":
    main()
