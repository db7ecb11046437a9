"""Idle CPU of the routers of the routing benchmark (benchmarks/routing.py), measured long
enough to resolve it: each setup's cluster of the `latency` scenario (4 simulated engines)
starts, settles for 2 s, then the router processes' CPU (utime + stime of their process
groups, Envoy not included) is read over `--seconds` without any traffic. The routing
benchmark's own idle column reads 3 s (one clock tick is 0.33% there).

Run: make bench NAME=picker_idle ARGS="[--setups precise,approximate] [--seconds 20]"
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.routing import SCENARIOS, SETUPS, cluster, group_cpu_s
from kvtools.demo.model import write_model_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default="precise,approximate", help="comma list")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    if any(s not in SETUPS or s == "round-robin" for s in setups):
        parser.error(f"setups: {[s for s in SETUPS if s != 'round-robin']}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    try:
        model_dir = write_model_dir(workdir / "model")
        print("| setup | router idle CPU, % of a core |")
        print("|---|---|")
        for setup in setups:
            sub = workdir / setup
            sub.mkdir()
            with cluster(setup, SCENARIOS["latency"], sub, model_dir) as c:
                time.sleep(2.0)
                before, t0 = group_cpu_s(c.router_pids), time.monotonic()
                time.sleep(args.seconds)
                used = group_cpu_s(c.router_pids) - before
                print(f"| {setup} | {used / (time.monotonic() - t0) * 100:.2f}% |", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
