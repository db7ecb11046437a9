"""The block index contract shared by every backend (memory, Redis).

The index knows nothing of tokens or wire formats: it holds which engine keeps which content
key in which tier, plus each engine's own block hashes so that removals (which name only
engine hashes) resolve. Semantics are set-like and idempotent: storing a block an engine
already holds (vLLM re-announces prefix-cache hits) changes nothing; removing a block it does
not hold changes nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from kvindex.keys import ContentKey
from kvindex.wire import EngineHash, Medium

__all__ = [
    "MAX_COPIES",
    "BlockIndex",
    "Clear",
    "IndexOp",
    "IndexStats",
    "PrefixMatch",
    "Remove",
    "Store",
    "StoredBlock",
    "Tier",
]


class Tier(IntEnum):
    """Cache tiers, best first (a block held in several tiers counts in the best one)."""

    GPU = 0
    CPU = 1
    STORAGE = 2

    @classmethod
    def from_medium(cls, medium: str | None) -> Tier:
        """Map a wire ``medium`` to a tier; unknown media raise KeyError."""
        if medium is None:
            return cls.GPU
        return _MEDIUM_TO_TIER[medium.upper()]


_MEDIUM_TO_TIER = {Medium.GPU: Tier.GPU, Medium.CPU: Tier.CPU, Medium.STORAGE: Tier.STORAGE}


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """One engine block: its engine hash and the canonical content keys it covers (one key
    when the engine's block size equals ours, several when it is a multiple)."""

    engine_hash: EngineHash
    keys: tuple[ContentKey, ...]


@dataclass(slots=True)
class PrefixMatch:
    """How much of a prompt's key chain one engine holds, from the first block on.

    ``blocks`` is the number of consecutive keys held in any tier; ``by_tier[t]`` how many of
    those the engine holds at best in tier ``t``."""

    blocks: int = 0
    by_tier: list[int] = field(default_factory=lambda: [0, 0, 0])

    def weighted(self, weights: Sequence[float]) -> float:
        return sum(n * w for n, w in zip(self.by_tier, weights, strict=False))


@dataclass(frozen=True, slots=True)
class IndexStats:
    keys: int  # distinct content keys held by at least one engine
    entries: int  # (key, engine, tier) entries
    engines: int
    evictions: int  # keys dropped by the capacity bound
    approx_bytes: int  # estimate of memory held by the index structures


# Physical copies of one engine block counted at most (docs/index.md, "Duplicates").
MAX_COPIES = 4


@dataclass(frozen=True, slots=True)
class Store:
    """The engine now holds these blocks in this tier. ``copies_from``: the blocks from this
    position on, when the engine already holds them (same engine hash, same keys), are more
    physical copies, so one BlockRemoved leaves the block held (counted up to MAX_COPIES, and
    only for a while: ``age_copies``; docs/index.md, "Duplicates"; backends that cannot count
    ignore it). None: storing a held block changes nothing but confirms it (re-announced
    hits, replays re-applied)."""

    tier: Tier
    blocks: Sequence[StoredBlock]
    copies_from: int | None = None


@dataclass(frozen=True, slots=True)
class Remove:
    """The engine no longer holds these blocks in this tier (unknown hashes: no-op)."""

    tier: Tier
    engine_hashes: Sequence[EngineHash]


@dataclass(frozen=True, slots=True)
class Clear:
    """Drop everything the engine holds, in one tier or (None) in all tiers."""

    tier: Tier | None = None


IndexOp = Store | Remove | Clear


class BlockIndex(Protocol):
    """What every backend implements. Calls are synchronous: the in-memory backend is pure,
    I/O backends (Redis) block the calling thread, so services run ingest on its own thread
    and may call lookups through a thread pool."""

    def apply(self, engine: str, ops: Sequence[IndexOp]) -> None:
        """Apply one engine's operations in order (one event batch: one call, so I/O
        backends can make it one round trip)."""
        ...

    def resolve(self, engine: str, engine_hash: EngineHash) -> ContentKey | None:
        """The last content key of an engine block the engine holds in any tier, or None."""
        ...

    def lookup(
        self, keys: Sequence[ContentKey], engines: Collection[str] | None = None
    ) -> dict[str, PrefixMatch]:
        """Longest consecutive prefix of ``keys`` each engine holds (only engines matching at
        least the first block; restricted to ``engines`` when given). Linear in len(keys)."""
        ...

    def purge(self, engine: str) -> None:
        """Forget the engine entirely (it left discovery)."""
        ...

    def engines(self) -> list[str]:
        """Engines that hold at least one block."""
        ...

    def stats(self) -> IndexStats: ...
