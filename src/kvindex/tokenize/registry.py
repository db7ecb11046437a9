"""Several models at once: model name -> tokenizer spec, LoRA adapters -> their base model."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from kvindex.tokenize.cache_config import TokenizationCacheConfig
from kvindex.tokenize.errors import TokenizerLoadError, UnknownModelError
from kvindex.tokenize.local import load_tokenizer
from kvindex.tokenize.protocol import Tokenizer

Loader = Callable[..., Tokenizer]


def parse_tokenizer_flags(flags: Iterable[str]) -> dict[str, str]:
    """`["MODEL=PATH_OR_ID", ...]` (the repeated --tokenizer flag) -> {model: spec}. The first
    "=" separates; model names and specs must be non-empty and models unique."""
    out: dict[str, str] = {}
    for flag in flags:
        name, sep, spec = flag.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec:
            raise ValueError(
                f"bad tokenizer flag {flag!r}: expected MODEL=PATH_OR_HUB_ID, e.g. "
                "--tokenizer meta-llama/Llama-3.1-8B-Instruct=/models/llama31"
            )
        if name in out:
            raise ValueError(f"model {name!r} is given two tokenizers ({out[name]!r}, {spec!r})")
        out[name] = spec
    return out


class TokenizerRegistry:
    """Resolves a request's model (or LoRA adapter) to its tokenizer; loads each spec once,
    lazily or all at once with `preload()`."""

    def __init__(
        self,
        specs: Mapping[str, str | Path],
        lora_to_base: Mapping[str, str] | None = None,
        *,
        cache: TokenizationCacheConfig | None = None,
        loader: Loader | None = None,
    ) -> None:
        self._specs = dict(specs)
        self._lora = dict(lora_to_base or {})
        for adapter, base in self._lora.items():
            if base not in self._specs:
                raise TokenizerLoadError(
                    f"LoRA adapter {adapter!r} maps to base model {base!r}, which has no "
                    f"tokenizer; configured models: {', '.join(sorted(self._specs)) or '(none)'}"
                )
        self._cache = cache
        self._loader: Loader = loader or load_tokenizer
        self._loaded: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted(self._specs))

    @property
    def adapters(self) -> Mapping[str, str]:
        return dict(self._lora)

    def resolve(self, model: str) -> str:
        if model in self._specs:
            return model
        base = self._lora.get(model)
        if base is not None:
            return base
        raise UnknownModelError(model, [*self._specs, *self._lora])

    def _load(self, base: str) -> Tokenizer:
        spec = self._specs[base]
        try:
            return self._loader(spec, cache=self._cache)
        except TokenizerLoadError as exc:
            raise TokenizerLoadError(f"model {base!r}: {exc}") from exc

    def get(self, model: str) -> Tokenizer:
        base = self.resolve(model)
        tok = self._loaded.get(base)
        if tok is not None:
            return tok
        with self._lock:
            tok = self._loaded.get(base)
            if tok is None:
                tok = self._load(base)
                self._loaded[base] = tok
            return tok

    def preload(self) -> None:
        """Load every configured tokenizer now; raise one TokenizerLoadError naming each
        model that failed and why."""
        failures: list[str] = []
        for base in self.models:
            try:
                self.get(base)
            except TokenizerLoadError as exc:
                failures.append(str(exc))
        if failures:
            raise TokenizerLoadError(
                f"{len(failures)} of {len(self._specs)} tokenizers failed to load:\n  "
                + "\n  ".join(failures)
            )
