"""The assembled picker: ext_proc over TLS, gRPC health, Prometheus metrics, readiness from
endpoint sources, graceful drain, and the real `epp serve` process under SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc_client import (
    LeastWaitingScheduler,
    header_mutation,
    request_body,
    request_headers,
    response_body,
    response_headers,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.cli import build_parser
from epp.commands import serve
from epp.server import EXTPROC_SERVICE, PickerDeps, PickerServer, ServeConfig
from tests.polling import wait_until_async as wait_for_async

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def config(**overrides) -> ServeConfig:
    base = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "health_port": 0,
        "metrics_port": 0,
        "metrics_interval_s": 0.05,
    }
    return ServeConfig(**{**base, **overrides})


async def health_status(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return response.status


def tls_channel(server: PickerServer) -> grpc.aio.Channel:
    assert server.tls_certificate is not None
    credentials = grpc.ssl_channel_credentials(root_certificates=server.tls_certificate)
    return grpc.aio.secure_channel(f"127.0.0.1:{server.ports['grpc']}", credentials)


async def test_tls_extproc_health_and_metrics(extproc_server: str) -> None:
    server = PickerServer(
        config(endpoints="10.0.0.1:8000,10.0.0.2:8000", extproc_server=extproc_server),
        LeastWaitingScheduler(),
    )
    await server.start()
    try:
        async with tls_channel(server) as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(request_headers())
            await call.write(request_body(CHAT, True))
            decision = await asyncio.wait_for(call.read(), 10)
            assert header_mutation(decision)["x-gateway-destination-endpoint"] == "10.0.0.1:8000"
            await asyncio.wait_for(call.read(), 10)  # the re-emitted body
            await call.done_writing()
            # gRPC health is also served on the ext_proc port (for Envoy's health checks)
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
            assert reply.status == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await health.Check(health_pb2.HealthCheckRequest(service="nope"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # plaintext is refused on the TLS port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as plain:
            call = pb_grpc.ExternalProcessorStub(plain).Process()
            with pytest.raises(grpc.aio.AioRpcError):
                await call.write(request_headers(end_of_stream=True))
                await asyncio.wait_for(call.read(), 10)
        hp = server.ports["health"]
        for service in ("liveness", "readiness", EXTPROC_SERVICE, ""):
            assert await health_status(hp, service) == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health_status(hp, "nope")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.ports['metrics']}/metrics") as response,
        ):
            text = await response.text()
        assert 'llm_d_epp_request_total{model="m",target_model="m"} 1.0' in text
        assert "llm_d_epp_pool_ready_endpoints 2.0" in text
        assert "llm_d_epp_scheduler_e2e_duration_seconds_count 1.0" in text
    finally:
        await server.close()


async def test_readiness_waits_for_the_endpoints_file(tmp_path: Path) -> None:
    path = tmp_path / "eps.json"
    server = PickerServer(
        config(endpoints_file=str(path), endpoints_file_interval_s=0.02, secure_serving=False),
        LeastWaitingScheduler(),
    )
    await server.start()
    try:
        hp = server.ports["health"]
        assert await health_status(hp, "readiness") == NOT_SERVING
        assert await health_status(hp, "liveness") == SERVING
        path.write_text(json.dumps(["10.0.0.7:8000"]))

        async def ready() -> bool:
            return await health_status(hp, "readiness") == SERVING

        await wait_for_async(ready)
        assert [e.key for e in server.datastore.endpoints()] == ["10.0.0.7:8000"]
    finally:
        await server.close()


async def test_health_watch_follows_readiness_on_both_ports(
    tmp_path: Path, extproc_server: str
) -> None:
    """grpc.health.v1 Watch (as grpc clients and meshes use it): the current status at once,
    then each change; an unknown service is SERVICE_UNKNOWN and still watched; a drain ends
    the streams after NOT_SERVING. On the health port and on the ext_proc port."""
    path = tmp_path / "eps.json"
    server = PickerServer(
        config(
            endpoints_file=str(path),
            endpoints_file_interval_s=0.02,
            secure_serving=False,
            extproc_server=extproc_server,
        ),
        LeastWaitingScheduler(),
    )
    await server.start()
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{server.ports[name]}") for name in ("health", "grpc")
    ]
    try:
        calls = [
            health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="readiness")
            )
            for channel in channels
        ]
        unknown = health_pb2_grpc.HealthStub(channels[0]).Watch(
            health_pb2.HealthCheckRequest(service="nope")
        )
        for call in calls:
            assert (await asyncio.wait_for(call.read(), 10)).status == NOT_SERVING
        first = await asyncio.wait_for(unknown.read(), 10)
        assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        path.write_text(json.dumps(["10.0.0.7:8000"]))  # the pool is known: ready
        for call in calls:
            assert (await asyncio.wait_for(call.read(), 10)).status == SERVING
        await server.drain(grace_s=1)  # grpcio keeps a Watch open for the whole grace
        for call in calls:
            assert (await asyncio.wait_for(call.read(), 10)).status == NOT_SERVING
            with contextlib.suppress(grpc.aio.AioRpcError):  # ended or connection closed
                assert await asyncio.wait_for(call.read(), 10) == grpc.aio.EOF
        unknown.cancel()
    finally:
        for channel in channels:
            await channel.close()
        await server.close()


async def test_the_health_port_serves_only_health(extproc_server: str) -> None:
    server = PickerServer(
        config(endpoints="10.0.0.1:8000", secure_serving=False, extproc_server=extproc_server),
        LeastWaitingScheduler(),
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports['health']}") as channel:
            # A unary call to the method: the client sends all at once, so the server's
            # immediate answer cannot race a later write.
            process = channel.unary_unary("/envoy.service.ext_proc.v3.ExternalProcessor/Process")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(process(b""), 10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert await health_status(server.ports["health"], "liveness") == SERVING
    finally:
        await server.close()


async def test_drain_refuses_new_streams_and_finishes_inflight_ones(extproc_server: str) -> None:
    scheduler = LeastWaitingScheduler()
    server = PickerServer(
        config(endpoints="10.0.0.1:8000", secure_serving=False, extproc_server=extproc_server),
        scheduler,
    )
    await server.start()
    port = server.ports["grpc"]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        for message in (request_headers(), request_body(CHAT, True)):
            await call.write(message)
        for _ in range(2):
            await asyncio.wait_for(call.read(), 10)
        drain = asyncio.create_task(server.drain(grace_s=10))

        async def not_ready() -> bool:
            return await health_status(server.ports["health"], "readiness") == NOT_SERVING

        await wait_for_async(not_ready)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as fresh:
            new_call = pb_grpc.ExternalProcessorStub(fresh).Process()
            with pytest.raises(grpc.aio.AioRpcError):
                await new_call.write(request_headers(end_of_stream=True))
                await asyncio.wait_for(new_call.read(), 10)
        assert not drain.done()
        # the in-flight stream still completes its response
        await call.write(response_headers())
        await call.write(response_body(b'{"usage": {"completion_tokens": 2}}', True))
        for _ in range(2):
            await asyncio.wait_for(call.read(), 10)
        await call.done_writing()
        await asyncio.wait_for(drain, 15)
        assert scheduler.completed[0].status == 200
        assert scheduler.completed[0].completion_tokens == 2
    finally:
        await channel.close()
        await server.close()


def test_cli_errors_name_the_fix() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit, match="--endpoints, --endpoints-file or --pool-name"):
        serve.config_from_args(parser.parse_args(["serve"]))
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        serve.config_from_args(
            parser.parse_args(["serve", "--endpoints", "a:1", "--objective", "x"])
        )
    with pytest.raises(SystemExit, match="must be int"):
        serve.config_from_args(
            parser.parse_args(["serve", "--endpoints", "a:1", "--objective", "x=high"])
        )
    args = parser.parse_args(
        [
            "serve",
            "--endpoints",
            "a:1",
            "--no-secure-serving",
            "--objective",
            "batch=-1",
            "--lora-adapter",
            "sql=llama",
            "--metrics-interval",
            "0.1",
        ]
    )
    cfg = serve.config_from_args(args)
    assert not cfg.secure_serving and cfg.objectives == {"batch": -1}
    assert cfg.adapters == {"sql": "llama"} and cfg.metrics_interval_s == 0.1
    assert (cfg.grpc_port, cfg.health_port, cfg.metrics_port) == (9002, 9003, 9090)


def picker_deps() -> PickerDeps:
    from epp.endpoints import Datastore
    from epp.metrics import EppMetrics
    from epp.requests import ModelRegistry

    return PickerDeps(Datastore(), EppMetrics(), ModelRegistry())


def test_default_factory_builds_the_framework_and_reports_config_errors(tmp_path: Path) -> None:
    from epp.framework import FrameworkScheduler

    assert isinstance(serve.framework_scheduler(None, picker_deps()), FrameworkScheduler)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "- type: no-such-scorer\n"
    )
    with pytest.raises(SystemExit, match="no-such-scorer"):
        serve.framework_scheduler(str(bad), picker_deps())


async def test_framework_scheduler_runs_behind_the_server_and_reports_plugins() -> None:
    deps = picker_deps()
    scheduler = serve.framework_scheduler(None, deps)
    server = PickerServer(
        config(
            endpoints="10.0.0.1:8000,10.0.0.2:8000", secure_serving=False, metrics_interval_s=3600
        ),
        scheduler,
        datastore=deps.datastore,
        metrics=deps.metrics,
        registry=deps.registry,
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(request_headers())
            await call.write(request_body(CHAT, True))
            decision = await asyncio.wait_for(call.read(), 10)
            picked = header_mutation(decision)["x-gateway-destination-endpoint"]
            assert picked in {"10.0.0.1:8000", "10.0.0.2:8000"}
            await call.done_writing()
        text = deps.metrics.render().decode()
        assert 'llm_d_epp_plugin_duration_seconds_count{extension_point="Scorer"' in text
    finally:
        await server.close()


async def test_serve_process_drains_on_sigterm() -> None:
    script = Path(__file__).parent / "run_picker.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--health-port",
        "0",
        "--metrics-port",
        "0",
        "--no-secure-serving",
        "--endpoints",
        "10.0.0.1:8000",
        "--log-level",
        "warning",
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line.startswith("epp serving "), line
        ports = dict(item.split("=") for item in line.split()[2:])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(request_headers())
            await call.write(request_body(CHAT, True))
            for _ in range(2):
                await asyncio.wait_for(call.read(), 10)
            process.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return await health_status(int(ports["health"]), "readiness") == NOT_SERVING

            await wait_for_async(not_ready)
            await call.write(response_headers())
            await call.write(response_body(b"{}", True))
            for _ in range(2):
                await asyncio.wait_for(call.read(), 10)
            await call.done_writing()
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_not_ready_until_the_objects_file_is_loaded(tmp_path: Path) -> None:
    """Before its InferenceObjectives are known every request would run at priority 0: a
    missing or unparsable objects file keeps the picker not ready until a good one is read."""
    path = tmp_path / "objects.yaml"
    path.write_text("kind: InferenceObjective\nmetadata: {name: batch}\nspec: {priority: x}\n")
    server = PickerServer(
        config(
            endpoints="10.0.0.1:8000",
            secure_serving=False,
            objects_file=str(path),
            objects_file_interval_s=0.02,
        ),
        LeastWaitingScheduler(),
    )
    await server.start()
    try:
        assert not server.ready
        assert await health_status(server.ports["health"], "readiness") == NOT_SERVING
        text = "kind: InferenceObjective\nmetadata: {name: batch}\nspec: {priority: -1}\n"
        path.write_text(text)
        os.utime(path, ns=(2 * 10**18, 2 * 10**18))  # a new stamp even on a coarse clock

        async def ready() -> bool:
            return await health_status(server.ports["health"], "readiness") == SERVING

        await wait_for_async(ready)
        assert server.objects.objective("batch").priority == -1  # type: ignore[union-attr]
    finally:
        await server.close()
