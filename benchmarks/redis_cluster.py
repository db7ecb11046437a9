"""The Redis index scaled out (issue 20): sharding shapes on real prompts, then ingest and
lookups against 1 and 3 Redis Cluster shards under the same load.

``--shapes``: the Mooncake traces (/work/shared/traces, 512-token blocks: ``hash_ids``
identify each block with its whole prefix, i.e. content keys) under three sharding shapes,
no Redis needed:

* ``root``: keys sharded by the chain's first block (Dynamo-style branch sharding; depth 1
  and 2): a lookup touches one shard; the spread is that of the workload's roots;
* ``per-key``: each content key in its own slot (llm-d style): the spread is even; a lookup
  must fetch every key of the prompt from every shard it spans (no early stop);
* ``engine-group`` (shipped): engines split into as many groups as shards, each group's
  keys in one slot: a lookup is one early-stopping script per group; keys spread as the
  engines' caches do. Requests are routed by longest cached prefix (ties: least loaded)
  to ``--engines`` engines with LRU caches of ``--cache-blocks`` blocks.

Throughput (default): for each of 1 and 3 shards a private Redis Cluster on loopback (one
node per shard, ``redis-cli --cluster create``), ``--writers`` writer processes (the replica
side: each owns a share of ``--engines`` engines, as leased writers do) apply the trace's
store / evict batches through ``RedisIndex.apply_many`` (pipelines of ``--pipeline``
batches); then one client times ``--lookups`` lookups of the trace's prompts (after a few untimed
ones that open its connections). Reported:
block-ops/s, lookup p50/p99, CPU per block-op on the Redis side (``INFO cpu`` of every
node) and the replica side (the writers' CPU time).

Run: ``python -m benchmarks.redis_cluster [--shapes] [--requests 4000] [--writers 2]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from kvindex.index import Remove, Store, StoredBlock, Tier
from kvindex.index.base import IndexOp
from kvindex.index.redis import RedisIndex, RedisIndexConfig

TRACES = Path("/work/shared/traces")
SLOTS = 16384

Batch = tuple[str, list[IndexOp]]


def load_trace(name: str, limit: int | None = None) -> list[list[int]]:
    chains = []
    with (TRACES / name).open() as f:
        for line in f:
            chains.append(json.loads(line)["hash_ids"])
            if limit is not None and len(chains) >= limit:
                break
    return chains


def engine_name(i: int) -> str:
    return f"10.1.{i // 256}.{i % 256}:8000"


def route(
    chains: list[list[int]], engines: int, cache_blocks: int
) -> tuple[list[int], list[Batch]]:
    """Route each request to the engine with the best cached prefix less a load penalty
    (one block per request above the least loaded engine), simulate LRU caches; returns
    the engine of each request and the event batches (a store of the uncached suffix after
    its parent, removes of the evicted blocks)."""
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(engines)]
    load = [0] * engines
    chosen: list[int] = []
    batches: list[Batch] = []
    for chain in chains:
        best, best_hit, best_score = 0, 0, float("-inf")
        least = min(load)
        for e in range(engines):
            cache, hit = caches[e], 0
            for h in chain:
                if h not in cache:
                    break
                hit += 1
            score = hit - (load[e] - least)
            if score > best_score:
                best, best_hit, best_score = e, hit, score
        load[best] += 1
        chosen.append(best)
        cache = caches[best]
        for h in chain[:best_hit]:
            cache.move_to_end(h)
        new = chain[best_hit:]
        ops: list[IndexOp] = []
        if new:
            ops.append(Store(Tier.GPU, [StoredBlock(h, (h,)) for h in new]))
        for h in new:
            cache[h] = None
        evicted = []
        while len(cache) > cache_blocks:
            evicted.append(cache.popitem(last=False)[0])
        if evicted:
            ops.append(Remove(Tier.GPU, evicted))
        if ops:
            batches.append((engine_name(best), ops))
    return chosen, batches


def spread(counts: Sequence[int]) -> str:
    mean = sum(counts) / len(counts)
    return f"max/mean {max(counts) / mean:.2f}, min/mean {min(counts) / mean:.2f}"


def shapes(args: argparse.Namespace) -> None:
    for trace in ("mooncake_conversation_trace.jsonl", "mooncake_synthetic_trace.jsonl"):
        chains = load_trace(trace, args.requests)
        blocks = {h for c in chains for h in c}
        print(f"\n## {trace}: {len(chains)} requests, {len(blocks)} distinct blocks")
        for shards in (3, 16):
            print(f"\n{shards} shards:")
            for depth in (1, 2):
                per = [0] * shards
                owner: dict[int, int] = {}
                for c in chains:
                    root = tuple(c[:depth])
                    shard = key_slot(repr(root).encode()) * shards // SLOTS
                    for h in c:
                        if h not in owner:
                            owner[h] = shard
                            per[shard] += 1
                print(f"  root depth {depth}: keys per shard {per} ({spread(per)}); 1 shard/lookup")
            per = [0] * shards
            for h in blocks:
                per[key_slot(str(h).encode()) * shards // SLOTS] += 1
            touched = [
                len({key_slot(str(h).encode()) * shards // SLOTS for h in c}) for c in chains
            ]
            fetched = sum(len(c) for c in chains) / len(chains)
            print(
                f"  per-key: keys per shard ({spread(per)}); shards/lookup mean "
                f"{statistics.mean(touched):.1f}; keys fetched/lookup {fetched:.1f} "
                "(all, no early stop)"
            )
            chosen, _ = route(chains, args.engines, args.cache_blocks)
            groups: list[set[int]] = [set() for _ in range(shards)]
            for c, e in zip(chains, chosen, strict=True):
                groups[e % shards].update(c)
            per = [len(g) for g in groups]
            print(
                f"  engine-group ({args.engines} engines, keys ever stored): keys per shard {per} "
                f"({spread(per)}); {min(shards, args.engines)} scripts/lookup, each early-stopping"
            )


# -- throughput ------------------------------------------------------------------------------


def _writer(
    url: str, prefix: str, groups: int, batches: list[Batch], pipeline: int, out: Any
) -> None:
    index = RedisIndex(
        redis.RedisCluster.from_url(url.replace("redis+cluster", "redis")),
        RedisIndexConfig(prefix=prefix, groups=groups, ttl_seconds=3600),
    )
    for engine, _ in batches[:50]:
        index.group_of(engine, allocate=True)
    t0, c0 = time.perf_counter(), time.process_time()
    ops = 0
    for start in range(0, len(batches), pipeline):
        chunk = batches[start : start + pipeline]
        index.apply_many([(e, o, None) for e, o in chunk])
    for _, o in batches:
        for op in o:
            ops += len(op.blocks) if isinstance(op, Store) else len(op.engine_hashes)  # type: ignore[union-attr]
    out.put((ops, time.perf_counter() - t0, time.process_time() - c0))


# Lookups before the timed ones: the client's first call opens its connection to every node
# and loads the scripts (~1.5-3.5 ms once), which is set-up, not a lookup's latency.
LOOKUP_WARMUP = 20


def redis_cpu(nodes: list[redis.Redis]) -> float:
    total = 0.0
    for node in nodes:
        info = node.info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


def throughput(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "kvindex"))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from redis_servers import RedisClusterProcess

    chains = load_trace("mooncake_conversation_trace.jsonl", args.requests)
    _, batches = route(chains, args.engines, args.cache_blocks)
    prompts = [c for c in chains if len(c) >= 4][: args.lookups]
    print(f"load: {len(batches)} batches from {len(chains)} requests on {args.engines} engines")
    results = {}
    for shards in (1, 3):
        cluster = RedisClusterProcess()
        cluster.ports = cluster._ports(shards)
        cluster.url = f"redis+cluster://127.0.0.1:{cluster.ports[0]}"
        try:
            if shards == 1:  # redis-cli --cluster create needs 3 masters: one node owns all
                import subprocess
                from unittest import mock

                real_run = subprocess.run

                def one_node(
                    cmd: list[str],
                    port: int = cluster.ports[0],
                    real_run: Any = real_run,
                    **kw: Any,
                ) -> Any:
                    if "--cluster" in cmd:
                        redis.Redis(port=port).execute_command(
                            "CLUSTER", "ADDSLOTSRANGE", 0, SLOTS - 1
                        )
                        return None
                    return real_run(cmd, **kw)

                with mock.patch.object(subprocess, "run", one_node):
                    cluster.start()
            else:
                cluster.start()
            nodes = [redis.Redis(port=p) for p in cluster.ports]
            prefix = "bench-" + uuid.uuid4().hex[:8]
            engines_of = [
                [
                    b
                    for b in batches
                    if int(b[0].rsplit(".", 1)[1].split(":")[0]) % args.writers == w
                ]
                for w in range(args.writers)
            ]
            queue: Any = multiprocessing.Queue()
            cpu0 = redis_cpu(nodes)
            t0 = time.perf_counter()
            procs = [
                multiprocessing.Process(
                    target=_writer, args=(cluster.url, prefix, shards, part, args.pipeline, queue)
                )
                for part in engines_of
            ]
            for p in procs:
                p.start()
            got = [queue.get(timeout=600) for _ in procs]
            for p in procs:
                p.join()
            wall = time.perf_counter() - t0
            redis_s = redis_cpu(nodes) - cpu0
            ops = sum(g[0] for g in got)
            writer_cpu = sum(g[2] for g in got)
            client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
            index = RedisIndex(client, RedisIndexConfig(prefix=prefix, groups=shards))
            for chain in prompts[:LOOKUP_WARMUP]:  # connections to every node, script loads
                index.lookup(chain)
            lat = []
            for chain in prompts:
                t = time.perf_counter()
                index.lookup(chain)
                lat.append(time.perf_counter() - t)
            lat.sort()
            keys_per_node = [n.dbsize() for n in nodes]
            results[shards] = {
                "block_ops_per_s": ops / wall,
                "lookup_p50_ms": lat[len(lat) // 2] * 1000,
                "lookup_p99_ms": lat[int(len(lat) * 0.99)] * 1000,
                "redis_cpu_us_per_op": redis_s / ops * 1e6,
                "replica_cpu_us_per_op": writer_cpu / ops * 1e6,
                "keys_per_node": keys_per_node,
                "block_ops": ops,
            }
            print(shards, "shards:", json.dumps(results[shards]))
            client.close()
            for n in nodes:
                n.close()
        finally:
            cluster.stop()
    print(json.dumps(results, indent=1))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", action="store_true")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--engines", type=int, default=12)
    parser.add_argument("--cache-blocks", type=int, default=4000)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--pipeline", type=int, default=128)
    parser.add_argument("--lookups", type=int, default=2000)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if args.shapes:
        shapes(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
