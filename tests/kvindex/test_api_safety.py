"""The index service's HTTP API refuses what could hurt it or anyone else, over real HTTP on
loopback: bodies nested too deeply (400, counted, never a 500), /v1/debug fetches from
anything but an engine the index knows (server-side request forgery: 400, counted, nothing
fetched), and speculative entries for engines it does not know (400, counted)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from score_fixtures import Registry, deepseek

from kvindex.config import ServiceConfig
from kvindex.index import MemoryIndex
from kvindex.scoring import Scorer
from kvindex.service.assembly import KvindexServer
from kvindex.service.score_api import ScoreMetrics, ScoreService
from kvindex.service.score_http import add_score_routes, engine_key_of_url
from kvindex.speculative import SpeculativeIndex

MODEL = "deepseek-ai/DeepSeek-V3"
TEXT = "The quarterly numbers show steady growth across every region. " * 4


@dataclass
class Setup:
    client: TestClient
    engine: TestClient  # a /tokenize endpoint that records every request it gets
    engine_key: str
    metrics: ScoreMetrics
    known: set[str]
    engine_hits: list[str] = field(default_factory=list)

    def errors(self, reason: str) -> float:
        for metric in self.metrics.registry.collect():
            for sample in metric.samples:
                if sample.name == "kvindex_score_errors_total" and (
                    sample.labels.get("reason") == reason
                ):
                    return sample.value
        return 0.0


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    hits: list[str] = []

    async def tokenize(request: web.Request) -> web.Response:
        hits.append(request.path)
        body = await request.json()
        ids = deepseek().encode(body["prompt"], body.get("add_special_tokens", True))
        return web.json_response({"tokens": ids, "count": len(ids)})

    engine_app = web.Application()
    engine_app.router.add_post("/tokenize", tokenize)
    engine = TestClient(TestServer(engine_app, host="127.0.0.1", port=0))
    await engine.start_server()
    engine_key = f"127.0.0.1:{engine.server.port}"
    known = {engine_key, "10.0.0.1:8000"}
    metrics = ScoreMetrics()
    service = ScoreService(
        Scorer(MemoryIndex()),
        Registry({MODEL: deepseek()}),
        metrics=metrics,
        engine_known=known.__contains__,
    )
    app = web.Application()
    add_score_routes(app, service)
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        yield Setup(client, engine, engine_key, metrics, known, hits)
    finally:
        await client.close()
        await engine.close()


def deep(field_name: str, depth: int = 100_000) -> bytes:
    return b'{"model":"m","' + field_name.encode() + b'":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("path", ["/v1/score", "/v1/speculative", "/v1/debug"])
@pytest.mark.parametrize("where", ["unknown_field", "messages"])
async def test_deep_nesting_is_a_counted_400(setup: Setup, path: str, where: str) -> None:
    body = (
        deep(where)
        if where != "messages"
        else (b'{"model":"m","messages":[{"content":' + b"[" * 100_000 + b"]" * 100_000 + b"}]}")
    )
    before = setup.errors("too_deep")
    response = await setup.client.post(
        path, data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["reason"] == "too_deep"
    assert setup.errors("too_deep") == before + 1


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254",  # a metadata service
        "http://127.0.0.1:1",  # a port no engine has
        "file:///etc/passwd",
        "http://user:pw@ENGINE",  # user info
        "http://ENGINE/admin?x=1",  # a path and a query on a known engine
        "gopher://ENGINE",
    ],
)
async def test_debug_fetches_only_from_known_engines(setup: Setup, url: str) -> None:
    url = url.replace("ENGINE", setup.engine_key)
    response = await setup.client.post(
        "/v1/debug", json={"model": MODEL, "prompt": TEXT, "engine_url": url}
    )
    assert response.status == 400
    assert (await response.json())["error"]["reason"] == "unknown_engine_url"
    assert setup.engine_hits == []
    assert setup.errors("unknown_engine_url") == 1
    # GET carries the same check.
    response = await setup.client.get(
        "/v1/debug", params={"model": MODEL, "prompt": TEXT, "engine_url": url}
    )
    assert response.status == 400
    assert setup.errors("unknown_engine_url") == 2


async def test_debug_fetches_from_a_known_engine(setup: Setup) -> None:
    for url in (f"http://{setup.engine_key}", f"http://{setup.engine_key}/"):
        response = await setup.client.post(
            "/v1/debug", json={"model": MODEL, "prompt": TEXT, "engine_url": url}
        )
        assert response.status == 200
        (check,) = (await response.json())["token_checks"]
        assert check["ok"] is True
    assert setup.engine_hits == ["/tokenize", "/tokenize"]


async def test_speculative_only_for_known_engines(setup: Setup) -> None:
    body = {"engine": "10.66.0.1:8000", "model": MODEL, "prompt": TEXT}
    response = await setup.client.post("/v1/speculative", json=body)
    assert response.status == 400
    assert (await response.json())["error"]["reason"] == "unknown_engine"
    assert setup.errors("unknown_engine") == 1
    response = await setup.client.post("/v1/speculative", json={**body, "engine": "10.0.0.1:8000"})
    assert response.status == 200
    # Once the engine is known (discovered, or its events accepted), it is accepted.
    setup.known.add("10.66.0.1:8000")
    response = await setup.client.post("/v1/speculative", json=body)
    assert response.status == 200


def test_engine_key_of_url() -> None:
    assert engine_key_of_url("http://10.0.0.1:8000") == "10.0.0.1:8000"
    assert engine_key_of_url("http://10.0.0.1:8000/") == "10.0.0.1:8000"
    assert engine_key_of_url("https://pod.ns.svc") == "pod.ns.svc:443"
    assert engine_key_of_url("http://[fd00::1]:8000") == "[fd00::1]:8000"
    for bad in ("10.0.0.1:8000", "http://a:b@h:1", "http://h:1/x", "http://h:1?q", "http://h:x"):
        assert engine_key_of_url(bad) is None


def test_the_service_knows_only_engines_the_ingest_knows() -> None:
    # kvindex serve wires the score service's known engines to the ingest's engines
    # (discovered, or publishing events it accepted).
    server = KvindexServer(ServiceConfig(zmq_connect=["tcp://127.0.0.1:1"], speculative_ttl_s=0))
    try:
        assert server.score.engine_known == server.service.ingest.knows
        assert not server.score.knows("10.66.0.1:8000")
    finally:
        server.service.ingest.subscriber.close()


@pytest.fixture
async def guarded() -> AsyncIterator[tuple[TestClient, ScoreMetrics, ScoreService]]:
    metrics = ScoreMetrics()
    service = ScoreService(
        Scorer(MemoryIndex(), speculative=SpeculativeIndex()),
        Registry({MODEL: deepseek()}),
        metrics=metrics,
        engine_known={"10.0.0.1:8000"}.__contains__,
        write_token="s3cret",
    )
    app = web.Application()
    add_score_routes(app, service)
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        yield client, metrics, service
    finally:
        await client.close()


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "s3cret", "Basic czNjcmV0", "Bearer  s3cret x"]
)
async def test_write_and_debug_need_the_token(
    guarded: tuple[TestClient, ScoreMetrics, ScoreService], header: str | None
) -> None:
    client, metrics, _ = guarded
    headers = {} if header is None else {"Authorization": header}
    body = {"engine": "10.0.0.1:8000", "model": MODEL, "prompt": TEXT}
    for method, path in (("POST", "/v1/speculative"), ("POST", "/v1/debug")):
        response = await client.request(method, path, json=body, headers=headers)
        assert response.status == 401
        assert (await response.json())["error"]["reason"] == "unauthorized"
    response = await client.get("/v1/debug", params={"model": MODEL}, headers=headers)
    assert response.status == 401
    # Reads stay open.
    response = await client.post("/v1/score", json={"model": MODEL, "prompt": TEXT})
    assert response.status == 200
    errors = [
        s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == "kvindex_score_errors_total" and s.labels.get("reason") == "unauthorized"
    ]
    assert sum(errors) == 3


async def test_the_right_token_is_accepted_over_http_and_grpc(
    guarded: tuple[TestClient, ScoreMetrics, ScoreService],
) -> None:
    import grpc

    from kvindex._proto.kvindex.v1 import kvindex_pb2, kvindex_pb2_grpc
    from kvindex.service.grpc_server import build_grpc_server

    client, _, service = guarded
    auth = {"Authorization": "Bearer s3cret"}
    body = {"engine": "10.0.0.1:8000", "model": MODEL, "prompt": TEXT}
    assert (await client.post("/v1/speculative", json=body, headers=auth)).status == 200
    assert (await client.post("/v1/debug", json=body, headers=auth)).status == 200
    server = build_grpc_server(service)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kvindex_pb2_grpc.KVIndexStub(channel)
            request = kvindex_pb2.RecordSpeculativeRequest(
                engine="10.0.0.1:8000", model=MODEL, token_ids=list(range(32))
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RecordSpeculative(request)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = await stub.RecordSpeculative(
                request, metadata=(("authorization", "Bearer s3cret"),)
            )
            assert reply.recorded_blocks == 2
    finally:
        await server.stop(None)


def test_the_token_comes_from_a_file(tmp_path: Path) -> None:
    from kvindex.config import ConfigError, read_token_file

    path = tmp_path / "token"
    path.write_text("  s3cret\n")
    assert read_token_file(path, "--api-token-file") == "s3cret"
    path.write_text("\n")
    with pytest.raises(ConfigError, match=r"--api-token-file .* empty"):
        read_token_file(path, "--api-token-file")
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(tmp_path / "missing", "--api-token-file")
    with pytest.raises(ConfigError, match="--api-token-file"):
        KvindexServer(ServiceConfig(speculative_ttl_s=0, api_token_file=str(tmp_path / "x")))
