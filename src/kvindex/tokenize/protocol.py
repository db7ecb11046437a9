"""The interface every tokenizer backend offers (local files, engine-backed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """Turns a completion prompt or chat messages into the exact ids the engine (vLLM) sees.

    Completions: vLLM tokenizes the prompt with `add_special_tokens=True` (the tokenizer's
    post-processor adds BOS/EOS as configured). Chat: vLLM renders the chat template, then
    tokenizes the text with `add_special_tokens=False` (templates write their own BOS).
    """

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]: ...

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str: ...
