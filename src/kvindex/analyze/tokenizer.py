"""The tokenizer the request-log reader needs, behind the same protocol as
``kvindex.tokenize.Tokenizer`` (a teammate's package, not merged yet). Until it is, a
tokenizer.json loaded with ``tokenizers.Tokenizer.from_file`` serves, and chat messages are
joined in one simple documented format; at merge, :func:`load_tokenizer` becomes a call into
``kvindex.tokenize`` (one line)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = ["FileTokenizer", "TextTokenizer", "join_messages", "load_tokenizer"]


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]: ...


def join_messages(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The fallback chat format: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``
    when a generation prompt is asked for. Content given as a list of parts keeps its text
    parts. Good enough for prefix analysis: equal conversations give equal prefixes."""
    out: list[str] = []
    for message in messages:
        role = str(message.get("role", "user"))
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict)
            )
        out.append(f"<|{role}|>\n{content}\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


class FileTokenizer:
    """A Hugging Face tokenizer.json, with :func:`join_messages` as its chat template."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        return self.encode(join_messages(messages, add_generation_prompt))


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer for ``--tokenizer PATH`` (a tokenizer.json file, or a directory with
    one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no tokenizer.json there")
    return FileTokenizer(p)
