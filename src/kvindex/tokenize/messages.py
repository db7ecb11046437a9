"""Chat messages normalised the way vLLM's OpenAI server does before it renders a template
(vllm/entrypoints/chat_utils, text-only models):

- `content` may be a string, None, or a list of parts; text parts are `{"type": "text",
  "text": ...}` (also `input_text`, refusals, and bare strings). For templates that take
  content as a string, the texts are joined with "\n" (None -> ""); for templates that loop
  over content ("openai" format), content is a list of `{"type": "text", "text": ...}` parts
  (a string becomes one part), except tool messages, whose all-text parts are joined into a
  string. Image/audio/video parts need the engine's multimodal processor and are refused.
- System text parts that start with Claude Code's `x-anthropic-billing-header` lose that line.
- Only the fields vLLM forwards are kept: role, content, name, task; assistant tool_calls and
  `reasoning` (also exposed as `reasoning_content`); tool tool_call_id; developer tools.
- Assistant tool calls: an empty list is dropped; `function.arguments` given as a JSON string
  is parsed into an object; missing, empty, malformed or non-object arguments become {}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kvindex.tokenize.errors import ChatTemplateError

ContentFormat = Literal["string", "openai"]
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
_BILLING_HEADER = "x-anthropic-billing-header"


def _part_text(part: Any, index: int, role: str) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, Mapping):
        kind = part.get("type")
        if kind in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
            return str(part["text"])
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            return str(part["refusal"])
        raise ChatTemplateError(
            f"{role} message content part {index} has type {kind!r}; only text parts can be "
            "tokenized locally (multimodal prompts need the engine: use EngineTokenizer)"
        )
    raise ChatTemplateError(f"{role} message content part {index} is not an object: {part!r}")


def _strip_billing_header(texts: list[str]) -> list[str]:
    out: list[str] = []
    for text in texts:
        if text.startswith(_BILLING_HEADER):
            rest = text.partition("\n")[2]
            if rest:
                out.append(rest)
        else:
            out.append(text)
    return out


def _content(value: Any, role: str, fmt: ContentFormat) -> Any:
    if value is None:
        texts: list[str] = []
    elif isinstance(value, str):
        texts = [value]
    elif isinstance(value, Sequence):
        texts = [_part_text(p, i, role) for i, p in enumerate(value)]
    else:
        raise ChatTemplateError(f"{role} message content must be a string or a list of parts")
    if role == "system":
        texts = _strip_billing_header(texts)
    if fmt == "openai" and role != "tool":
        return [{"type": "text", "text": t} for t in texts]
    return "\n".join(texts)


def _arguments(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}  # vLLM coerces malformed history so the conversation can go on
    return dict(value) if isinstance(value, Mapping) else {}


def _tool_calls(value: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for call in value:
        if not isinstance(call, Mapping):
            raise ChatTemplateError("assistant tool_calls entries must be objects")
        function = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(function, Mapping):
            raise ChatTemplateError("assistant tool_calls must be of type 'function'")
        function = {**function, "arguments": _arguments(function.get("arguments"))}
        out.append({**call, "function": function})
    return out


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], fmt: ContentFormat
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} is not an object: {message!r}")
        role = message.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"message {i} has no string 'role'")
        item: dict[str, Any] = {
            "role": role,
            "content": _content(message.get("content"), role, fmt),
        }
        if role == "assistant":
            calls = message.get("tool_calls")
            if isinstance(calls, list) and calls:
                item["tool_calls"] = _tool_calls(calls)
            elif calls is not None and not isinstance(calls, list):
                item["tool_calls"] = calls
            if message.get("reasoning") is not None:
                item["reasoning"] = message["reasoning"]
                item["reasoning_content"] = message["reasoning"]
        elif role == "tool" and "tool_call_id" in message:
            item["tool_call_id"] = message["tool_call_id"]
        for key in ("name", "task"):
            if isinstance(message.get(key), str):
                item[key] = message[key]
        if role == "developer":
            item["tools"] = message.get("tools")
        out.append(item)
    return out
