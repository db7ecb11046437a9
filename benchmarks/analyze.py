"""Time to analyse the full Mooncake conversation trace (12k requests) with every policy on
8 engines: read + simulate + summarise, one process vs parallel processes, side by side in
one run. Goal: under 30 s on 2 cores.

    python -m benchmarks.analyze [--repeats 3] [--trace mooncake-conversation]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from kvtools.analyze.policies import POLICY_NAMES
from kvtools.analyze.readers import read_mooncake
from kvtools.analyze.runner import run_point
from kvtools.analyze.simulation import SimSettings, simulate
from kvtools.analyze.traces import resolve_trace


def end_to_end(trace_name: str, jobs: int) -> float:
    t0 = time.perf_counter()
    trace = read_mooncake(resolve_trace(trace_name))
    run_point(trace, POLICY_NAMES, SimSettings(engines=8), jobs=jobs)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", default="mooncake-conversation")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trace = read_mooncake(resolve_trace(args.trace))
    print(
        f"{args.trace}: {len(trace.requests)} requests, {trace.blocks} blocks, "
        f"{os.cpu_count()} cores, 8 engines"
    )
    t0 = time.perf_counter()
    read_mooncake(resolve_trace(args.trace))
    print(f"read + key {time.perf_counter() - t0:.3f} s")
    runs = [(p, "wire") for p in POLICY_NAMES] + [("precise-prefix", "ops")]
    for policy, ingest in runs:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = simulate(trace, policy, SimSettings(engines=8, precise_ingest=ingest))
            times.append(time.perf_counter() - t0)
        label = f"{policy} ({ingest} ingest)" if policy == "precise-prefix" else policy
        print(
            f"  {label:32s} median {statistics.median(times):.3f} s  "
            f"hit {result.hit_rate_blocks:.1%}"
        )
    medians = {}
    for jobs in (1, 2):
        times = [end_to_end(args.trace, jobs) for _ in range(args.repeats)]
        medians[jobs] = statistics.median(times)
        print(
            f"all {len(POLICY_NAMES)} policies end to end, jobs={jobs}: median "
            f"{medians[jobs]:.2f} s (runs {', '.join(f'{t:.2f}' for t in times)})"
        )
    print(f"jobs=2 / jobs=1: {medians[2] / medians[1]:.2f}")


if __name__ == "__main__":
    main()
