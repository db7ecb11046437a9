"""The tokenizer the request-log reader needs: ``kvindex.tokenize`` (the router's exact ids,
chat rendered with the model's template). A tokenizer without a chat template (a bare
tokenizer.json) renders chat messages in one simple documented format instead, which is
enough for prefix analysis: equal conversations give equal prefixes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # kvindex.tokenize (jinja2, aiohttp) loads only when a tokenizer is loaded
    from kvindex.tokenize import Tokenizer

__all__ = ["JoinedChatTokenizer", "join_messages", "load_tokenizer"]


def join_messages(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The fallback chat format: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``
    when a generation prompt is asked for. Content given as a list of parts keeps its text
    parts. Good enough for prefix analysis: equal conversations give equal prefixes."""
    out: list[str] = []
    for message in messages:
        role = str(message.get("role", "user"))
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(
                str(part.get("text", "")) for part in content if isinstance(part, Mapping)
            )
        out.append(f"<|{role}|>\n{content}\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


class JoinedChatTokenizer:
    """A tokenizer without a chat template, with :func:`join_messages` standing in for it."""

    def __init__(self, inner: Tokenizer) -> None:
        self._inner = inner

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._inner.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        return self._inner.encode(join_messages(messages, add_generation_prompt))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer for ``--tokenizer SPEC`` (a tokenizer.json file, a model directory, or a
    model in the Hugging Face cache, as ``kvindex.tokenize`` loads them). Without a chat
    template, chat messages fall back to :func:`join_messages`."""
    from kvindex.tokenize import TokenizationError
    from kvindex.tokenize import load_tokenizer as load_model_tokenizer

    try:
        tokenizer = load_model_tokenizer(path)
    except TokenizationError as exc:
        raise FileNotFoundError(f"--tokenizer {path}: {exc}") from exc
    if not tokenizer.settings.chat_template:
        return JoinedChatTokenizer(tokenizer)
    return tokenizer
