"""The demo's direct gateway (the fallback when Envoy cannot start) in front of a real picker
process (`epp serve --no-secure-serving`) and real simulated engines (`kvindex-sim`), over
real HTTP and real gRPC on loopback ports chosen at run time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from kvtools.demo.gateway import DirectGateway
from kvtools.demo.model import MODEL_NAME, write_model_dir
from kvtools.demo.policies import picker_config
from kvtools.demo.processes import Engine, ManagedProcess, start_picker, start_sim
from tests.metrics import scrape, total
from tests.ports import free_port

pytestmark = pytest.mark.timeout(120)


@dataclass
class Cluster:
    engines: list[Engine]
    events: str  # the engines publish KV events here (the precise picker binds it)
    workdir: Path
    model_dir: Path


@dataclass
class Picker:
    target: str  # host:port of the plaintext ext_proc port
    metrics_url: str

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (all label sets) from the picker's /metrics."""
        return total(scrape(self.metrics_url), name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("gateway")
    model_dir = write_model_dir(workdir / "model")
    events = f"tcp://127.0.0.1:{free_port()}"
    sim, engines = start_sim(
        workdir,
        engines=3,
        model_dir=model_dir,
        model=MODEL_NAME,
        events_endpoint=events,
        num_gpu_blocks=400,
        max_num_seqs=4,
        time_scale=0.2,
        prefill_ms_per_token=0.3,
        decode_ms_per_token=4.0,
    )
    try:
        yield Cluster(engines, events, workdir, model_dir)
    finally:
        sim.stop()


def _start_picker(
    cluster: Cluster, name: str, config: str, endpoints: list[str]
) -> tuple[ManagedProcess, Picker]:
    workdir = cluster.workdir / name
    workdir.mkdir()
    grpc_port, metrics_port = free_port(), free_port()
    process = start_picker(
        workdir,
        config=config,
        endpoints=endpoints,
        grpc_port=grpc_port,
        health_port=free_port(),
        metrics_port=metrics_port,
        secure_serving=False,
    )
    return process, Picker(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics")


@pytest.fixture(scope="module")
def one_endpoint_picker(cluster: Cluster) -> Iterator[Picker]:
    """The default profile over ONE endpoint (the last engine): every decision is that one,
    while the gateway's own fallback (no destination header) would be the first engine."""
    process, picker = _start_picker(cluster, "one", "", [cluster.engines[-1].endpoint])
    try:
        yield picker
    finally:
        process.stop()


@pytest.fixture(scope="module")
def precise_picker(cluster: Cluster) -> Iterator[Picker]:
    config = picker_config(
        "precise", model=MODEL_NAME, model_dir=cluster.model_dir, events_endpoint=cluster.events
    )
    process, picker = _start_picker(
        cluster, "precise", config, [e.endpoint for e in cluster.engines]
    )
    try:
        yield picker
    finally:
        process.stop()


def _chat(text: str, stream: bool = True) -> dict[str, object]:
    body: dict[str, object] = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _post_sse(
    session: aiohttp.ClientSession, url: str, body: dict[str, object]
) -> tuple[int, str, str, list[bytes]]:
    """(status, engine header, content type, the SSE data payloads in order)."""
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        events = []
        async for raw in response.content:
            line = raw.strip()
            if line.startswith(b"data:"):
                events.append(line[5:].strip())
        return (
            response.status,
            response.headers.get("x-kvsim-engine", ""),
            response.headers.get("content-type", ""),
            events,
        )


async def test_routes_where_the_picker_says_and_streams_sse(
    cluster: Cluster, one_endpoint_picker: Picker
) -> None:
    engines = [e.endpoint for e in cluster.engines]
    async with (
        DirectGateway(engines, extproc_target=one_endpoint_picker.target) as gateway,
        aiohttp.ClientSession() as session,
    ):
        for i in range(4):
            status, engine, content_type, events = await _post_sse(
                session, gateway.url, _chat(f"question {i}: " + "tell me more " * 20)
            )
            assert status == 200
            assert engine == cluster.engines[-1].name
            assert content_type.startswith("text/event-stream")
            assert events[-1] == b"[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert len(chunks) >= 3  # role, tokens, usage: streamed as separate events
            assert chunks[-1]["usage"]["prompt_tokens"] > 0
    assert gateway.stats.by_destination == {cluster.engines[-1].endpoint: 4}
    assert gateway.stats.extproc_errors == 0
    # The picker saw the response path (headers, body with usage, end of stream).
    deadline = time.monotonic() + 10
    while one_endpoint_picker.metric("llm_d_epp_input_tokens_total") <= 0:
        assert time.monotonic() < deadline, "the picker never saw the responses' usage"
        time.sleep(0.05)
    assert one_endpoint_picker.metric("llm_d_epp_request_duration_seconds_count") >= 4


async def test_non_streaming_response_passes_through(
    cluster: Cluster, one_endpoint_picker: Picker
) -> None:
    engines = [e.endpoint for e in cluster.engines]
    async with (
        DirectGateway(engines, extproc_target=one_endpoint_picker.target) as gateway,
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}/v1/chat/completions", json=_chat("hi", False)) as response,
    ):
        assert response.status == 200
        assert response.headers["x-kvsim-engine"] == cluster.engines[-1].name
        doc = await response.json()
        assert doc["choices"][0]["message"]["role"] == "assistant"


async def test_immediate_response_is_passed_through(
    cluster: Cluster, one_endpoint_picker: Picker
) -> None:
    engines = [e.endpoint for e in cluster.engines]
    async with (
        DirectGateway(engines, extproc_target=one_endpoint_picker.target) as gateway,
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.url}/v1/chat/completions",
            data=b'{"model": "demo-model", "messages": [',
            headers={"content-type": "application/json"},
        ) as response,
    ):
        assert response.status == 400
        assert response.headers["x-llm-d-request-dropped-reason"] == "malformed-request"
        assert "x-kvsim-engine" not in response.headers  # never reached an engine
        assert (await response.text()).strip()
    assert gateway.stats.immediate == 1 and gateway.stats.forwarded == 0


