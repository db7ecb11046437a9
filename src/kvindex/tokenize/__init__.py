"""Exact token ids for prompts and chat messages, as vLLM computes them, for several models,
with an exact segment cache for long shared prefixes. See docs/tokenization.md."""

from kvindex.tokenize.cache_config import TokenizationCacheConfig
from kvindex.tokenize.engine import EngineTokenizer
from kvindex.tokenize.errors import (
    ChatTemplateError,
    TokenizationError,
    TokenizerLoadError,
    UnknownModelError,
)
from kvindex.tokenize.local import LocalTokenizer, load_tokenizer
from kvindex.tokenize.protocol import Tokenizer
from kvindex.tokenize.registry import TokenizerRegistry, parse_tokenizer_flags
from kvindex.tokenize.segments import CacheStats
from kvindex.tokenize.uds import TokenizerUnavailableError, UdsTokenizer, UdsTokenizerConfig

__all__ = [
    "CacheStats",
    "ChatTemplateError",
    "EngineTokenizer",
    "LocalTokenizer",
    "TokenizationCacheConfig",
    "TokenizationError",
    "Tokenizer",
    "TokenizerLoadError",
    "TokenizerRegistry",
    "TokenizerUnavailableError",
    "UdsTokenizer",
    "UdsTokenizerConfig",
    "UnknownModelError",
    "load_tokenizer",
    "parse_tokenizer_flags",
]
