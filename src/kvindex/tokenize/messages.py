"""Chat messages normalised the way vLLM's OpenAI server does before it renders a template
(vllm/entrypoints/chat_utils.py, text-only models):

- `content` may be a string, None, or a list of parts; text parts are `{"type": "text",
  "text": ...}` (also `input_text`, and bare strings). For templates that take content as a
  string, the texts are joined with "\\n" (None -> ""); for templates that loop over content
  ("openai" format), content becomes a list of `{"type": "text", "text": ...}` parts (a string
  becomes one part). Image/audio/video parts need the engine's multimodal processor and are
  refused here.
- Only the fields vLLM forwards are kept: role, content, name; tool_calls (assistant);
  tool_call_id (tool); reasoning / reasoning_content (assistant).
- Assistant tool calls whose `function.arguments` is a JSON string get it parsed into an object,
  as vLLM does for Hugging Face templates (they render arguments with tojson).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kvindex.tokenize.errors import ChatTemplateError

ContentFormat = Literal["string", "openai"]
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
_ASSISTANT_FIELDS = ("tool_calls", "reasoning", "reasoning_content")


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


def _content(value: Any, role: str, fmt: ContentFormat) -> Any:
    if value is None:
        texts: list[str] = []
    elif isinstance(value, str):
        texts = [value]
    elif isinstance(value, Sequence):
        texts = [_part_text(p, i, role) for i, p in enumerate(value)]
    else:
        raise ChatTemplateError(f"{role} message content must be a string or a list of parts")
    if fmt == "openai":
        return [{"type": "text", "text": t} for t in texts]
    return "\n".join(texts)


def _tool_calls(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for call in value:
        if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
            function = dict(call["function"])
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                try:
                    function["arguments"] = json.loads(arguments)
                except json.JSONDecodeError as exc:
                    raise ChatTemplateError(
                        f"tool call arguments are not valid JSON: {arguments[:80]!r}"
                    ) from exc
            call = {**call, "function": function}
        out.append(call)
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
            for key in _ASSISTANT_FIELDS:
                if message.get(key) is not None:
                    item[key] = message[key]
            if "tool_calls" in item:
                item["tool_calls"] = _tool_calls(item["tool_calls"])
        elif role == "tool" and message.get("tool_call_id") is not None:
            item["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            item["name"] = message["name"]
        out.append(item)
    return out
