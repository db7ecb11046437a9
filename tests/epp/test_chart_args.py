"""The picker starts with llm-d-router's Helm chart arguments at their default values
(tests/epp/data/chart_args/, copied with their source) and becomes healthy on the gRPC health
service the chart's probes ask for ("inference-extension").

A real `epp serve` process on loopback ports; the Kubernetes API server (InferencePool and
pods) is the fake the pool-discovery tests use, reached through a kubeconfig. Only the
container paths and the ports differ from the chart: the config file is the chart's rendered
default from the corpus, and ports are 0 (free) so that parallel runs do not collide."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import grpc
import yaml
from fake_kube_api import FakeApiServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

DATA = Path(__file__).parent / "data"
CHART = yaml.safe_load(
    (DATA / "chart_args" / "llm-d-router-inferencepool-default.yaml").read_text()
)
CHART_CONFIG = DATA / "upstream_configs" / "llm-d-router" / "chart-default-plugins.yaml"
DEADLINE_S = 60.0
# Added after the chart's args (the last value wins, as with llm-d's flags).
LOOPBACK_FREE_PORTS = (
    "--host",
    "127.0.0.1",
    "--grpc-port",
    "0",
    "--grpc-health-port",
    "0",
    "--metrics-port",
    "0",
)

POOL = {
    "apiVersion": "inference.networking.k8s.io/v1",
    "kind": "InferencePool",
    "metadata": {"name": "vllm-qwen", "namespace": "default", "resourceVersion": "10"},
    "spec": {
        "selector": {"matchLabels": {"app": "vllm-qwen"}},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "vllm-qwen-epp", "port": {"number": 9002}},
    },
}
POD = {
    "metadata": {"name": "vllm-0", "labels": {"app": "vllm-qwen"}, "resourceVersion": "1"},
    "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
}


def chart_args() -> list[str]:
    args = [str(CHART_CONFIG) if a == "/config/default-plugins.yaml" else a for a in CHART["args"]]
    assert str(CHART_CONFIG) in args  # the chart's --config-file, pointed at the rendered file
    return [*args, *LOOPBACK_FREE_PORTS]


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    return path


async def _serving_line(proc: asyncio.subprocess.Process) -> dict[str, int]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE_S)
    assert line.startswith(b"epp serving "), line
    return {k: int(v) for k, v in (item.split("=") for item in line.decode().split()[2:])}


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


async def test_the_picker_runs_with_the_charts_default_arguments(tmp_path: Path) -> None:
    api = FakeApiServer({"inference.networking.k8s.io/v1": POOL}, pool_name="vllm-qwen")
    api.pods = [POD]
    server = await api.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = str(kubeconfig(tmp_path / "kubeconfig", server))
    env["HOME"] = str(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "epp.cli",
        "serve",
        *chart_args(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        ports = await _serving_line(proc)
        deadline = time.monotonic() + DEADLINE_S
        status = health_pb2.HealthCheckResponse.NOT_SERVING
        while time.monotonic() < deadline:
            status = await _health(ports["health"], CHART["probe_service"])
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)  # poll interval, bounded by the deadline
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
        await api.stop()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    # --zap-encoder json: every log line is a JSON object.
    records = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    messages = [r["msg"] for r in records]
    # What the chart asks for that the picker does not do is said once at start-up.
    assert any("--metrics-endpoint-auth" in m for m in messages), messages
    assert any(m.startswith("scheduler config:") for m in messages)
