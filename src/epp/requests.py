"""Turn an HTTP request (headers + buffered body) into an `LLMRequest`. Pure: no I/O.

One parser per API path (a handler table); every other path is passed through with a
headers-only view. JSON is decoded with msgspec (the reference EPP spends its CPU in JSON
parsing). Anything wrong with the body raises `ParseError` naming the problem, which the
ext_proc edge answers with HTTP 400; nothing else may escape `RequestParser.parse`.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from epp.errors import EPPError
from epp.objects import Objective, ObjectStore, session_key
from epp.types import LLMRequest

# The GIE convention: the request names an InferenceObjective; its priority decides
# whether the request is sheddable (negative priority) under saturation.
OBJECTIVE_HEADER = "x-gateway-inference-objective"
REQUEST_ID_HEADER = "x-request-id"

COMPLETIONS_PATH = "/v1/completions"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
ANTHROPIC_MESSAGES_PATH = "/v1/messages"

_json_decoder = msgspec.json.Decoder()


class ParseError(EPPError):
    """The request body is not a valid request for its path; `message` says what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelRegistry:
    """Maps a requested model name to (base model, LoRA adapter). Adapters come from the
    configured map and from what engines report (`vllm:lora_requests_info` together with the
    `model_name` label of the same endpoint). Thread-safe: the metrics scraper learns while
    the request path resolves."""

    def __init__(self, adapters: Mapping[str, str] | None = None) -> None:
        self._configured: dict[str, str] = dict(adapters or {})
        self._learned: dict[str, str] = {}
        self._lock = threading.Lock()

    def learn(self, adapter: str, base_model: str) -> None:
        """Record that an engine serving `base_model` runs or queues `adapter`."""
        if not adapter or adapter == base_model:
            return
        with self._lock:
            self._learned[adapter] = base_model

    def resolve(self, model: str) -> tuple[str, str | None]:
        base = self._configured.get(model)
        if base is None:
            with self._lock:
                base = self._learned.get(model)
        if base is None:
            return model, None
        return base, model

    def adapters(self) -> dict[str, str]:
        with self._lock:
            return {**self._learned, **self._configured}


def _require_object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ParseError(f"request body must be a JSON object, got {type(doc).__name__}")
    return doc


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParseError(f"field '{name}' must be a string")
    return value


def _required_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ParseError("field 'model' is required and must be a non-empty string")
    return model


def _optional_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ParseError(f"field '{name}' must be a boolean")
    return value


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParseError(f"field '{name}' must be an integer")
    return value


def _object_list(body: Mapping[str, Any], name: str, required: bool) -> list[dict[str, Any]] | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ParseError(f"field '{name}' is required and must be a list of objects")
        return None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ParseError(f"field '{name}' must be a list of objects")
    return value


class ParsedBody(msgspec.Struct, frozen=True):
    """The request fields one API's parser extracts (the rest of LLMRequest is common)."""

    model: str
    prompt: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    stream: bool = False
    max_tokens: int | None = None
    cache_salt: str | None = None


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def parse_completions(body: dict[str, Any]) -> ParsedBody:
    """OpenAI `/v1/completions`: prompt is a string, a list of strings, a token-id list or a
    list of token-id lists. A batch is scheduled by its first prompt (one destination)."""
    prompt = body.get("prompt")
    text: str | None = None
    token_ids: list[int] | None = None
    if isinstance(prompt, str):
        text = prompt
    elif _is_token_list(prompt) and prompt:
        token_ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        text = prompt[0]
    elif isinstance(prompt, list) and prompt and all(_is_token_list(p) for p in prompt):
        token_ids = list(prompt[0])
    else:
        raise ParseError(
            "field 'prompt' is required: a string, a list of strings, a list of token ids "
            "or a list of token-id lists (non-empty)"
        )
    return ParsedBody(
        model=_required_model(body),
        prompt=text,
        token_ids=token_ids,
        stream=_optional_bool(body, "stream"),
        max_tokens=_optional_int(body, "max_tokens"),
        cache_salt=_optional_str(body, "cache_salt"),
    )


def parse_chat_completions(body: dict[str, Any]) -> ParsedBody:
    """OpenAI `/v1/chat/completions`."""
    max_tokens = _optional_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens")
    return ParsedBody(
        model=_required_model(body),
        messages=_object_list(body, "messages", required=True),
        tools=_object_list(body, "tools", required=False),
        stream=_optional_bool(body, "stream"),
        max_tokens=max_tokens,
        cache_salt=_optional_str(body, "cache_salt"),
    )


