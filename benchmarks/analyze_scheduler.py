"""The precise-prefix policy over the full Mooncake conversation trace (12k requests, 8
engines) scheduled by the builtin scorer model vs the picker's real framework
(``--scheduler picker``, kvtools.analyze.picker), side by side in one run: the cost of routing
every decision through ``FrameworkScheduler.schedule`` on a private event loop.

    python -m benchmarks.analyze_scheduler [--repeats 5] [--trace mooncake-conversation]
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvtools.analyze.readers import read_mooncake
from kvtools.analyze.simulation import SimSettings, simulate
from kvtools.analyze.traces import resolve_trace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", default="mooncake-conversation")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    trace = read_mooncake(resolve_trace(args.trace))
    n = len(trace.requests)
    print(f"{args.trace}: {n} requests, 8 engines, precise-prefix, {args.repeats} repeats")
    times: dict[str, list[float]] = {"builtin": [], "picker": []}
    rates: dict[str, float] = {}
    for _ in range(args.repeats):
        for scheduler in times:  # interleaved: both see the same machine load
            t0 = time.perf_counter()
            result = simulate(trace, "precise-prefix", SimSettings(engines=8, scheduler=scheduler))
            times[scheduler].append(time.perf_counter() - t0)
            rates[scheduler] = result.hit_rate_blocks
    medians = {s: statistics.median(t) for s, t in times.items()}
    for s, m in medians.items():
        print(f"  {s:8s} median {m:.3f} s  ({m / n * 1e6:.1f} us/request)  hit rate {rates[s]:.4f}")
    extra = (medians["picker"] - medians["builtin"]) / n * 1e6
    print(
        f"  picker / builtin {medians['picker'] / medians['builtin']:.2f}x, "
        f"{extra:.1f} us more per decision"
    )


if __name__ == "__main__":
    main()
