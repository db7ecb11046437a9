"""The one tokenizer interface: what every caller that turns prompts into engine token ids
needs (the read API, the picker's remote mode, the simulator, the request-log reader)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """Turns a completion prompt or chat messages into the exact ids the engine (vLLM) sees.

    Completions: vLLM tokenizes the prompt with `add_special_tokens=True` (the tokenizer's
    post-processor adds BOS/EOS as configured). Chat: vLLM renders the chat template, then
    tokenizes the text with `add_special_tokens=False` (templates write their own BOS).

    Only these two calls are part of the interface; `LocalTokenizer` also takes template
    variables (`**template_kwargs`) and offers `render_chat`. `EngineTokenizer` has the same
    two calls as coroutines, so it does not fit this (synchronous) protocol.
    """

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]: ...
