"""Configuration of the segment tokenization cache."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenizationCacheConfig:
    """`enabled=False` tokenizes every request in full; `max_bytes` bounds the LRU by the
    approximate memory of its entries (segment text length + 8 bytes per cached id);
    `chunk_chars` is the length from which plain text is cut into chunks at proven cut points
    (only for the pre-tokenizers listed in docs/tokenization.md)."""

    enabled: bool = True
    max_bytes: int = 64 * 1024 * 1024
    chunk_chars: int = 2048

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.chunk_chars <= 0:
            raise ValueError(f"chunk_chars must be positive, got {self.chunk_chars}")
