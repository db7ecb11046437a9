"""Errors raised by kvindex.tokenize; every message names what was tried and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable

from kvindex.errors import KVIndexError


class TokenizationError(KVIndexError):
    """Base class: the request could not be turned into token ids."""


class UnknownModelError(TokenizationError):
    """A request named a model that no configured tokenizer serves."""

    def __init__(self, model: str, configured: Iterable[str]) -> None:
        self.model = model
        self.configured = tuple(sorted(configured))
        names = ", ".join(self.configured) or "(none)"
        super().__init__(
            f"no tokenizer is configured for model {model!r}; configured models: {names}. "
            f"Add one with --tokenizer {model}=PATH_OR_HUB_ID, or map a LoRA adapter to its "
            "base model."
        )


class TokenizerLoadError(TokenizationError):
    """A tokenizer spec could not be loaded (missing files, bad JSON, hub unreachable)."""


class ChatTemplateError(TokenizationError):
    """The chat template is missing, does not compile, or raised while rendering."""
