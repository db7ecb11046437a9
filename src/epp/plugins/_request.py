"""What several plugins read from a request: its prompt text and (estimated) length."""

from __future__ import annotations

import json

from epp.types import LLMRequest

# llm-d's approximation where the request is not tokenized.
CHARS_PER_TOKEN = 4


def prompt_text(request: LLMRequest) -> str:
    """The text a prefix cache would see first: the completions prompt, else the chat
    messages (and tools) serialised in a stable form."""
    if request.prompt is not None:
        return request.prompt
    if request.messages is not None:
        parts: list[object] = [request.messages]
        if request.tools:
            parts.append(request.tools)
        return json.dumps(parts, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return ""


def prompt_tokens(request: LLMRequest) -> int:
    """Token count of the prompt: exact when tokenized, else characters / 4."""
    if request.token_ids is not None:
        return len(request.token_ids)
    return len(prompt_text(request)) // CHARS_PER_TOKEN
