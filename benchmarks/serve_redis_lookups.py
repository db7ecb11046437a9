"""Concurrent score lookups on the Redis backend through the service's ``LockedIndex``: with
the lock skipped (``RedisBackend.thread_safe``, what ``kvindex serve`` does) vs the one lock
the in-memory backend needs, side by side in one run.

Shape: ``threads`` request threads (the service answers each HTTP/gRPC request on a worker
thread) each doing lookups of a 2k-token prompt (128 content keys) over 16 engines holding
it, while one writer thread applies 32-block batches (the ingest thread). Reported: lookups/s
(median over repeats) and the ratio.

Run: ``python -m benchmarks.serve_redis_lookups [--url redis://127.0.0.1:6379/0]
[--threads 8] [--seconds 2] [--repeats 3]``. Uses a fresh key prefix and deletes it after.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import redis

from kvindex.index import Store, StoredBlock, Tier
from kvindex.index.locked import LockedIndex
from kvindex.index.redis import RedisIndex
from kvindex.service.redis_backend import RedisBackend

KEYS = 128
ENGINES = 16


class LockedRedis(RedisBackend):
    """The same backend without the thread-safe declaration: LockedIndex locks every call."""

    thread_safe = False


def fill(index: LockedIndex) -> list[int]:
    keys = [1_000_000 + i for i in range(KEYS)]
    for e in range(ENGINES):
        blocks = [StoredBlock(10_000 * e + i, (k,)) for i, k in enumerate(keys)]
        index.apply(f"10.0.0.{e}:8000", [Store(Tier.GPU, blocks)])
    return keys


def run(index: LockedIndex, keys: list[int], threads: int, seconds: float) -> float:
    stop = threading.Event()
    counts = [0] * threads

    def reader(slot: int) -> None:
        while not stop.is_set():
            assert len(index.lookup(keys)) == ENGINES
            counts[slot] += 1

    def writer() -> None:
        n = 0
        while not stop.is_set():
            blocks = [StoredBlock(9_000_000 + n * 32 + i, (5_000_000 + i,)) for i in range(32)]
            index.apply("10.0.9.9:8000", [Store(Tier.GPU, blocks)])
            n += 1

    workers = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    workers.append(threading.Thread(target=writer))
    for w in workers:
        w.start()
    time.sleep(seconds)  # a benchmark's measuring window, not a synchronisation
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prefix = "kvibench-" + uuid.uuid4().hex[:8]
    index = RedisIndex.from_url(args.url, prefix=prefix)
    shared, locked = LockedIndex(RedisBackend(index)), LockedIndex(LockedRedis(index))
    keys = fill(shared)
    results: dict[str, list[float]] = {"no lock (serve)": [], "one lock": []}
    try:
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            results["no lock (serve)"].append(run(shared, keys, args.threads, args.seconds))
            results["one lock"].append(run(locked, keys, args.threads, args.seconds))
    finally:
        client = redis.Redis.from_url(args.url)
        for key in client.scan_iter(match="{" + prefix + "}:*", count=1000):
            client.delete(key)
        index.close()
    medians = {name: statistics.median(v) for name, v in results.items()}
    print(f"{args.threads} reader threads + 1 writer, {KEYS} keys x {ENGINES} engines")
    for name, value in medians.items():
        print(f"  {name:16s} {value:10.0f} lookups/s")
    print(f"  ratio no-lock / lock: {medians['no lock (serve)'] / medians['one lock']:.2f}x")


if __name__ == "__main__":
    main()
