"""Block index backends behind one contract (:class:`BlockIndex`)."""

from kvindex.index.base import (
    BlockIndex,
    Clear,
    IndexOp,
    IndexStats,
    PrefixMatch,
    Remove,
    Store,
    StoredBlock,
    Tier,
)
from kvindex.index.memory import MemoryIndex, MemoryIndexConfig

__all__ = [
    "BlockIndex",
    "Clear",
    "IndexOp",
    "IndexStats",
    "MemoryIndex",
    "MemoryIndexConfig",
    "PrefixMatch",
    "Remove",
    "Store",
    "StoredBlock",
    "Tier",
]
