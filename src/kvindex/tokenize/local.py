"""Tokenizer backed by local files (tokenizer.json + transformers' side files)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from kvindex.tokenize.cache_config import TokenizationCacheConfig
from kvindex.tokenize.chat_template import (
    render_template,
    select_template,
    template_iterates_content,
)
from kvindex.tokenize.errors import TokenizationError, TokenizerLoadError
from kvindex.tokenize.locate import TokenizerFiles, locate_tokenizer_files
from kvindex.tokenize.messages import ContentFormat, normalize_messages
from kvindex.tokenize.segments import CacheStats, SegmentedEncoder
from kvindex.tokenize.settings import AddedTokenSpec, TokenizerSettings, read_settings

log = logging.getLogger(__name__)

# The `tokenizers` library's switch for its thread pool, read on every batch call.
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"


def default_to_calling_thread() -> bool:
    """For server processes: have `tokenizers` encode on the calling thread, unless the
    operator set TOKENIZERS_PARALLELISM. Otherwise every batch call, even of one or two
    texts (the new parts of a prompt), is handed to a thread pool of one thread per core of
    the node, whose threads wake, spin and sleep: ~25% more CPU for a two-text batch, on a
    router whose cores are busy with requests (docs/tokenization.md, "Threads"). Returns
    whether it chose (and logs it)."""
    if PARALLELISM_ENV in os.environ:
        return False
    os.environ[PARALLELISM_ENV] = "false"
    log.info(
        "tokenizers encode on the calling thread (%s=false; set it to use its pool)",
        PARALLELISM_ENV,
    )
    return True


def _added_token(spec: AddedTokenSpec) -> AddedToken:
    normalized = (not spec.special) if spec.normalized is None else spec.normalized
    return AddedToken(
        spec.content,
        single_word=spec.single_word,
        lstrip=spec.lstrip,
        rstrip=spec.rstrip,
        normalized=normalized,
        special=spec.special,
    )


def _apply_settings(tok: HFTokenizer, settings: TokenizerSettings) -> None:
    """What transformers' TokenizersBackend does to the backend tokenizer at load time."""
    # Per-call defaults (no truncation, no padding) are what vLLM's calls use.
    tok.no_truncation()
    tok.no_padding()
    # Tokens named in the config but absent from the added vocabulary are added (as added
    # tokens even when the base vocabulary has them: they then split the text).
    present = {t.content for t in tok.get_added_tokens_decoder().values()}
    to_add: list[AddedTokenSpec] = [
        t for _, t in sorted(settings.added_tokens_decoder.items()) if t.content not in present
    ]
    named = {t.content for t in settings.special_tokens.values()}
    for token in (*settings.special_tokens.values(), *settings.extra_special_tokens):
        if token.content not in present and all(token.content != t.content for t in to_add):
            to_add.append(token)
    for token in to_add:
        if token.content in named and not token.special:
            token = AddedTokenSpec(**{**_fields(token), "special": True})
        if token.special:
            tok.add_special_tokens([_added_token(token)])
        else:
            tok.add_tokens([_added_token(token)])
    # BOS/EOS come from tokenizer.json's post-processor alone: transformers 5 drops the
    # config's add_bos_token/add_eos_token whenever tokenizer.json exists (and a missing
    # post-processor becomes "$A", i.e. ids unchanged).


def _fields(token: AddedTokenSpec) -> dict[str, Any]:
    return {
        "content": token.content,
        "special": token.special,
        "lstrip": token.lstrip,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "normalized": token.normalized,
    }


class LocalTokenizer:
    """Exact vLLM/transformers ids from local files; see docs/tokenization.md."""

    def __init__(
        self,
        files: TokenizerFiles,
        *,
        cache: TokenizationCacheConfig | None = None,
    ) -> None:
        self.files = files
        where = str(files.tokenizer_json)
        try:
            self._tok = HFTokenizer.from_file(where)
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise TokenizerLoadError(
                f"tokenizer spec {files.spec!r}: {where} is not a valid tokenizers file "
                f"({exc}). Re-save it with tokenizers or transformers."
            ) from exc
        self.settings = read_settings(files)
        _apply_settings(self._tok, self.settings)
        self._special_strings = self.settings.special_token_strings()
        self.cache_config = cache or TokenizationCacheConfig()
        self._segments = (
            SegmentedEncoder(self._tok, self.cache_config) if self.cache_config.enabled else None
        )
        self._content_formats: dict[str, ContentFormat] = {}

    # --- introspection ---------------------------------------------------------------------
    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    @property
    def special_tokens(self) -> Mapping[str, str]:
        return dict(self._special_strings)

    @property
    def cache_exact(self) -> bool:
        """False when the cache falls back to whole-text tokenization for this tokenizer."""
        return self._segments is not None and self._segments.exact

    @property
    def cache_fallback_reason(self) -> str | None:
        if self._segments is None:
            return "cache disabled"
        return self._segments.unsafe_reason

    def cache_stats(self) -> CacheStats:
        if self._segments is None:
            return CacheStats()
        with self._segments.lru._lock:
            stats = self._segments.lru.stats
            out = CacheStats(**{f: getattr(stats, f) for f in stats.__slots__})
        memo = self._segments.memo
        if memo is not None:
            out.prefix_hits, out.prefix_entries, out.prefix_bytes = (
                memo.hits,
                memo.entries,
                memo.bytes,
            )
        return out

    def chat_template_source(
        self, name_or_source: str | None = None, *, has_tools: bool = False
    ) -> str:
        """The template a chat request would use (for diagnostics)."""
        return select_template(
            self.settings.chat_template, name_or_source=name_or_source, has_tools=has_tools
        )

    # --- Tokenizer protocol ----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizationError(f"a prompt must be a string, got {type(text).__name__}")
        if self._segments is not None:
            return self._segments.encode(text, add_special_tokens)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text vLLM renders for a chat request. Extra keywords are template
        variables (vLLM's chat_template_kwargs), except `chat_template` (a template name or
        source), `documents` and `continue_final_message`, which mean what they mean in
        transformers' apply_chat_template (and, for apply_chat_template, vLLM's
        `add_special_tokens`)."""
        kwargs = dict(template_kwargs)
        name_or_source = kwargs.pop("chat_template", None)
        documents = kwargs.pop("documents", None)
        continue_final = kwargs.pop("continue_final_message", False)
        source = self.chat_template_source(name_or_source, has_tools=tools is not None)
        fmt = self._content_formats.get(source)
        if fmt is None:
            fmt = "openai" if template_iterates_content(source) else "string"
            self._content_formats[source] = fmt
        return render_template(
            source,
            normalize_messages(messages, fmt),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            special_tokens=self._special_strings,
            continue_final_message=continue_final,
            **kwargs,
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        kwargs = dict(template_kwargs)
        # vLLM's chat request field: the rendered text is tokenized with it (default False,
        # since templates write their own BOS).
        add_special_tokens = bool(kwargs.pop("add_special_tokens", False))
        text = self.render_chat(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(text, add_special_tokens=add_special_tokens)


def load_tokenizer(
    spec: str | Path, *, cache: TokenizationCacheConfig | None = None
) -> LocalTokenizer:
    """Load a tokenizer from a tokenizer.json file, a model directory, a model in the Hugging
    Face cache (`ORG/NAME[@REVISION]`), or the hub when it is reachable. `cache=None` uses the
    default segment cache; pass `TokenizationCacheConfig(enabled=False)` to turn it off."""
    return LocalTokenizer(locate_tokenizer_files(spec), cache=cache)
