"""Does ``--index-memory-budget`` hold? Millions of unique stores into an in-memory index with
a budget; the process's RSS is sampled as it goes.

    python -m benchmarks.memory_budget [--stores 5000000] [--budget 64MiB]
        [--backends native,python] [--sharing 1,4]

Each (backend, sharing) runs in a fresh process: the baseline is its RSS after imports and
before the index exists; the index is built as the service builds it (``make_index``), and
blocks are stored in batches of 64 by 8 engines, each key held by ``sharing`` of them (1:
every engine caches different prompts; 4: prefixes shared), with the engine's own BlockRemoved
never sent (the worst case: only the capacity bound frees anything). Reported: the peak
RSS growth over the baseline (the index's share of the process), the budget, and
``stats().approx_bytes`` (the ``kvindex_index_bytes`` metric) at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import time

from benchmarks.ingest import _rss
from kvindex.config import parse_size
from kvindex.index import IndexConfig, Store, StoredBlock, Tier, make_index

ENGINES = 8
BATCH = 64


def _child(backend: str, stores: int, budget: int, sharing: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    gc.collect()
    base = _rss()
    index = make_index(IndexConfig(backend=backend, memory_budget_bytes=budget))
    peak = base
    started = time.perf_counter()
    key = 1
    done = 0
    engine_hash = 1
    while done < stores:
        blocks = []
        for _ in range(BATCH):
            blocks.append(key)
            key += 1
        for holder in range(sharing):
            engine = f"10.0.0.{(key // BATCH + holder) % ENGINES}:8000"
            ops = [
                Store(Tier.GPU, [StoredBlock(engine_hash + i, (k,)) for i, k in enumerate(blocks)])
            ]
            engine_hash += BATCH
            index.apply(engine, ops)
            done += BATCH
        if (done // BATCH) % 256 == 0:
            peak = max(peak, _rss())
    peak = max(peak, _rss())
    stats = index.stats()
    out.put(
        {
            "backend": backend,
            "sharing": sharing,
            "stores": done,
            "budget_mib": budget / 2**20,
            "baseline_mib": round(base / 2**20, 1),
            "peak_growth_mib": round((peak - base) / 2**20, 1),
            "approx_bytes_mib": round(stats.approx_bytes / 2**20, 1),
            "entries": stats.entries,
            "evictions": stats.evictions,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", type=int, default=5_000_000)
    parser.add_argument("--budget", default="64MiB")
    parser.add_argument("--backends", default="native,python")
    parser.add_argument("--sharing", default="1,4")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    budget = parse_size(args.budget)
    ctx = mp.get_context("spawn")
    rows = []
    for backend in args.backends.split(","):
        for sharing in (int(s) for s in args.sharing.split(",")):
            out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
            proc = ctx.Process(target=_child, args=(backend, args.stores, budget, sharing, out))
            proc.start()
            rows.append(out.get())
            proc.join()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'backend':8} {'sharing':>7} {'stores':>10} {'budget MiB':>10} {'peak RSS growth':>16}"
        f" {'approx_bytes':>12} {'entries':>10} {'s':>6}"
    )
    for r in rows:
        print(
            f"{r['backend']:8} {r['sharing']:>7} {r['stores']:>10} {r['budget_mib']:>10.0f}"
            f" {r['peak_growth_mib']:>12.1f} MiB {r['approx_bytes_mib']:>8.1f} MiB"
            f" {r['entries']:>10} {r['seconds']:>6}"
        )


if __name__ == "__main__":
    main()
