"""llm-d's tokenizer sidecar as a tokenizer backend (async, gRPC over a Unix socket).

llm-d deploys a tokenizer container beside its picker (llm-d-kv-cache's
`services/uds_tokenizer`, which renders with vLLM's own `OpenAIServingRender`) and talks to
it over gRPC on a Unix domain socket, `/tmp/tokenizer/tokenizer-uds.socket` by default, service
`tokenization.TokenizationService` (proto/tokenization/tokenizer.proto, wire-compatible with
llm-d-kv-cache's api/tokenizerpb/tokenizer.proto). Calls, as llm-d-kv-cache's Go client
(pkg/tokenization/uds_tokenizer.go) makes them:

- `InitializeTokenizer{model_name}` once per model before anything else (llm-d retries it
  5 times, 1 s, 2 s, 3 s, 4 s apart, while the sidecar starts);
- a completion prompt: `RenderCompletion{model_name, prompt}` (vLLM's completion render, so
  special tokens are added as vLLM adds them); with `add_special_tokens=False`, which llm-d
  never asks, `Tokenize{input, model_name, add_special_tokens}`;
- chat messages: `RenderChatCompletion{model_name, messages, tools_json, chat_template,
  add_generation_prompt, continue_final_message, chat_template_kwargs (JSON)}`.

`model_name` is the served model name, or the path `modelTokenizerMap` maps it to (a
`tokenizer.json` path is sent as its directory). A failed call is a gRPC status (the sidecar
aborts with INTERNAL and the message) or `success=false` with `error_message`.
See docs/tokenization.md, "llm-d's tokenizer sidecar"."""

from __future__ import annotations

import asyncio
import json
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from kvindex._proto.tokenization import tokenizer_pb2, tokenizer_pb2_grpc
from kvindex.tokenize.cache_config import TokenizationCacheConfig
from kvindex.tokenize.errors import ChatTemplateError, TokenizationError, TokenizerLoadError
from kvindex.tokenize.result_cache import ResultCache
from kvindex.tokenize.segments import CacheStats

DEFAULT_SOCKET_FILE = "/tmp/tokenizer/tokenizer-uds.socket"  # llm-d's default and the guides'
DEFAULT_TIMEOUT_S = 5.0  # llm-d's per-request timeout
DEFAULT_MULTIMODAL_TIMEOUT_S = 30.0  # llm-d's, for requests with image parts
_INIT_ATTEMPTS = 5
_INIT_BACKOFF_S = 1.0  # attempt i waits i * backoff first, as llm-d
_MAX_MESSAGE = 100 * 1024 * 1024  # llm-d's send/receive limits
_FORWARDED_KWARGS = ("chat_template", "continue_final_message", "documents", "add_special_tokens")
_PART_TEXT_TYPES = ("text", "input_text")


class TokenizerUnavailableError(TokenizationError):
    """The tokenizer sidecar cannot be reached: no socket, connection refused, or no answer
    within the timeout."""


