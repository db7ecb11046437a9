"""The HTTP edge over real HTTP (aiohttp on loopback), with the index filled from vLLM 0.33
style BlockStored events through the real EventApplier and prompts tokenized by the real
DeepSeek tokenizer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from score_fixtures import Registry, deepseek, store_prompt

from kvindex.index import MemoryIndex
from kvindex.scoring import Scorer, ScoringConfig
from kvindex.service.score_api import ScoreMetrics, ScoreService, ScoreServiceConfig
from kvindex.service.score_http import add_score_routes
from kvindex.speculative import SpeculativeIndex
from tests.metrics import sample

MODEL = "deepseek-ai/DeepSeek-V3"
ADAPTER = "sql-lora"
TEXT = "Summarise the following report in three bullet points. " * 30


@dataclass
class Api:
    index: MemoryIndex
    registry: CollectorRegistry
    client: TestClient[Any, Any]

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        response = await self.client.post(path, json=body)
        return response.status, await response.json()

    def errors(self, reason: str) -> float:
        return sample(self.registry, "kvindex_score_errors_total", api="http", reason=reason)


async def start(service: ScoreService, index: MemoryIndex, **kw: Any) -> AsyncIterator[Api]:
    app = web.Application()
    add_score_routes(app, service, **kw)
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        yield Api(index, service.metrics.registry, client)
    finally:
        await client.close()


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    index = MemoryIndex()
    tokenizers = Registry({MODEL: deepseek(), "broken/model": None}, {ADAPTER: MODEL})
    scorer = Scorer(index, ScoringConfig(max_prompt_tokens=4096), SpeculativeIndex())
    service = ScoreService(
        scorer,
        tokenizers,
        ScoreServiceConfig(max_prompt_chars=50_000),
        ScoreMetrics(CollectorRegistry()),
    )
    async for value in start(service, index, max_body_bytes=200_000):
        yield value


def pairs(body: dict[str, Any]) -> list[tuple[str, int]]:
    return [(s["engine"], s["matched_blocks"]) for s in body["scores"]]


async def test_score_completion_prompt_and_token_ids(api: Api) -> None:
    ids = deepseek().encode(TEXT)
    total = len(ids) // 16
    store_prompt(api.index, "10.0.0.1:8000", MODEL, ids[:96])
    store_prompt(api.index, "10.0.0.2:8000", MODEL, ids)
    store_prompt(api.index, "10.0.0.3:8000", MODEL, ids, medium="CPU")

    status, body = await api.post("/v1/score", {"model": MODEL, "prompt": TEXT})
    assert status == 200
    assert body["model"] == MODEL
    assert body["block_size"] == 16
    assert body["total_blocks"] == total
    assert body["prompt_tokens"] == len(ids)
    assert pairs(body) == [("10.0.0.2:8000", total), ("10.0.0.3:8000", total), ("10.0.0.1:8000", 6)]
    assert [s["score"] for s in body["scores"]] == pytest.approx([1.0, 0.8, 6 / total])
    assert body["scores"][1]["tiers"] == {"gpu": 0, "cpu": total, "storage": 0}

    status, by_ids = await api.post(
        "/v1/score", {"model": MODEL, "token_ids": ids, "engines": ["10.0.0.1:8000", "10.9.9.9:1"]}
    )
    assert status == 200
    assert pairs(by_ids) == [("10.0.0.1:8000", 6), ("10.9.9.9:1", 0)]


async def test_score_chat_with_lora_and_salt(api: Api) -> None:
    messages = [
        {"role": "system", "content": TEXT},
        {"role": "user", "content": "And the risks?"},
    ]
    chat_ids = deepseek().apply_chat_template(messages)
    n = len(chat_ids) // 16
    store_prompt(api.index, "10.0.0.4:8000", MODEL, chat_ids, lora=ADAPTER, salt="tenant-7")
    store_prompt(api.index, "10.0.0.5:8000", MODEL, chat_ids)

    status, body = await api.post(
        "/v1/score", {"model": ADAPTER, "messages": messages, "cache_salt": "tenant-7"}
    )
    assert status == 200
    assert (body["model"], body["lora"]) == (MODEL, ADAPTER)
    assert pairs(body) == [("10.0.0.4:8000", n)]
    # Same chat, base model, no salt: the other engine.
    status, body = await api.post("/v1/score", {"model": MODEL, "messages": messages})
    assert pairs(body) == [("10.0.0.5:8000", n)]
    # Explicit lora field on the base model equals the adapter-name form.
    status, body = await api.post(
        "/v1/score",
        {"model": MODEL, "lora": ADAPTER, "messages": messages, "cache_salt": "tenant-7"},
    )
    assert pairs(body) == [("10.0.0.4:8000", n)]
    # Without the generation prompt the last block(s) differ, the shared prefix still matches.
    status, body = await api.post(
        "/v1/score", {"model": MODEL, "messages": messages, "add_generation_prompt": False}
    )
    assert status == 200
    assert 0 < body["scores"][0]["matched_blocks"] <= n


async def test_speculative_endpoint(api: Api) -> None:
    ids = deepseek().encode(TEXT)
    status, body = await api.post(
        "/v1/speculative", {"engine": "10.0.0.8:8000", "model": MODEL, "prompt": TEXT}
    )
    assert (status, body) == (200, {"engine": "10.0.0.8:8000", "recorded_blocks": len(ids) // 16})
    status, body = await api.post("/v1/score", {"model": MODEL, "token_ids": ids})
    assert pairs(body) == [("10.0.0.8:8000", len(ids) // 16)]
    assert body["scores"][0]["speculative_blocks"] == len(ids) // 16
    status, body = await api.post("/v1/speculative", {"model": MODEL, "prompt": TEXT})
    assert (status, body["error"]["reason"]) == (400, "missing_engine")


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"{not json", 400, "bad_json"),
        ({"model": MODEL, "token_ids": "abc"}, 400, "bad_field"),
        ({"model": 3, "prompt": "x"}, 400, "bad_field"),
        ({"prompt": "x"}, 400, "bad_field"),
        ({"model": MODEL}, 400, "prompt_shape"),
        ({"model": MODEL, "prompt": "x", "token_ids": [1]}, 400, "prompt_shape"),
        ({"model": MODEL, "token_ids": [-1] * 16}, 400, "invalid_token_id"),
        ({"model": MODEL, "messages": [{"content": "x"}]}, 400, "bad_messages"),
        ({"model": "nobody/none", "prompt": "x"}, 404, "unknown_model"),
        ({"model": "broken/model", "prompt": "x"}, 424, "no_tokenizer"),
        ({"model": MODEL, "token_ids": [1] * 5000}, 413, "prompt_too_long"),
        ({"model": MODEL, "prompt": "x" * 60_000}, 413, "prompt_too_long"),
        ({"model": MODEL, "prompt": "x" * 300_000}, 413, "body_too_large"),
    ],
)
async def test_errors(api: Api, body: Any, status: int, reason: str) -> None:
    if isinstance(body, bytes):
        response = await api.client.post("/v1/score", data=body)
    else:
        response = await api.client.post("/v1/score", json=body)
    data = await response.json()
    assert response.status == status, data
    assert data["error"]["reason"] == reason
    assert data["error"]["status"] == status
    assert data["error"]["message"]
    assert api.errors(reason) == 1.0


async def test_unknown_model_names_configured_models(api: Api) -> None:
    status, body = await api.post("/v1/score", {"model": "nobody/none", "prompt": "x"})
    assert status == 404
    assert MODEL in body["error"]["message"]
    assert ADAPTER in body["error"]["message"]


async def test_without_tokenizers_text_needs_a_tokenizer_and_models_are_checked() -> None:
    index = MemoryIndex()
    service = ScoreService(
        Scorer(index),
        None,
        ScoreServiceConfig(models=[MODEL]),
        ScoreMetrics(CollectorRegistry()),
    )
    async for api in start(service, index):
        store_prompt(index, "10.0.0.1:8000", MODEL, list(range(64)))
        status, body = await api.post("/v1/score", {"model": MODEL, "token_ids": list(range(65))})
        assert (status, pairs(body)) == (200, [("10.0.0.1:8000", 4)])
        status, body = await api.post("/v1/score", {"model": MODEL, "prompt": "hello"})
        assert status == 424
        assert "--tokenizer" in body["error"]["message"]
        status, body = await api.post("/v1/score", {"model": "other", "token_ids": [1]})
        assert status == 404
        assert MODEL in body["error"]["message"]


async def test_chunked_bodies_are_read_whole_and_bounded(api: Api) -> None:
    ids = deepseek().encode(TEXT)
    store_prompt(api.index, "10.0.0.1:8000", MODEL, ids)
    body = json.dumps({"model": MODEL, "token_ids": ids}).encode()

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    response = await api.client.post(
        "/v1/score", data=chunks(body), headers={"Content-Type": "application/json"}
    )
    assert response.status == 200
    assert pairs(await response.json()) == [("10.0.0.1:8000", len(ids) // 16)]
    big = json.dumps({"model": MODEL, "prompt": "y" * 250_000}).encode()
    response = await api.client.post("/v1/score", data=chunks(big))
    assert response.status == 413
    assert (await response.json())["error"]["reason"] == "body_too_large"


class FailingIndex(MemoryIndex):
    """Failure injection: a backend whose lookups fail (as a Redis backend does when Redis
    goes away mid-request)."""

    def lookup(self, keys: Any, engines: Any = None) -> Any:
        raise ConnectionError("backend unavailable")


async def test_backend_failure_is_a_counted_500() -> None:
    index = FailingIndex()
    service = ScoreService(Scorer(index), metrics=ScoreMetrics(CollectorRegistry()))
    async for api in start(service, index):
        status, body = await api.post("/v1/score", {"model": MODEL, "token_ids": list(range(32))})
        assert status == 500
        assert body["error"]["reason"] == "internal_error"
        assert "ConnectionError" in body["error"]["message"]
        assert api.errors("internal_error") == 1.0
