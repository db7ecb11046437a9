"""Ingest hot path before and after the 2026-12-01 pass, side by side in one process.

    python -m benchmarks.ingest_perf [--runs 5] [--batches 2000]

"before" runs the verbatim pre-pass functions of ``benchmarks/ingest_legacy.py`` (swapped in
for the duration of a run), "after" the current code; runs alternate before/after so drifting
machine load hits both alike. All with the native index (``NativeIndex``, C fast paths of
``chain_keys`` and ``EventApplier._stored``) and benchmarks/ingest.py's vLLM-0.33-like
map-encoded batches (8 events, ~112 block-ops per batch):

* decode only: ``decode_batch`` per payload, block hashes per CPU-second;
* in process: decode + ``EventApplier`` + index, block-ops per CPU-second;
* end to end: a separate publisher process over tcp loopback into ``IngestService`` (its
  ingest thread, the index lock, metrics), block-ops per CPU-second of the ingest process.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

from benchmarks.ingest import ENGINE, bench_end_to_end, make_batches
from benchmarks.ingest_legacy import legacy_decode_batch, legacy_ingest
from kvindex.index import MemoryIndexConfig
from kvindex.index.native import NativeIndex
from kvindex.ingest import EventApplier
from kvindex.wire import DecodedBatch, decode_batch

SIDES = ("before", "after")


def _side(name: str) -> contextlib.AbstractContextManager[None]:
    return legacy_ingest() if name == "before" else contextlib.nullcontext()


def _alternate(runs: int) -> Iterator[tuple[int, str]]:
    for run in range(runs):
        for side in SIDES if run % 2 == 0 else reversed(SIDES):
            yield run, side


def bench_decode(payloads: list[bytes], runs: int) -> dict[str, float]:
    decoders: dict[str, Callable[[bytes], DecodedBatch]] = {
        "before": legacy_decode_batch,
        "after": decode_batch,
    }
    for p in payloads:  # both sides decode every payload to the same batch
        assert legacy_decode_batch(p) == decode_batch(p)
    hashes = sum(len(e.block_hashes) for p in payloads for e in decode_batch(p).events)
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for _, side in _alternate(runs):
        decode = decoders[side]
        start = time.process_time()
        for p in payloads:
            decode(p)
        times[side].append(time.process_time() - start)
    return {s: hashes / statistics.median(t) for s, t in times.items()}


def bench_in_process(payloads: list[bytes], ops: int, runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    decoders = {"before": legacy_decode_batch, "after": decode_batch}
    for _, side in _alternate(runs):
        decode = decoders[side]
        applier = EventApplier(NativeIndex(MemoryIndexConfig(max_keys=10**9)))
        with _side(side):
            start = time.process_time()
            for p in payloads:
                applier.apply_batch(ENGINE, decode(p), "bench-model")
            times[side].append(time.process_time() - start)
    return {s: ops / statistics.median(t) for s, t in times.items()}


def bench_service(n_batches: int, runs: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    for run, side in _alternate(runs):
        with _side(side):
            rates[side].append(bench_end_to_end(n_batches, run, NativeIndex)[1])
    return {s: statistics.median(r) for s, r in rates.items()}


def _line(label: str, unit: str, rates: dict[str, float]) -> str:
    before, after = rates["before"], rates["after"]
    return f"{label}: before {before:,.0f}, after {after:,.0f} {unit}; ratio {after / before:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--skip-service", action="store_true", help="no end-to-end runs")
    args = parser.parse_args(argv)
    payloads, ops = make_batches(args.batches)
    print(_line("decode only", "block hashes/CPU-s", bench_decode(payloads, args.runs)))
    print(
        _line(
            "decode + EventApplier + NativeIndex",
            "block-ops/CPU-s",
            bench_in_process(payloads, ops, args.runs),
        )
    )
    if not args.skip_service:
        print(
            _line(
                "end to end over tcp loopback (IngestService, native)",
                "block-ops per CPU-second of the ingest process",
                bench_service(args.batches, args.runs),
            )
        )


if __name__ == "__main__":
    main()
