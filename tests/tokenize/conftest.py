"""Fixtures for the tokenize tests live in tok_fixtures (a uniquely named module, so tests can
import its templates without clashing with other conftest modules)."""

from tok_fixtures import load_cached, reference_tokenizers, tokenizer_dirs

__all__ = ["load_cached", "reference_tokenizers", "tokenizer_dirs"]