async def test_precise_picker_sends_a_repeated_prompt_to_the_engine_holding_it(
    cluster: Cluster, precise_picker: Picker
) -> None:
    engines = [e.endpoint for e in cluster.engines]
    prompt = "shared context " + " ".join(f"fact-{i}" for i in range(400))
    async with (
        DirectGateway(engines, extproc_target=precise_picker.target) as gateway,
        aiohttp.ClientSession() as session,
    ):
        status, first, _, _ = await _post_sse(session, gateway.url, _chat(prompt))
        assert status == 200 and first
        for _ in range(4):
            status, engine, _, events = await _post_sse(session, gateway.url, _chat(prompt))
            assert status == 200
            assert engine == first
            usage = json.loads(events[-2])["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] > 0


async def test_round_robin_without_a_picker(cluster: Cluster) -> None:
    engines = [e.endpoint for e in cluster.engines]
    async with DirectGateway(engines) as gateway, aiohttp.ClientSession() as session:
        served = [(await _post_sse(session, gateway.url, _chat("x")))[1] for _ in range(6)]
    names = [e.name for e in cluster.engines]
    assert served == names + names


async def test_unreachable_picker_is_a_500_with_a_reason(cluster: Cluster) -> None:
    engines = [e.endpoint for e in cluster.engines]
    async with (
        DirectGateway(
            engines, extproc_target=f"127.0.0.1:{free_port()}", message_timeout_s=5
        ) as gateway,
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}/v1/chat/completions", json=_chat("x")) as response,
    ):
        assert response.status == 500
        assert "ext_proc" in await response.text()
    assert gateway.stats.extproc_errors == 1


async def test_client_leaving_mid_stream_ends_the_pickers_stream(
    cluster: Cluster, one_endpoint_picker: Picker
) -> None:
    """As when a client leaves Envoy: the gateway cancels the ext_proc stream and the picker
    reports the request as abandoned (its in-flight bookkeeping is released)."""
    engines = [e.endpoint for e in cluster.engines]
    before = one_endpoint_picker.metric("llm_d_epp_client_disconnect_total")
    body = {**_chat("a long answer please"), "max_tokens": 2000}
    async with DirectGateway(engines, extproc_target=one_endpoint_picker.target) as gateway:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{gateway.url}/v1/chat/completions", json=body) as response,
        ):
            assert response.status == 200
            first = await response.content.readline()
            assert first.startswith(b"data:")
            response.close()  # drop the connection mid-stream
        deadline = time.monotonic() + 20
        while one_endpoint_picker.metric("llm_d_epp_client_disconnect_total") <= before:
            assert time.monotonic() < deadline, "the picker never saw the client leave"
            await asyncio.sleep(0.05)
        assert gateway.stats.client_disconnects == 1


async def test_unreachable_engine_is_a_503_naming_it() -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with (
        DirectGateway([dead]) as gateway,
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}/v1/chat/completions", json=_chat("x")) as response,
    ):
        assert response.status == 503
        assert dead in await response.text()
    assert gateway.stats.upstream_errors == 1
