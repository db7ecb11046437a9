"""Ingest benchmarks: decode-only throughput, end-to-end ingest over tcp loopback from a
separate publisher process, and bytes per indexed (block, engine) entry.

    python -m benchmarks.ingest [--runs 3] [--batches 2000] [--memory 1000000,10000000]

Batches are vLLM-0.33-like: map-encoded BlockStored events of 1-32 blocks of 16 tokens,
uint64 hashes (half >= 2**63), chained to the previous block of the same request, plus
BlockRemoved events evicting older blocks (about one removal per four blocks stored).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from kvindex.index import BlockIndex, MemoryIndex, MemoryIndexConfig, Store, StoredBlock, Tier
from kvindex.index.locked import LockedIndex
from kvindex.ingest import EventApplier
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from kvindex.wire import decode_batch

ENGINE_TOPIC = b"kv@127.0.0.1:8000@bench-model"
ENGINE = "127.0.0.1:8000"
EVENTS_PER_BATCH = 8
BLOCK = 16
SENTINEL = 0xC0FFEE
SENTINEL_PAYLOAD = msgspec.msgpack.encode(
    [0.0, [["BlockStored", [SENTINEL], None, list(range(BLOCK)), BLOCK, None, "GPU"]], None]
)


def make_batches(n_batches: int, seed: int = 0) -> tuple[list[bytes], int]:
    """Encoded payloads and the number of block operations (stored + removed) in them."""
    rng = random.Random(seed)
    live: list[int] = []
    ops = 0
    payloads: list[bytes] = []
    for _ in range(n_batches):
        events: list[dict[str, Any]] = []
        for _ in range(EVENTS_PER_BATCH):
            if live and rng.random() < 0.2:
                victims = [live.pop(rng.randrange(len(live))) for _ in range(min(len(live), 4))]
                events.append({"type": "BlockRemoved", "block_hashes": victims, "medium": "GPU"})
                ops += len(victims)
                continue
            n = rng.randint(1, 32)
            hashes = [rng.getrandbits(64) for _ in range(n)]
            parent = live[-1] if live and rng.random() < 0.7 else None
            tokens = [rng.randrange(150_000) for _ in range(n * BLOCK)]
            events.append(
                {
                    "type": "BlockStored",
                    "block_hashes": hashes,
                    "parent_block_hash": parent,
                    "token_ids": tokens,
                    "block_size": BLOCK,
                    "lora_id": None,
                    "medium": "GPU",
                }
            )
            live.extend(hashes)
            ops += n
        payloads.append(msgspec.msgpack.encode([time.time(), events, None]))
    return payloads, ops


# -- decode only ------------------------------------------------------------------------------


def bench_decode(payloads: list[bytes], runs: int) -> tuple[float, float]:
    hashes = sum(len(e.block_hashes) for p in payloads for e in decode_batch(p).events)
    times = []
    for _ in range(runs):
        start = time.process_time()
        for p in payloads:
            decode_batch(p)
        times.append(time.process_time() - start)
    median = statistics.median(times)
    return hashes / median, len(payloads) / median


def bench_in_process(payloads: list[bytes], ops: int, runs: int) -> float:
    """Decode + EventApplier + MemoryIndex on one thread, no sockets: block-ops/s."""
    times = []
    for _ in range(runs):
        applier = EventApplier(MemoryIndex(MemoryIndexConfig(max_keys=10**9)))
        start = time.process_time()
        for p in payloads:
            applier.apply_batch(ENGINE, decode_batch(p), "bench-model")
        times.append(time.process_time() - start)
    return ops / statistics.median(times)


# -- end to end -------------------------------------------------------------------------------


def _publisher(endpoint: str, n_batches: int, seed: int, go: Any, seen: Any) -> None:
    payloads, _ = make_batches(n_batches, seed)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.connect(endpoint)
    seq = 0
    probe = msgspec.msgpack.encode([time.time(), [], None])
    while not seen.is_set():  # PUB/SUB slow joiner: probe until the service sees us
        pub.send_multipart([ENGINE_TOPIC, seq.to_bytes(8, "big"), probe])
        seq += 1
        seen.wait(0.02)
    go.wait()
    for payload in payloads:
        pub.send_multipart([ENGINE_TOPIC, seq.to_bytes(8, "big"), payload])
        seq += 1
    pub.send_multipart([ENGINE_TOPIC, seq.to_bytes(8, "big"), SENTINEL_PAYLOAD])
    time.sleep(1.0)
    pub.close(linger=5000)
    ctx.term()


def bench_end_to_end(
    n_batches: int,
    seed: int,
    make_index: Callable[[MemoryIndexConfig], BlockIndex] = MemoryIndex,
) -> tuple[float, float, int]:
    """(block-ops per wall second, block-ops per CPU second of the ingest process, ops)."""
    _, ops = make_batches(n_batches, seed)
    index = LockedIndex(make_index(MemoryIndexConfig(max_keys=10**9)))
    metrics = KvindexMetrics()
    service = IngestService(
        IngestServiceConfig(zmq_bind=("tcp://127.0.0.1:*",), accept_any_engine=True),
        index,
        metrics=metrics,
    )
    endpoint = service.open()[0]
    service.start()
    ctx = mp.get_context("spawn")
    go, seen = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_publisher, args=(endpoint, n_batches, seed, go, seen))
    proc.start()

    def batches() -> float:
        return metrics.registry.get_sample_value("kvindex_ingest_batches_total") or 0.0

    while batches() == 0:
        time.sleep(0.001)
    seen.set()
    time.sleep(0.2)  # let the probes drain
    base = batches()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    go.set()
    deadline = time.monotonic() + 600
    # Poll an O(1) lookup (a metrics scrape would walk the registry and the index).
    while index.resolve(ENGINE, SENTINEL) is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    proc.join(10)
    service.stop()
    applied = batches() - base - 1
    if applied < n_batches:
        raise RuntimeError(f"only {applied} of {n_batches} batches arrived")
    return ops / wall, ops / cpu, ops


# -- memory -----------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_memory(entries: int, engines: int, sharing: int) -> float:
    """Bytes per (block, engine) entry: ``engines`` engines, each key held by ``sharing`` of
    them (1: every engine caches different prompts; 4: prefixes shared by 4 engines)."""
    rng = random.Random(1)
    gc.collect()
    index = MemoryIndex(MemoryIndexConfig(max_keys=10**9))
    before = _rss()
    keys_needed = entries // sharing
    chunk = 4096
    made = 0
    while made < keys_needed:
        n = min(chunk, keys_needed - made)
        keys = [rng.getrandbits(64) for _ in range(n)]
        first = rng.randrange(engines)
        for j in range(sharing):
            engine = f"10.0.{(first + j) % engines}.1:8000"
            blocks = [StoredBlock(rng.getrandbits(64), (k,)) for k in keys]
            index.apply(engine, [Store(Tier.GPU, blocks)])
        made += n
    gc.collect()
    used = _rss() - before
    stats = index.stats()
    assert stats.entries == keys_needed * sharing, stats
    del index
    gc.collect()
    return used / (keys_needed * sharing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--memory", default="1000000,10000000", help="entry counts")
    args = parser.parse_args()
    payloads, ops = make_batches(args.batches)
    hashes_s, batches_s = bench_decode(payloads, max(5, args.runs))
    print(
        f"decode only: {hashes_s:,.0f} block hashes/s/core ({batches_s:,.0f} batches/s, "
        f"{EVENTS_PER_BATCH} events per batch)"
    )
    in_process = bench_in_process(payloads, ops, args.runs)
    print(f"in process (decode + apply, no sockets): {in_process:,.0f} block-ops/s/core")
    results = [bench_end_to_end(args.batches, seed) for seed in range(args.runs)]
    wall = statistics.median(r[0] for r in results)
    cpu = statistics.median(r[1] for r in results)
    print(
        f"end to end over tcp loopback: median {wall:,.0f} block-ops/s wall, "
        f"{cpu:,.0f} block-ops per CPU-second of the ingest process "
        f"({args.runs} runs of {args.batches} batches, ~{results[0][2]:,} block-ops each)"
    )
    print(f"ratio end-to-end CPU rate / in-process rate: {cpu / in_process:.2f}")
    for n in (int(x) for x in args.memory.split(",") if x):
        for sharing in (1, 4):
            per = bench_memory(n, engines=8, sharing=sharing)
            print(
                f"memory: {n:,} entries, each key held by {sharing} engine(s): "
                f"{per:.0f} bytes per (block, engine) entry (RSS delta)"
            )


if __name__ == "__main__":
    main()
