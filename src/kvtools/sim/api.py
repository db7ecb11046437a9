"""Parsing of OpenAI/vLLM request bodies and building of response bodies (pure)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvindex.tokenize import Tokenizer
    from kvtools.sim.engine import KVCacheReportMode

DEFAULT_MAX_TOKENS = 16


class BadRequest(ValueError):
    """A request body we cannot serve; `reason` labels the metrics counter."""

    def __init__(self, message: str, reason: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.reason = reason
        self.param = param
        self.status = status


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass(frozen=True)
class ParsedRequest:
    model: str
    lora_name: str | None
    prompt_token_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    cache_salt: str | None
    # vllm_xargs.kv_cache_report_mode; None: the engine's default.
    kv_cache_report_mode: KVCacheReportMode | None = None


def _require_mapping(body: object) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise BadRequest("request body must be a JSON object", "bad_json")
    return body


def resolve_model(body: Mapping[str, Any], base_model: str, loras: Mapping[str, str]) -> str | None:
    """Returns the LoRA name or None for the base model; unknown models are a 404."""
    model = body.get("model", base_model)
    if model is None or model == base_model:
        return None
    if isinstance(model, str) and model in loras:
        return model
    raise BadRequest(f"The model `{model}` does not exist.", "unknown_model", "model", 404)


def _int_field(body: Mapping[str, Any], *names: str, default: int) -> int:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadRequest(f"{name} must be a non-negative integer", "bad_field", name)
        return value
    return default


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    )


def completion_prompt_tokens(body: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not _is_token_list(prompt):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if _is_token_list(prompt) and prompt:
        assert isinstance(prompt, list)
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise BadRequest("the simulator serves one prompt per request", "batch_prompt", "prompt")
    raise BadRequest(
        "prompt must be a non-empty string or a list of token ids", "bad_prompt", "prompt"
    )


def chat_prompt_tokens(body: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "bad_messages", "messages")
    if not all(isinstance(m, Mapping) for m in messages):
        raise BadRequest("every message must be an object", "bad_messages", "messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("tools must be a list", "bad_field", "tools")
    add_generation_prompt = body.get("add_generation_prompt", True)
    try:
        return tokenizer.apply_chat_template(messages, bool(add_generation_prompt), tools)
    except ValueError as exc:
        raise BadRequest(str(exc), "bad_messages", "messages") from None


def parse_generation(
    body_obj: object,
    *,
    chat: bool,
    base_model: str,
    loras: Mapping[str, str],
    tokenizer: Tokenizer,
) -> ParsedRequest:
    body = _require_mapping(body_obj)
    lora = resolve_model(body, base_model, loras)
    tokens = (
        chat_prompt_tokens(body, tokenizer) if chat else completion_prompt_tokens(body, tokenizer)
    )
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = _int_field(body, *names, default=DEFAULT_MAX_TOKENS)
    n = body.get("n", 1)
    if n not in (None, 1):
        raise BadRequest(
            "the simulator returns one choice per request (n must be 1)", "bad_field", "n"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "bad_field", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise BadRequest("stream_options must be an object", "bad_field", "stream_options")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise BadRequest("cache_salt must be a non-empty string", "bad_field", "cache_salt")
    xargs = body.get("vllm_xargs") or {}
    if not isinstance(xargs, Mapping):
        raise BadRequest("vllm_xargs must be an object", "bad_field", "vllm_xargs")
    report = xargs.get("kv_cache_report_mode")
    if report is not None and report not in ("incremental", "full"):
        raise BadRequest(
            "vllm_xargs.kv_cache_report_mode must be 'incremental' or 'full'",
            "bad_field",
            "vllm_xargs",
        )
    return ParsedRequest(
        model=lora or base_model,
        lora_name=lora,
        prompt_token_ids=tokens,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        cache_salt=salt,
        kv_cache_report_mode=report,
    )


def parse_tokenize(
    body_obj: object, base_model: str, loras: Mapping[str, str], tokenizer: Tokenizer
) -> list[int]:
    body = _require_mapping(body_obj)
    resolve_model(body, base_model, loras)
    if "messages" in body:
        return chat_prompt_tokens(body, tokenizer)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (or pass messages)", "bad_prompt", "prompt")
    return tokenizer.encode(prompt)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    rid: str, model: str, text: str, finish: str, use: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        ],
        "usage": use,
    }


def chat_body(rid: str, model: str, text: str, finish: str, use: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        ],
        "usage": use,
    }


def stream_chunk(
    rid: str, model: str, *, chat: bool, piece: str | None, finish: str | None, first: bool = False
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if piece is not None:
            delta["content"] = piece
        choice["delta"] = delta
    else:
        choice["text"] = piece or ""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(rid: str, model: str, *, chat: bool, use: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }


def models_body(base_model: str, loras: Mapping[str, str], max_model_len: int) -> dict[str, Any]:
    created = int(time.time())
    data: list[dict[str, Any]] = [
        {
            "id": base_model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": base_model,
            "parent": None,
            "max_model_len": max_model_len,
        }
    ]
    data.extend(
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": path,
            "parent": base_model,
            "max_model_len": max_model_len,
        }
        for name, path in sorted(loras.items())
    )
    return {"object": "list", "data": data}


def tokenize_body(tokens: Sequence[int], max_model_len: int) -> dict[str, Any]:
    return {
        "count": len(tokens),
        "max_model_len": max_model_len,
        "tokens": list(tokens),
        "token_strs": None,
    }
