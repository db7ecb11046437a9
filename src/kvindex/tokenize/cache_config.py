"""Configuration of the segment tokenization cache."""

from __future__ import annotations

from dataclasses import dataclass

# Plain text is cut at the first cut point past every this many characters. The chunk that
# holds a text's end is tokenized anew when the next request extends the text, so the
# shorter the chunks, the less of a growing conversation is re-tokenized per turn (2048 made
# a chat template without added-token role markers re-tokenize up to 2 KB of past turns per
# request); the longer, the fewer LRU entries and lookups per long text (the prefix memo
# takes long shared prefixes whole either way). 256 sits in the flat part of that trade-off
# (benchmarks/RESULTS.md, "Tokenization: chunks of 256 characters").
DEFAULT_CHUNK_CHARS = 256


@dataclass(frozen=True, slots=True)
class TokenizationCacheConfig:
    """`enabled=False` tokenizes every request in full; `max_bytes` bounds the LRU by the
    approximate memory of its entries (segment text length + 8 bytes per cached id);
    `chunk_chars` is the length from which plain text is cut into chunks at proven cut points
    (only for the pre-tokenizers listed in docs/tokenization.md): short enough that a
    conversation's turns, where no added token separates them, land in chunks of their own
    (see `DEFAULT_CHUNK_CHARS`); `prefix_memo_bytes` bounds
    the prefix memo (prefix_memo.py; 0 turns it off), which keeps prefixes of at least
    `prefix_min_chars` characters."""

    enabled: bool = True
    max_bytes: int = 64 * 1024 * 1024
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    prefix_memo_bytes: int = 16 * 1024 * 1024
    prefix_min_chars: int = 1024

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.chunk_chars <= 0:
            raise ValueError(f"chunk_chars must be positive, got {self.chunk_chars}")
        if self.prefix_memo_bytes < 0:
            raise ValueError(f"prefix_memo_bytes must be >= 0, got {self.prefix_memo_bytes}")
        if self.prefix_min_chars <= 0:
            raise ValueError(f"prefix_min_chars must be positive, got {self.prefix_min_chars}")
