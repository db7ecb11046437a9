"""A test double of llm-d's tokenizer sidecar (llm-d-kv-cache's services/uds_tokenizer): the
real protocol (`tokenization.TokenizationService`, gRPC) on a real Unix socket, answering the
way the sidecar's servicer does, with ids from the repo's local tokenizer instead of vLLM's
renderer:

- `InitializeTokenizer` loads a model it knows (by served name or by the path it was mapped
  to) or answers `success=false`;
- `RenderCompletion` / `RenderChatCompletion` / `Tokenize` on a model not initialised, or a
  failing render, abort with INTERNAL and the message (the sidecar's `context.abort`);
- chat requests are turned back into an OpenAI request as the sidecar does: `content_parts`
  become `content`, `tool_calls_json` becomes `tool_calls`, `tools_json` and
  `chat_template_kwargs` are parsed, `add_generation_prompt` unset means true.

`mode` makes it misbehave: "hang" (never answers), "fail" (success=false)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from kvindex._proto.tokenization import tokenizer_pb2, tokenizer_pb2_grpc
from kvindex.tokenize import load_tokenizer
from kvindex.tokenize.local import LocalTokenizer


def short_socket_path(name: str = "tokenizer-uds.socket") -> str:
    """A socket path under /tmp (Unix socket paths are limited to ~107 bytes)."""
    return str(Path(tempfile.mkdtemp(prefix="uds", dir="/tmp")) / name)


class SidecarDouble(tokenizer_pb2_grpc.TokenizationServiceServicer):
    def __init__(self, models: Mapping[str, Path]) -> None:
        # served name (and the directory itself) -> tokenizer, as the sidecar loads either
        self._known: dict[str, Path] = {}
        for name, directory in models.items():
            self._known[name] = directory
            self._known[str(directory)] = directory
        self._loaded: dict[str, LocalTokenizer] = {}
        self.calls: list[tuple[str, Any]] = []
        self.mode = "ok"
        self.server: grpc.aio.Server | None = None
        self.socket_file = ""
        self._hang = asyncio.Event()

    def rpcs(self, name: str) -> list[Any]:
        return [request for rpc, request in self.calls if rpc == name]

    async def start(self, socket_file: str) -> None:
        self.socket_file = socket_file
        self.server = grpc.aio.server()
        tokenizer_pb2_grpc.add_TokenizationServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix:{socket_file}")
        await self.server.start()

    async def stop(self) -> None:
        self._hang.set()
        if self.server is not None:
            await self.server.stop(None)
            self.server = None
        if self.socket_file:
            Path(self.socket_file).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                Path(self.socket_file).parent.rmdir()

    async def _enter(self, rpc: str, request: Any) -> None:
        self.calls.append((rpc, request))
        if self.mode == "hang":
            await self._hang.wait()

    def _tokenizer(self, model: str) -> LocalTokenizer:
        tok = self._loaded.get(model)
        if tok is None:
            raise RuntimeError(f"renderer for model {model} is not initialized")
        return tok

    async def InitializeTokenizer(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await self._enter("InitializeTokenizer", request)
        directory = self._known.get(request.model_name)
        if directory is None or self.mode == "fail":
            return tokenizer_pb2.InitializeTokenizerResponse(
                success=False,
                error_message=f"Failed to initialize renderer for model: {request.model_name}",
            )
        self._loaded[request.model_name] = load_tokenizer(directory)
        return tokenizer_pb2.InitializeTokenizerResponse(success=True)

    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._enter("Tokenize", request)
        try:
            tok = self._tokenizer(request.model_name)
            encoding = tok.backend.encode(
                request.input, add_special_tokens=request.add_special_tokens
            )
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        offsets = [int(x) for pair in encoding.offsets for x in pair]
        return tokenizer_pb2.TokenizeResponse(
            input_ids=encoding.ids, offset_pairs=offsets, success=True
        )

    async def RenderCompletion(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await self._enter("RenderCompletion", request)
        if self.mode == "fail":
            return tokenizer_pb2.RenderCompletionResponse(success=False, error_message="boom")
        try:
            ids = self._tokenizer(request.model_name).encode(request.prompt, True)
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        return tokenizer_pb2.RenderCompletionResponse(
            request_id="cmpl-double", token_ids=ids, success=True
        )

    async def RenderChatCompletion(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await self._enter("RenderChatCompletion", request)
        if self.mode == "fail":
            return tokenizer_pb2.RenderChatCompletionResponse(success=False, error_message="boom")
        try:
            body = MessageToDict(request, preserving_proto_field_name=True)
            messages = body.get("messages", [])
            for message in messages:
                if "content_parts" in message:
                    message["content"] = message.pop("content_parts")
                calls = message.pop("tool_calls_json", None)
                if calls:
                    message["tool_calls"] = json.loads(calls)
            tools = json.loads(body["tools_json"]) if body.get("tools_json") else None
            kwargs = (
                json.loads(body["chat_template_kwargs"]) if body.get("chat_template_kwargs") else {}
            )
            if request.chat_template:
                kwargs["chat_template"] = request.chat_template
            if request.continue_final_message:
                kwargs["continue_final_message"] = True
            add_generation_prompt = (
                request.add_generation_prompt if request.HasField("add_generation_prompt") else True
            )
            ids = self._tokenizer(request.model_name).apply_chat_template(
                messages, add_generation_prompt, tools, **kwargs
            )
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        return tokenizer_pb2.RenderChatCompletionResponse(
            request_id="chatcmpl-double", token_ids=ids, success=True
        )
