"""Native (C) vs pure-Python in-memory index, side by side in one run.

    python -m benchmarks.native_index [--runs 3] [--batches 2000] [--memory 1000000,10000000]

* memory: bytes per (block, engine) entry (RSS delta of a fresh process; for native also
  stats().approx_bytes) at each entry count, keys held by 1 or by 4 of 8 engines;
* apply: Store/Remove block-ops per CPU-second through ``index.apply`` alone (pre-built
  ops); decode + EventApplier + index in process; and end to end through IngestService over
  tcp loopback (benchmarks/ingest.py's batches and publisher). "python" is MemoryIndex with
  content keys and StoredBlocks made in Python (xxhash per block), "native" NativeIndex
  with the C fast paths of kvindex.keys.chain_keys and EventApplier;
* lookup: p50/p99 of one 8k-token prompt (512 keys) over 64 engines holding prefixes of it,
  GPU only, and with a CPU/storage tier mix (a third of the engines hold the tail of their
  prefix in CPU, a third in storage).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import random
import statistics
import time
from collections.abc import Callable

from benchmarks.ingest import ENGINE, _rss, bench_end_to_end, make_batches
from kvindex import ingest as ingest_module
from kvindex import keys as keys_module
from kvindex.index import (
    BlockIndex,
    MemoryIndex,
    MemoryIndexConfig,
    Remove,
    Store,
    StoredBlock,
    Tier,
)
from kvindex.index.native import NativeIndex
from kvindex.ingest import EventApplier
from kvindex.wire import decode_batch

IMPLS: dict[str, Callable[[MemoryIndexConfig], BlockIndex]] = {
    "python": MemoryIndex,
    "native": NativeIndex,
}
BIG = MemoryIndexConfig(max_keys=10**9)


# -- memory -----------------------------------------------------------------------------------


def _memory_child(impl: str, entries: int, sharing: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    rng = random.Random(1)
    engines = 8
    gc.collect()
    before = _rss()
    index = IMPLS[impl](BIG)
    keys_needed = entries // sharing
    made = 0
    while made < keys_needed:
        n = min(4096, keys_needed - made)
        keys = [rng.getrandbits(64) for _ in range(n)]
        first = rng.randrange(engines)
        for j in range(sharing):
            engine = f"10.0.{(first + j) % engines}.1:8000"
            blocks = [StoredBlock(rng.getrandbits(64), (k,)) for k in keys]
            index.apply(engine, [Store(Tier.GPU, blocks)])
        made += n
    del keys, blocks
    gc.collect()
    used = _rss() - before
    stats = index.stats()
    assert stats.entries == keys_needed * sharing, stats
    n_entries = keys_needed * sharing
    out.put((used / n_entries, stats.approx_bytes / n_entries))


def bench_memory(impl: str, entries: int, sharing: int) -> tuple[float, float]:
    """(RSS bytes per entry, approx_bytes per entry), measured in a fresh process."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(impl, entries, sharing, out))
    proc.start()
    result: tuple[float, float] = out.get(timeout=1800)
    proc.join()
    return result


# -- apply ------------------------------------------------------------------------------------


def make_ops(n_batches: int, seed: int = 0) -> tuple[list[list[Store | Remove]], int]:
    """Per batch the ops EventApplier would pass (Stores of 1-32 blocks, Removes of 4)."""
    rng = random.Random(seed)
    live: list[int] = []
    batches: list[list[Store | Remove]] = []
    ops = 0
    for _ in range(n_batches):
        batch: list[Store | Remove] = []
        for _ in range(8):
            if live and rng.random() < 0.2:
                victims = [live.pop(rng.randrange(len(live))) for _ in range(min(len(live), 4))]
                batch.append(Remove(Tier.GPU, victims))
                ops += len(victims)
                continue
            n = rng.randint(1, 32)
            hashes = [rng.getrandbits(64) for _ in range(n)]
            batch.append(Store(Tier.GPU, [StoredBlock(h, (rng.getrandbits(64),)) for h in hashes]))
            live.extend(hashes)
            ops += n
        batches.append(batch)
    return batches, ops


