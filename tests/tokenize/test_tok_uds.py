"""UdsTokenizer against a double of llm-d's tokenizer sidecar that speaks the real protocol
(tokenization.TokenizationService over gRPC) on a real Unix socket, with ids from the local
tokenizer, so sidecar ids == local ids is checkable."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kvindex.tokenize import (
    ChatTemplateError,
    TokenizationCacheConfig,
    TokenizationError,
    TokenizerLoadError,
    TokenizerUnavailableError,
    UdsTokenizer,
    UdsTokenizerConfig,
    load_tokenizer,
)
from kvtools.demo.model import write_model_dir
from tests.uds_sidecar import SidecarDouble, short_socket_path

MODEL = "acme/chat"
FAST = {"init_attempts": 2, "init_backoff_s": 0.01}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model")


@pytest.fixture
async def sidecar(model_dir: Path) -> AsyncIterator[SidecarDouble]:
    double = SidecarDouble({MODEL: model_dir})
    await double.start(short_socket_path())
    try:
        yield double
    finally:
        await double.stop()


def tokenizer(sidecar: SidecarDouble, **kw: Any) -> UdsTokenizer:
    return UdsTokenizer(MODEL, UdsTokenizerConfig(socket_file=sidecar.socket_file), **FAST, **kw)


async def test_completion_prompts_render_as_the_engine(
    sidecar: SidecarDouble, model_dir: Path
) -> None:
    local = load_tokenizer(model_dir)
    async with tokenizer(sidecar) as tok:
        assert [r.model_name for r in sidecar.rpcs("InitializeTokenizer")] == [MODEL]
        text = "Hello <\uff5cUser\uff5c> world\n" * 20  # a DeepSeek special token
        assert await tok.encode(text) == local.encode(text, True)
        (render,) = sidecar.rpcs("RenderCompletion")
        assert (render.model_name, render.prompt) == (MODEL, text)
        # Without special tokens (llm-d never asks): the Tokenize RPC.
        assert await tok.encode(text, add_special_tokens=False) == local.encode(text, False)
        assert sidecar.rpcs("Tokenize")[0].add_special_tokens is False


async def test_chat_renders_with_tools_parts_and_kwargs(
    sidecar: SidecarDouble, model_dir: Path
) -> None:
    local = load_tokenizer(model_dir)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, "there"]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "user", "content": "and now?"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    async with tokenizer(sidecar) as tok:
        got = await tok.apply_chat_template(messages, tools=tools, enable_thinking=False)
        assert got == local.apply_chat_template(messages, True, tools, enable_thinking=False)
        (sent,) = sidecar.rpcs("RenderChatCompletion")
        assert sent.model_name == MODEL and sent.add_generation_prompt is True
        assert [m.role for m in sent.messages] == ["system", "user", "assistant", "user"]
        assert [p.text for p in sent.messages[1].content_parts] == ["Hi", "there"]
        assert not sent.messages[2].HasField("content")
        assert '"name": "f"' in sent.messages[2].tool_calls_json
        assert '"enable_thinking": false' in sent.chat_template_kwargs
        no_prompt = await tok.apply_chat_template(messages[:2], add_generation_prompt=False)
        assert no_prompt == local.apply_chat_template(messages[:2], False)
        assert sidecar.rpcs("RenderChatCompletion")[1].add_generation_prompt is False


async def test_identical_calls_are_answered_from_the_cache(sidecar: SidecarDouble) -> None:
    async with tokenizer(sidecar) as tok:
        chat = [{"role": "user", "content": "same"}]
        first = await tok.apply_chat_template(chat)
        assert await tok.apply_chat_template(chat) == first
        assert await tok.encode("p") == await tok.encode("p")
        assert len(sidecar.rpcs("RenderChatCompletion")) == 1
        assert len(sidecar.rpcs("RenderCompletion")) == 1
        stats = tok.cache_stats()
        assert (stats.hits, stats.misses, stats.entries) == (2, 2, 2)
    off = tokenizer(sidecar, cache=TokenizationCacheConfig(enabled=False))
    async with off:
        await off.encode("p")
        await off.encode("p")
        assert off.cache_stats().uncached_calls == 2
    assert len(sidecar.rpcs("RenderCompletion")) == 3


async def test_metrics_count_calls_by_outcome(sidecar: SidecarDouble) -> None:
    registry = CollectorRegistry()
    async with tokenizer(sidecar, registry=registry) as tok:
        await tok.encode("x")
        sidecar.mode = "fail"
        with pytest.raises(TokenizationError, match="boom"):
            await tok.encode("y")
    # A second tokenizer on the same registry shares the metrics (no duplicate error).
    tokenizer(sidecar, registry=registry)

    def value(rpc: str, outcome: str) -> float | None:
        labels = {"model": MODEL, "rpc": rpc, "outcome": outcome}
        return registry.get_sample_value("kvindex_tokenizer_sidecar_requests_total", labels)

    assert value("RenderCompletion", "ok") == 1
    assert value("RenderCompletion", "error") == 1
    assert value("InitializeTokenizer", "ok") is None  # counted only for the render calls


async def test_missing_socket_fails_start_with_the_fix() -> None:
    path = short_socket_path()
    tok = UdsTokenizer(MODEL, UdsTokenizerConfig(socket_file=path), **FAST)
    with pytest.raises(
        TokenizerUnavailableError, match=f"socket {path} does not exist.*2 attempts"
    ):
        await tok.start()
    await tok.close()


async def test_socket_nobody_listens_on_is_unavailable() -> None:
    path = short_socket_path()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a socket file left behind, nobody accepting
    stale.close()
    assert os.path.exists(path)
    tok = UdsTokenizer(MODEL, UdsTokenizerConfig(socket_file=path), **FAST)
    with pytest.raises(TokenizerUnavailableError, match="unavailable"):
        await tok.start()
    await tok.close()


async def test_sidecar_going_away_after_start(sidecar: SidecarDouble) -> None:
    async with tokenizer(sidecar) as tok:
        await sidecar.stop()  # grpc removes its socket file
        assert not os.path.exists(sidecar.socket_file)
        with pytest.raises(TokenizerUnavailableError, match="does not exist"):
            await tok.encode("x")
        assert tok.failures == 1


async def test_unknown_model_and_server_errors(sidecar: SidecarDouble) -> None:
    unknown = UdsTokenizer("other", UdsTokenizerConfig(socket_file=sidecar.socket_file), **FAST)
    with pytest.raises(TokenizerLoadError, match="Failed to initialize renderer for model: other"):
        await unknown.start()
    await unknown.close()
    async with tokenizer(sidecar) as tok:
        # The sidecar aborts with INTERNAL and the template's message.
        with pytest.raises(ChatTemplateError, match="template"):
            await tok.apply_chat_template(
                [{"role": "user", "content": "x"}],
                chat_template="{{ raise_exception('this template refuses') }}",
            )
        sidecar.mode = "fail"
        with pytest.raises(TokenizationError, match=r"RenderChatCompletion .* failed: boom"):
            await tok.apply_chat_template([{"role": "user", "content": "y"}])


async def test_timeout_is_bounded(sidecar: SidecarDouble) -> None:
    async with tokenizer(sidecar) as tok:
        tok.timeout_s = 0.2  # after start: loading the model may take longer
        sidecar.mode = "hang"
        with pytest.raises(TokenizerUnavailableError, match=r"no answer within 0\.2s"):
            await tok.encode("x")


async def test_what_the_protocol_cannot_carry_is_refused(sidecar: SidecarDouble) -> None:
    async with tokenizer(sidecar) as tok:
        audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
        with pytest.raises(ChatTemplateError, match="text and image_url parts only"):
            await tok.apply_chat_template(audio)
        with pytest.raises(TokenizationError, match="documents"):
            await tok.apply_chat_template(audio[:0], documents=[{"text": "d"}])
        with pytest.raises(ChatTemplateError, match="no role"):
            await tok.apply_chat_template([{"content": "x"}])
    assert sidecar.rpcs("RenderChatCompletion") == []


async def test_model_tokenizer_map_sends_the_directory(
    sidecar: SidecarDouble, model_dir: Path
) -> None:
    config = UdsTokenizerConfig.from_mapping(
        {
            "socketFile": sidecar.socket_file,
            "modelTokenizerMap": {MODEL: str(model_dir / "tokenizer.json")},
        }
    )
    async with UdsTokenizer(MODEL, config, **FAST) as tok:
        assert tok.sidecar_model == str(model_dir)
        await tok.encode("x")
    assert sidecar.rpcs("RenderCompletion")[0].model_name == str(model_dir)
    with pytest.raises(TokenizerLoadError, match="no entry for model 'm2'"):
        UdsTokenizer("m2", config)


def test_config_parsing() -> None:
    default = UdsTokenizerConfig.from_mapping({})
    assert default.target == "unix:/tmp/tokenizer/tokenizer-uds.socket"
    tcp = UdsTokenizerConfig.from_mapping({"socketFile": "127.0.0.1:50051", "useTCP": True})
    assert tcp.target == "127.0.0.1:50051"
    with pytest.raises(ValueError, match="unknown entries"):
        UdsTokenizerConfig.from_mapping({"socket": "/x"})
    with pytest.raises(ValueError, match="modelTokenizerMap"):
        UdsTokenizerConfig.from_mapping({"modelTokenizerMap": ["x"]})


# llm-d-kv-cache's api/tokenizerpb/tokenizer.proto (7be76e119ca50c5700b3bca65a19b6a0218a9b62):
# the request/response messages the client and the sidecar exchange, field name -> number.
UPSTREAM_FIELDS = {
    "TokenizeRequest": {"input": 1, "model_name": 2, "add_special_tokens": 3},
    "TokenizeResponse": {"input_ids": 1, "success": 2, "error_message": 3, "offset_pairs": 4},
    "ImageUrl": {"url": 1},
    "ContentPart": {"type": 1, "text": 2, "image_url": 3},
    "ChatMessage": {"role": 1, "content": 2, "content_parts": 3, "tool_calls_json": 4},
    "InitializeTokenizerRequest": {
        "model_name": 1,
        "enable_thinking": 2,
        "add_generation_prompt": 3,
    },
    "InitializeTokenizerResponse": {"success": 1, "error_message": 2},
    "RenderChatCompletionRequest": {
        "model_name": 1,
        "messages": 2,
        "tools_json": 3,
        "chat_template": 4,
        "add_generation_prompt": 5,
        "continue_final_message": 6,
        "chat_template_kwargs": 7,
    },
    "RenderChatCompletionResponse": {
        "request_id": 1,
        "token_ids": 2,
        "features": 3,
        "success": 4,
        "error_message": 5,
    },
    "RenderCompletionRequest": {"model_name": 1, "prompt": 2},
    "RenderCompletionResponse": {"request_id": 1, "token_ids": 2, "success": 3, "error_message": 4},
}


def test_the_proto_is_llm_ds() -> None:
    from kvindex._proto.tokenization import tokenizer_pb2

    file = tokenizer_pb2.DESCRIPTOR
    assert file.package == "tokenization"
    service = file.services_by_name["TokenizationService"]
    assert {m.name: (m.input_type.name, m.output_type.name) for m in service.methods} == {
        "Tokenize": ("TokenizeRequest", "TokenizeResponse"),
        "RenderChatTemplate": ("ChatTemplateRequest", "ChatTemplateResponse"),
        "InitializeTokenizer": ("InitializeTokenizerRequest", "InitializeTokenizerResponse"),
        "RenderChatCompletion": ("RenderChatCompletionRequest", "RenderChatCompletionResponse"),
        "RenderCompletion": ("RenderCompletionRequest", "RenderCompletionResponse"),
    }
    for name, fields in UPSTREAM_FIELDS.items():
        message = file.message_types_by_name[name]
        assert {f.name: f.number for f in message.fields} == fields, name
    optional = tokenizer_pb2.RenderChatCompletionRequest.DESCRIPTOR.fields_by_name
    assert optional["add_generation_prompt"].has_presence  # unset means true