@dataclass(frozen=True, slots=True)
class UdsTokenizerConfig:
    """llm-d's `UdsTokenizerConfig` (`udsTokenizerConfig` of token-producer / tokenizer,
    `tokenizersPoolConfig.uds` of precise-prefix-cache-scorer): `socketFile` (or host:port
    with `useTCP`, llm-d's test-only mode) and `modelTokenizerMap` (model -> the path the
    sidecar loads it from)."""

    socket_file: str = DEFAULT_SOCKET_FILE
    use_tcp: bool = False
    model_tokenizer_map: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> UdsTokenizerConfig:
        """Parse the YAML mapping; ValueError names a bad or unknown entry."""
        unknown = sorted(set(raw) - {"socketFile", "useTCP", "modelTokenizerMap"})
        if unknown:
            raise ValueError(
                f"unknown entries {unknown} (known: socketFile, useTCP, modelTokenizerMap)"
            )
        socket_file = raw.get("socketFile") or DEFAULT_SOCKET_FILE
        use_tcp = raw.get("useTCP", False)
        mapping = raw.get("modelTokenizerMap") or {}
        if not isinstance(socket_file, str):
            raise ValueError("socketFile must be a path")
        if not isinstance(use_tcp, bool):
            raise ValueError("useTCP must be true or false")
        if not isinstance(mapping, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            raise ValueError("modelTokenizerMap must map model names to paths")
        return cls(socket_file, use_tcp, dict(mapping))

    @property
    def target(self) -> str:
        """The gRPC target: `unix:PATH` (an absolute path gives `unix:///...`), or host:port."""
        return self.socket_file if self.use_tcp else f"unix:{self.socket_file}"

    def sidecar_model(self, model: str) -> str:
        """What the sidecar is asked to load for `model` (llm-d's resolution)."""
        if not self.model_tokenizer_map:
            return model
        path = self.model_tokenizer_map.get(model)
        if path is None:
            raise TokenizerLoadError(
                f"modelTokenizerMap has no entry for model {model!r} (entries: "
                f"{', '.join(sorted(self.model_tokenizer_map))})"
            )
        if PurePath(path).name == "tokenizer.json":
            return str(PurePath(path).parent)
        return path


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "kvindex_tokenizer_sidecar_requests",
            "Calls to llm-d's tokenizer sidecar, by model, RPC and outcome (ok, unavailable, "
            "timeout, error).",
            ["model", "rpc", "outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "kvindex_tokenizer_sidecar_request_seconds",
            "Latency of successful calls to llm-d's tokenizer sidecar.",
            ["model", "rpc"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def _metrics(registry: CollectorRegistry | None) -> _Metrics:
    """One set per registry (several tokenizers may share the picker's registry)."""
    if registry is None:
        return _Metrics(None)
    found = _METRICS.get(registry)
    if found is None:
        found = _METRICS[registry] = _Metrics(registry)
    return found


class UdsTokenizer:
    """Token ids for one model from llm-d's tokenizer sidecar. `await start()` first (it
    loads the model in the sidecar, retrying while the sidecar starts); then `encode` and
    `apply_chat_template` are coroutines with the `Tokenizer` protocol's arguments. Errors
    are `TokenizationError`s: `TokenizerUnavailableError` (no socket, refused, timeout),
    `TokenizerLoadError` (the sidecar cannot load the model), `ChatTemplateError`."""

    def __init__(
        self,
        model: str,
        config: UdsTokenizerConfig | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        multimodal_timeout_s: float = DEFAULT_MULTIMODAL_TIMEOUT_S,
        init_attempts: int | None = None,
        init_backoff_s: float | None = None,
        cache: TokenizationCacheConfig | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if timeout_s <= 0 or multimodal_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        # None: llm-d's retry schedule (module constants, read now so tests may shorten it)
        init_attempts = _INIT_ATTEMPTS if init_attempts is None else init_attempts
        init_backoff_s = _INIT_BACKOFF_S if init_backoff_s is None else init_backoff_s
        if init_attempts < 1:
            raise ValueError("init_attempts must be >= 1")
        self.model = model
        self.config = config or UdsTokenizerConfig()
        self.sidecar_model = self.config.sidecar_model(model)
        self.timeout_s = timeout_s
        self.multimodal_timeout_s = multimodal_timeout_s
        self._init_attempts = init_attempts
        self._init_backoff_s = init_backoff_s
        self._cache = ResultCache(cache)
        self._metrics = _metrics(registry)
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None  # tokenizer_pb2_grpc.TokenizationServiceStub (untyped)
        self.failures = 0

    def __repr__(self) -> str:
        return f"UdsTokenizer({self.model!r} at {self.config.target})"

    @property
    def where(self) -> str:
        return f"llm-d's tokenizer sidecar at {self.config.target}"

    async def __aenter__(self) -> UdsTokenizer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the channel and load the model in the sidecar (`InitializeTokenizer`),
        retried as llm-d retries it. Raises TokenizerUnavailableError / TokenizerLoadError."""
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.config.target,
                options=[
                    ("grpc.max_send_message_length", _MAX_MESSAGE),
                    ("grpc.max_receive_message_length", _MAX_MESSAGE),
                    # A local socket: retry connecting quickly once the sidecar is back
                    # (gRPC's default backoff grows to two minutes of fast failures).
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ],
            )
            self._stub = tokenizer_pb2_grpc.TokenizationServiceStub(self._channel)  # type: ignore[no-untyped-call]
        request = tokenizer_pb2.InitializeTokenizerRequest(
            model_name=self.sidecar_model, enable_thinking=False, add_generation_prompt=True
        )
        last: TokenizationError | None = None
        for attempt in range(self._init_attempts):
            if attempt:
                await asyncio.sleep(attempt * self._init_backoff_s)
            if not self.config.use_tcp and not os.path.exists(self.config.socket_file):
                last = self._no_socket()
                continue
            try:
                response = await self._call("InitializeTokenizer", request, self.timeout_s)
            except TokenizationError as exc:
                last = exc
                continue
            if response.success:
                return
            last = TokenizerLoadError(
                f"{self.where} could not load model {self.sidecar_model!r}: "
                f"{response.error_message or '(no message)'}"
            )
        assert last is not None
        raise type(last)(f"{last} (after {self._init_attempts} attempts)") from last

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None

    def cache_stats(self) -> CacheStats:
        return self._cache.stats()

    # --- the Tokenizer calls ----------------------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        async def fetch() -> list[int]:
            if add_special_tokens:
                render = tokenizer_pb2.RenderCompletionRequest(
                    model_name=self.sidecar_model, prompt=text
                )
                answer = await self._call("RenderCompletion", render, self.timeout_s)
                return self._ids(
                    "RenderCompletion", answer.success, answer.error_message, answer.token_ids
                )
            tokenize = tokenizer_pb2.TokenizeRequest(
                input=text, model_name=self.sidecar_model, add_special_tokens=False
            )
            result = await self._call("Tokenize", tokenize, self.timeout_s)
            return self._ids("Tokenize", result.success, result.error_message, result.input_ids)

        return await self._cache.get_or(["encode", text, add_special_tokens], fetch)

    async def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        kwargs = dict(template_kwargs)
        forwarded = {k: kwargs.pop(k) for k in _FORWARDED_KWARGS if k in kwargs}
        if forwarded.get("documents"):
            raise TokenizationError(
                f"{self.where}: documents cannot be sent (the sidecar protocol has no field "
                "for them); configure a local tokenizer for this model"
            )
        if forwarded.get("add_special_tokens"):
            raise TokenizationError(
                f"{self.where}: add_special_tokens=true cannot be sent for a chat (the sidecar "
                "protocol has no field for it)"
            )
        chat_template = forwarded.get("chat_template") or ""
        if not isinstance(chat_template, str):
            raise ChatTemplateError(f"chat_template must be a string, got {chat_template!r}")
        pb_messages, multimodal = _messages(messages)
        request = tokenizer_pb2.RenderChatCompletionRequest(
            model_name=self.sidecar_model,
            messages=pb_messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=bool(forwarded.get("continue_final_message", False)),
        )
        if tools is not None:
            request.tools_json = _json([dict(t) for t in tools], "tools")
        if kwargs:
            request.chat_template_kwargs = _json(kwargs, "chat_template_kwargs")
        timeout = self.multimodal_timeout_s if multimodal else self.timeout_s

        async def fetch() -> list[int]:
            answer = await self._call("RenderChatCompletion", request, timeout)
            return self._ids(
                "RenderChatCompletion", answer.success, answer.error_message, answer.token_ids
            )

        key = ["chat", request.SerializeToString(deterministic=True).hex()]
        return await self._cache.get_or(key, fetch)

    # --- transport ----------------------------------------------------------------------------

    async def _call(self, rpc: str, request: Any, timeout: float) -> Any:
        if self._stub is None:
            raise TokenizationError(f"{self!r} was not started (await start() first)")
        started = time.perf_counter()
        try:
            response = await getattr(self._stub, rpc)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            error = self._rpc_error(rpc, exc, timeout)
            outcome = (
                "unavailable"
                if isinstance(error, TokenizerUnavailableError)
                and exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED
                else "timeout"
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                else "error"
            )
            self._count(rpc, outcome)
            raise error from exc
        self._metrics.seconds.labels(self.model, rpc).observe(time.perf_counter() - started)
        return response

    def _count(self, rpc: str, outcome: str) -> None:
        self.failures += 1
        self._metrics.requests.labels(self.model, rpc, outcome).inc()

    def _ids(self, rpc: str, success: bool, message: str, ids: Sequence[int]) -> list[int]:
        if not success:
            self._count(rpc, "error")
            cls = ChatTemplateError if "template" in message.lower() else TokenizationError
            raise cls(f"{self.where}: {rpc} for model {self.sidecar_model!r} failed: {message}")
        self._metrics.requests.labels(self.model, rpc, "ok").inc()
        return list(ids)

    def _no_socket(self) -> TokenizerUnavailableError:
        return TokenizerUnavailableError(
            f"{self.where}: socket {self.config.socket_file} does not exist; is the tokenizer "
            "sidecar running, and is its socket directory (an emptyDir) mounted in both "
            "containers?"
        )

    def _rpc_error(self, rpc: str, exc: grpc.aio.AioRpcError, timeout: float) -> TokenizationError:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TokenizerUnavailableError(
                f"{self.where}: {rpc} got no answer within {timeout:g}s"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            if not self.config.use_tcp and not os.path.exists(self.config.socket_file):
                return self._no_socket()
            return TokenizerUnavailableError(f"{self.where} is unavailable ({rpc}): {details}")
        cls = ChatTemplateError if "template" in details.lower() else TokenizationError
        return cls(f"{self.where}: {rpc} for model {self.sidecar_model!r} failed: {details}")


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ChatTemplateError(f"{what} cannot be sent as JSON: {exc}") from exc


def _messages(
    messages: Sequence[Mapping[str, Any]],
) -> tuple[list[tokenizer_pb2.ChatMessage], bool]:
    """The protocol's ChatMessage carries role, content (text or parts) and tool calls; other
    message fields (name, tool_call_id, reasoning) have no field and are not sent, as in
    llm-d's own client. Content parts it cannot carry are refused, never dropped."""
    out: list[tokenizer_pb2.ChatMessage] = []
    multimodal = False
    for i, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"message {i} has no role")
        pb = tokenizer_pb2.ChatMessage(role=role)
        content = message.get("content")
        if isinstance(content, str):
            pb.content = content
        elif isinstance(content, list):
            for part in content:
                pb.content_parts.append(_part(i, part))
                multimodal |= pb.content_parts[-1].type == "image_url"
        elif content is not None:
            raise ChatTemplateError(f"message {i}: content must be a string or a list of parts")
        tool_calls = message.get("tool_calls")
        if tool_calls:
            pb.tool_calls_json = _json(tool_calls, f"message {i} tool_calls")
        out.append(pb)
    return out, multimodal


def _part(i: int, part: Any) -> tokenizer_pb2.ContentPart:
    if isinstance(part, str):
        return tokenizer_pb2.ContentPart(type="text", text=part)
    if isinstance(part, Mapping):
        kind = part.get("type")
        if kind in _PART_TEXT_TYPES and isinstance(part.get("text"), str):
            return tokenizer_pb2.ContentPart(type=str(kind), text=part["text"])
        image = part.get("image_url")
        if kind == "image_url" and isinstance(image, Mapping) and isinstance(image.get("url"), str):
            return tokenizer_pb2.ContentPart(
                type="image_url", image_url=tokenizer_pb2.ImageUrl(url=image["url"])
            )
    raise ChatTemplateError(
        f"message {i}: content part {str(part)[:80]!r} cannot be sent to llm-d's tokenizer "
        "sidecar (its protocol carries text and image_url parts only)"
    )