def bench_apply(impl: str, batches: list[list[Store | Remove]], ops: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        index = IMPLS[impl](BIG)
        start = time.process_time()
        for batch in batches:
            index.apply(ENGINE, batch)
        times.append(time.process_time() - start)
    return ops / statistics.median(times)


class pure_python_keys:
    """Within: chain keys and StoredBlocks made in Python (the all-Python baseline)."""

    def __enter__(self) -> None:
        self.saved = keys_module._native_chain_keys, ingest_module._native_stored_blocks
        keys_module._native_chain_keys = None
        ingest_module._native_stored_blocks = None

    def __exit__(self, *exc: object) -> None:
        keys_module._native_chain_keys, ingest_module._native_stored_blocks = self.saved


def bench_ingest(impl: str, payloads: list[bytes], ops: int, runs: int) -> float:
    """Decode + EventApplier + index in process; python also computes keys in Python."""
    times = []
    for _ in range(runs):
        applier = EventApplier(IMPLS[impl](BIG))
        with pure_python_keys() if impl == "python" else contextlib.nullcontext():
            start = time.process_time()
            for p in payloads:
                applier.apply_batch(ENGINE, decode_batch(p), "bench-model")
            times.append(time.process_time() - start)
    return ops / statistics.median(times)


def bench_service(impl: str, n_batches: int, runs: int) -> float:
    """End to end over tcp loopback (benchmarks/ingest.py): block-ops per CPU-second."""
    rates = []
    for seed in range(runs):
        with pure_python_keys() if impl == "python" else contextlib.nullcontext():
            rates.append(bench_end_to_end(n_batches, seed, IMPLS[impl])[1])
    return statistics.median(rates)


# -- lookup -----------------------------------------------------------------------------------


def fill_lookup(
    impl: str, n_keys: int, engines: int, tier_mix: bool
) -> tuple[BlockIndex, list[int]]:
    rng = random.Random(7)
    index = IMPLS[impl](BIG)
    prompt = [rng.getrandbits(64) for _ in range(n_keys)]
    for e in range(engines):
        length = rng.randrange(n_keys // 4, n_keys + 1)
        blocks = [StoredBlock(rng.getrandbits(64), (k,)) for k in prompt[:length]]
        # background: other prompts' blocks, so tables are not tiny
        other = [StoredBlock(rng.getrandbits(64), (rng.getrandbits(64),)) for _ in range(2000)]
        if tier_mix and e % 3:
            lower = Tier.CPU if e % 3 == 1 else Tier.STORAGE
            split = length // 2
            ops = [Store(Tier.GPU, blocks[:split]), Store(lower, blocks[split:])]
        else:
            ops = [Store(Tier.GPU, blocks)]
        index.apply(f"10.1.0.{e}:8000", [*ops, Store(Tier.GPU, other)])
    return index, prompt


def bench_lookup(impl: str, tier_mix: bool, iterations: int) -> tuple[float, float]:
    index, prompt = fill_lookup(impl, 512, 64, tier_mix)
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        index.lookup(prompt)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--memory", default="1000000,10000000", help="entry counts ('': skip)")
    parser.add_argument("--memory-only", action="store_true", help="skip apply and lookup")
    args = parser.parse_args(argv)

    for n in (int(x) for x in args.memory.split(",") if x):
        for sharing in (1, 4):
            py_rss, _ = bench_memory("python", n, sharing)
            nat_rss, nat_approx = bench_memory("native", n, sharing)
            print(
                f"memory {n:,} entries, {sharing} holder(s)/key: python {py_rss:.0f} B/entry, "
                f"native {nat_rss:.0f} B/entry (approx_bytes {nat_approx:.0f}); "
                f"ratio {py_rss / nat_rss:.1f}x"
            )

    if args.memory_only:
        return
    batches, ops = make_ops(args.batches)
    rates = {impl: bench_apply(impl, batches, ops, args.runs) for impl in IMPLS}
    print(
        f"index.apply alone: python {rates['python']:,.0f}, native {rates['native']:,.0f} "
        f"block-ops/CPU-s; ratio {rates['native'] / rates['python']:.1f}x"
    )
    payloads, ops = make_batches(args.batches)
    rates = {impl: bench_ingest(impl, payloads, ops, args.runs) for impl in IMPLS}
    print(
        f"decode + EventApplier + index: python {rates['python']:,.0f}, "
        f"native {rates['native']:,.0f} block-ops/CPU-s; "
        f"ratio {rates['native'] / rates['python']:.2f}x"
    )

    rates = {impl: bench_service(impl, args.batches, args.runs) for impl in IMPLS}
    print(
        f"end to end over tcp loopback (IngestService): python {rates['python']:,.0f}, "
        f"native {rates['native']:,.0f} block-ops per CPU-second of the ingest process; "
        f"ratio {rates['native'] / rates['python']:.2f}x"
    )

    for tier_mix in (False, True):
        label = "GPU + CPU/storage mix" if tier_mix else "GPU only"
        res = {impl: bench_lookup(impl, tier_mix, args.lookups) for impl in IMPLS}
        (pp50, pp99), (np50, np99) = res["python"], res["native"]
        print(
            f"lookup 512 keys x 64 engines ({label}): python p50 {pp50:.0f} us p99 {pp99:.0f} "
            f"us, native p50 {np50:.1f} us p99 {np99:.1f} us; p50 ratio {pp50 / np50:.0f}x"
        )


if __name__ == "__main__":
    main()
