"""The gRPC edge over real grpc.aio servers on loopback (port 0), called with clients
generated from our proto and from the llm-d-compatible proto."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from score_fixtures import Registry, deepseek, store_prompt

from kvindex._proto.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from kvindex._proto.kvindex.v1 import kvindex_pb2, kvindex_pb2_grpc
from kvindex.index import MemoryIndex
from kvindex.scoring import Scorer, ScoringConfig
from kvindex.service.grpc_server import (
    HealthServicer,
    add_grpc_services,
    build_grpc_server,
    mark_serving,
)
from kvindex.service.score_api import ScoreMetrics, ScoreService
from kvindex.speculative import SpeculativeIndex
from tests.metrics import sample

MODEL = "deepseek-ai/DeepSeek-V3"
ADAPTER = "sql-lora"
TEXT = "You are a careful assistant. " * 40


@dataclass
class Served:
    index: MemoryIndex
    service: ScoreService
    registry: CollectorRegistry
    health: Any
    channel: grpc.aio.Channel
    kv: kvindex_pb2_grpc.KVIndexStub
    llmd: indexer_pb2_grpc.IndexerServiceStub


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    index = MemoryIndex()
    registry = CollectorRegistry()
    tokenizers = Registry({MODEL: deepseek(), "broken/model": None}, {ADAPTER: MODEL})
    scorer = Scorer(index, ScoringConfig(max_prompt_tokens=4096), SpeculativeIndex())
    service = ScoreService(scorer, tokenizers, metrics=ScoreMetrics(registry))
    health = HealthServicer()
    server = build_grpc_server(service, health)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await mark_serving(health)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(
            index,
            service,
            registry,
            health,
            channel,
            kvindex_pb2_grpc.KVIndexStub(channel),
            indexer_pb2_grpc.IndexerServiceStub(channel),
        )
    finally:
        await channel.close()
        await server.stop(None)


def errors(registry: CollectorRegistry, api: str, reason: str) -> float:
    return sample(registry, "kvindex_score_errors_total", api=api, reason=reason)


async def test_score_tokens_prompt_and_chat(served: Served) -> None:
    tok = deepseek()
    prompt_ids = tok.encode(TEXT)
    store_prompt(served.index, "10.0.0.1:8000", MODEL, prompt_ids[:64])
    store_prompt(served.index, "10.0.0.2:8000", MODEL, prompt_ids)
    total = len(prompt_ids) // 16

    by_tokens = await served.kv.ScoreTokens(
        kvindex_pb2.ScoreTokensRequest(model=MODEL, token_ids=prompt_ids)
    )
    assert by_tokens.block_size == 16
    assert by_tokens.total_blocks == total
    assert by_tokens.prompt_tokens == len(prompt_ids)
    assert [(s.engine, s.matched_blocks) for s in by_tokens.scores] == [
        ("10.0.0.2:8000", total),
        ("10.0.0.1:8000", 4),
    ]
    assert by_tokens.scores[0].score == 1.0
    assert by_tokens.scores[0].gpu_blocks == total

    by_prompt = await served.kv.ScorePrompt(
        kvindex_pb2.ScorePromptRequest(model=MODEL, prompt=TEXT, engines=["10.0.0.1:8000"])
    )
    assert [(s.engine, s.matched_blocks) for s in by_prompt.scores] == [("10.0.0.1:8000", 4)]

    messages = [{"role": "system", "content": TEXT}, {"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    chat_ids = tok.apply_chat_template(messages, tools=tools)
    store_prompt(served.index, "10.0.0.3:8000", MODEL, chat_ids, lora=ADAPTER, salt="t1")
    chat = await served.kv.ScoreChat(
        kvindex_pb2.ScoreChatRequest(
            model=ADAPTER,  # an adapter name resolves to base model + adapter
            messages=[kvindex_pb2.ChatMessage(**m) for m in messages],
            tools_json=json.dumps(tools),
            cache_salt="t1",
        )
    )
    assert chat.model == MODEL
    assert chat.lora == ADAPTER
    assert [(s.engine, s.matched_blocks) for s in chat.scores] == [
        ("10.0.0.3:8000", len(chat_ids) // 16)
    ]
    # Without the salt (or without the generation prompt, other tokens) nothing matches.
    unsalted = await served.kv.ScoreChat(
        kvindex_pb2.ScoreChatRequest(
            model=ADAPTER,
            messages=[kvindex_pb2.ChatMessage(**m) for m in messages],
            tools_json=json.dumps(tools),
        )
    )
    assert list(unsalted.scores) == []


async def test_llmd_get_pod_scores(served: Served) -> None:
    ids = deepseek().encode(TEXT)
    store_prompt(served.index, "10.0.0.1:8000", MODEL, ids[:80])
    store_prompt(served.index, "10.0.0.2:8000", MODEL, ids[:48], medium="CPU")
    response = await served.llmd.GetPodScores(
        indexer_pb2.GetPodScoresRequest(prompt=TEXT, model_name=MODEL)
    )
    assert [(s.pod, s.score) for s in response.scores] == [
        ("10.0.0.1:8000", 5.0),
        ("10.0.0.2:8000", pytest.approx(3 * 0.8)),
    ]
    assert not response.scores[0].HasField("data_parallel_rank")
    only = await served.llmd.GetPodScores(
        indexer_pb2.GetPodScoresRequest(
            prompt=TEXT, model_name=MODEL, pod_identifiers=["10.0.0.2:8000", "10.0.0.9:8000"]
        )
    )
    assert [s.pod for s in only.scores] == ["10.0.0.2:8000"]  # no-hit pods left out, as llm-d


async def test_llmd_wire_bytes_decode_as_llmd_messages(served: Served) -> None:
    """A client that knows only llm-d's message layout (hand-built bytes: field 1 prompt,
    2 model_name, 3 pod_identifiers) gets a response it can parse as llm-d's PodScore list."""
    ids = deepseek().encode(TEXT)
    store_prompt(served.index, "10.0.0.1:8000", MODEL, ids)

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(number: int, value: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(value)) + value

    raw_request = field(1, TEXT.encode()) + field(2, MODEL.encode()) + field(3, b"10.0.0.1:8000")
    call = served.channel.unary_unary("/indexer.v1.IndexerService/GetPodScores")
    raw_response = await call(raw_request)
    parsed = indexer_pb2.GetPodScoresResponse.FromString(raw_response)
    assert [(s.pod, s.score) for s in parsed.scores] == [("10.0.0.1:8000", len(ids) // 16)]


async def test_speculative_and_stats(served: Served) -> None:
    ids = deepseek().encode(TEXT)
    recorded = await served.kv.RecordSpeculative(
        kvindex_pb2.RecordSpeculativeRequest(engine="10.0.0.7:8000", model=MODEL, token_ids=ids)
    )
    assert recorded.recorded_blocks == len(ids) // 16
    scored = await served.kv.ScoreTokens(kvindex_pb2.ScoreTokensRequest(model=MODEL, token_ids=ids))
    assert [(s.engine, s.speculative_blocks) for s in scored.scores] == [
        ("10.0.0.7:8000", len(ids) // 16)
    ]
    store_prompt(served.index, "10.0.0.1:8000", MODEL, ids)
    stats = await served.kv.Stats(kvindex_pb2.StatsRequest())
    assert stats.engines == 1
    assert stats.keys == len(ids) // 16
    assert stats.speculative_entries == len(ids) // 16
    assert stats.block_size == 16


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (
            kvindex_pb2.ScoreTokensRequest(model=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "missing_model",
        ),
        (
            kvindex_pb2.ScorePromptRequest(model="nobody/none", prompt="x"),
            grpc.StatusCode.NOT_FOUND,
            "unknown_model",
        ),
        (
            kvindex_pb2.ScorePromptRequest(model="broken/model", prompt="x"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no_tokenizer",
        ),
        (
            kvindex_pb2.ScoreTokensRequest(model=MODEL, token_ids=[1] * 5000),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "prompt_too_long",
        ),
        (
            kvindex_pb2.ScoreChatRequest(model=MODEL, tools_json="{not json"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_tools",
        ),
        (
            kvindex_pb2.ScoreTokensRequest(model=ADAPTER, lora="other", token_ids=[1]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lora_conflict",
        ),
    ],
)
async def test_errors_are_statuses_with_reasons(
    served: Served, request_: object, code: grpc.StatusCode, reason: str
) -> None:
    method = {
        kvindex_pb2.ScoreTokensRequest: served.kv.ScoreTokens,
        kvindex_pb2.ScorePromptRequest: served.kv.ScorePrompt,
        kvindex_pb2.ScoreChatRequest: served.kv.ScoreChat,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await method(request_)
    assert caught.value.code() == code
    assert reason in (caught.value.details() or "")
    assert dict(caught.value.trailing_metadata() or ())["kvindex-error-reason"] == reason
    assert errors(served.registry, "grpc", reason) == 1.0


async def test_llmd_unknown_model_is_not_found(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.llmd.GetPodScores(
            indexer_pb2.GetPodScoresRequest(prompt="x", model_name="nobody/none")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert MODEL in (caught.value.details() or "")  # names the configured models
    assert errors(served.registry, "llmd", "unknown_model") == 1.0


async def test_health_check_and_watch(served: Served) -> None:
    """With the standard health client (grpcio-health-checking's stubs)."""
    stub = health_pb2_grpc.HealthStub(served.channel)
    for name in ("", "kvindex.v1.KVIndex", "indexer.v1.IndexerService"):
        ok = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    stream = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await asyncio.wait_for(stream.read(), 5)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    await served.health.enter_graceful_shutdown()
    second = await asyncio.wait_for(stream.read(), 5)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    stream.cancel()


async def test_backend_failure_is_internal() -> None:
    class FailingIndex(MemoryIndex):
        """Failure injection: lookups fail as a Redis backend's do when Redis goes away."""

        def lookup(self, keys: object, engines: object = None) -> dict[str, object]:
            raise ConnectionError("backend unavailable")

    registry = CollectorRegistry()
    service = ScoreService(Scorer(FailingIndex()), metrics=ScoreMetrics(registry))
    server = build_grpc_server(service)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kvindex_pb2_grpc.KVIndexStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ScoreTokens(
                    kvindex_pb2.ScoreTokensRequest(model=MODEL, token_ids=list(range(32)))
                )
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert errors(registry, "grpc", "internal_error") == 1.0
    finally:
        await server.stop(None)


async def test_add_grpc_services_to_an_existing_server() -> None:
    """The service assembly creates the server and calls installers on it."""
    index = MemoryIndex()
    store_prompt(index, "10.0.0.1:8000", MODEL, list(range(48)))
    server = grpc.aio.server()
    add_grpc_services(server, ScoreService(Scorer(index)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = await kvindex_pb2_grpc.KVIndexStub(channel).ScoreTokens(
                kvindex_pb2.ScoreTokensRequest(model=MODEL, token_ids=list(range(49)))
            )
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
        assert [(s.engine, s.matched_blocks) for s in response.scores] == [("10.0.0.1:8000", 3)]
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)
