"""A kvindex sidecar (`kvindex serve`) answering the precise scorer over gRPC
(`kvindex.v1.KVIndex`). With tokenizers configured in the picker, the prompt is tokenized
here and sent as token ids (which speculative entries need); otherwise the sidecar tokenizes
(ScorePrompt / ScoreChat). A slow or failed call scores nothing (counted) rather than delaying
the request past `timeoutMs`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from epp.plugins.precise_prefix import PrecisePrefixParams
from epp.precise.options import BackendOptions
from epp.types import LLMRequest
from kvindex._proto.kvindex.v1 import kvindex_pb2, kvindex_pb2_grpc
from kvindex.tokenize import TokenizerRegistry

log = logging.getLogger("epp.precise")


class RemoteIndex:
    """`PrefixIndexBackend` over a kvindex sidecar's gRPC API."""

    def __init__(
        self,
        params: PrecisePrefixParams,
        options: BackendOptions,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.params = params
        self.address = options.remote_address
        token = options.remote_token
        self._auth: tuple[tuple[str, str], ...] = (
            () if token is None else (("authorization", f"Bearer {token}"),)
        )
        self.timeout_s = options.remote_timeout_s
        self.tokenizers = (
            TokenizerRegistry(options.tokenizers, options.lora_to_base)
            if options.tokenizers
            else None
        )
        self.failures = Counter(
            "llm_d_epp_precise_remote_failures",
            "Calls to the kvindex sidecar that failed or timed out, by method and code.",
            ["method", "code"],
            registry=registry,
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self.tokenizers is not None:
            self.tokenizers.preload()
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = kvindex_pb2_grpc.KVIndexStub(self._channel)  # type: ignore[no-untyped-call]

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._channel is not None:
            await self._channel.close()

    def _tokens(self, request: LLMRequest) -> list[int] | None:
        if request.token_ids is not None or self.tokenizers is None:
            return request.token_ids
        model = request.base_model or request.model
        try:
            tokenizer = self.tokenizers.get(model)
            if request.messages is not None:
                ids = tokenizer.apply_chat_template(request.messages, tools=request.tools)
            else:
                ids = tokenizer.encode(request.prompt or "")
        except Exception as exc:  # unknown model / bad template: let the sidecar decide
            log.debug("local tokenization failed, the sidecar tokenizes: %s", exc)
            return None
        request.token_ids = list(ids)
        return request.token_ids

    async def score(self, request: LLMRequest, candidates: Sequence[str]) -> Mapping[str, float]:
        if self._stub is None:
            return {}
        model = request.base_model or request.model
        common: dict[str, Any] = {"model": model, "lora": request.lora or "", "engines": candidates}
        if request.cache_salt is not None:
            common["cache_salt"] = request.cache_salt
        tokens = self._tokens(request)
        if tokens is not None:
            method, call = "ScoreTokens", self._stub.ScoreTokens
            message: Any = kvindex_pb2.ScoreTokensRequest(token_ids=tokens, **common)
        elif request.messages is not None:
            method, call = "ScoreChat", self._stub.ScoreChat
            message = kvindex_pb2.ScoreChatRequest(
                messages=[
                    kvindex_pb2.ChatMessage(role=str(m.get("role", "")), content=_text(m))
                    for m in request.messages
                ],
                tools_json=json.dumps(request.tools) if request.tools else "",
                **common,
            )
        else:
            method, call = "ScorePrompt", self._stub.ScorePrompt
            message = kvindex_pb2.ScorePromptRequest(prompt=request.prompt or "", **common)
        try:
            reply = await call(message, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self.failures.labels(method, exc.code().name).inc()
            return {}
        return {s.engine: s.score for s in reply.scores}

    def record_pick(self, request: LLMRequest, endpoint_key: str) -> None:
        if self._stub is None or request.token_ids is None:
            return  # the sidecar tokenized: no ids to record (configure tokenizers here)
        message = kvindex_pb2.RecordSpeculativeRequest(
            engine=endpoint_key,
            model=request.base_model or request.model,
            token_ids=request.token_ids,
            lora=request.lora or "",
            **({"cache_salt": request.cache_salt} if request.cache_salt is not None else {}),
        )
        task = asyncio.ensure_future(self._record(message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record(self, message: Any) -> None:
        try:
            await self._stub.RecordSpeculative(
                message, timeout=self.timeout_s * 4, metadata=self._auth
            )
        except grpc.aio.AioRpcError as exc:
            self.failures.labels("RecordSpeculative", exc.code().name).inc()


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)