def parse_anthropic_messages(body: dict[str, Any]) -> ParsedBody:
    """Anthropic `/v1/messages`: the top-level `system` (string or text blocks) becomes a
    leading system message so that chat templates see one OpenAI-shaped list."""
    messages = _object_list(body, "messages", required=True) or []
    system = body.get("system")
    if system is not None:
        if not isinstance(system, str) and not (
            isinstance(system, list) and all(isinstance(block, dict) for block in system)
        ):
            raise ParseError("field 'system' must be a string or a list of content blocks")
        messages = [{"role": "system", "content": system}, *messages]
    return ParsedBody(
        model=_required_model(body),
        messages=messages,
        tools=_object_list(body, "tools", required=False),
        stream=_optional_bool(body, "stream"),
        max_tokens=_optional_int(body, "max_tokens"),
    )


BODY_PARSERS: dict[str, Callable[[dict[str, Any]], ParsedBody]] = {
    COMPLETIONS_PATH: parse_completions,
    CHAT_COMPLETIONS_PATH: parse_chat_completions,
    ANTHROPIC_MESSAGES_PATH: parse_anthropic_messages,
}


def _strip_query(path: str) -> str:
    return path.split("?", 1)[0]


class RequestParser:
    """Builds LLMRequests. The InferenceObjective named in header
    `x-gateway-inference-objective` gives the priority (`objects`, an `ObjectStore` fed by the
    Kubernetes watch and the objects file; `objective_priorities`, the `--objective` flag, is
    its `flag` source); unknown names get priority 0 and are counted in `unknown_objectives`
    (and reported to `on_unknown_objective`). An InferenceModelRewrite matching the body's
    `model` rewrites it: the request, its base model / LoRA resolution and the body sent on
    (`raw_body`) carry the target, `requested_model` the name the client sent."""

    def __init__(
        self,
        registry: ModelRegistry | None = None,
        objective_priorities: Mapping[str, int] | None = None,
        objects: ObjectStore | None = None,
    ) -> None:
        self.registry = registry or ModelRegistry()
        self.objective_priorities = dict(objective_priorities or {})
        self.objects = objects or ObjectStore()
        if self.objective_priorities:
            self.objects.replace(
                "flag", [Objective(n, p) for n, p in self.objective_priorities.items()]
            )
        self.unknown_objectives = 0
        self.on_unknown_objective: Callable[[], None] | None = None

    def has_body_parser(self, path: str) -> bool:
        return _strip_query(path) in BODY_PARSERS

    def _priority(self, headers: Mapping[str, str]) -> int:
        objective = headers.get(OBJECTIVE_HEADER)
        if not objective:
            return 0
        found = self.objects.objective(objective)
        if found is None:
            self.unknown_objectives += 1
            if self.on_unknown_objective is not None:
                self.on_unknown_objective()
            return 0
        return found.priority

    def parse(
        self,
        headers: Mapping[str, str],
        body: bytes,
        subset_hint: frozenset[str] | None = None,
        body_available: bool = True,
    ) -> LLMRequest:
        """`headers` carry lower-case names including the pseudo-headers (`:path`).
        `body_available=False` (the proxy does not send bodies) gives a headers-only view."""
        path = headers.get(":path", "")
        request = LLMRequest(
            request_id=headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex,
            path=path,
            headers=headers,
            raw_body=body,
            priority=self._priority(headers),
            subset_hint=subset_hint,
        )
        parser = BODY_PARSERS.get(_strip_query(path))
        if parser is None or not body_available:
            return request  # pass-through: the decision uses headers only
        if not body:
            raise ParseError(f"{_strip_query(path)} needs a JSON request body")
        try:
            doc = _json_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ParseError(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ParseError("request body is nested too deeply") from None
        parsed = parser(_require_object(doc))
        model = parsed.model
        objects = self.objects
        decision = objects.rewrite(model, session_key(headers)) if objects.has_rewrites else None
        if decision is not None and decision.target != model:
            # The engine gets the target: rewrite the body it will receive.
            doc["model"] = model = decision.target
            request.raw_body = msgspec.json.encode(doc)
            request.requested_model = parsed.model
        base, lora = self.registry.resolve(model)
        request.model = model
        request.base_model = base
        request.lora = lora
        request.prompt = parsed.prompt
        request.token_ids = parsed.token_ids
        request.messages = parsed.messages
        request.tools = parsed.tools
        request.stream = parsed.stream
        request.max_tokens = parsed.max_tokens
        request.cache_salt = parsed.cache_salt
        request.body = doc
        return request
