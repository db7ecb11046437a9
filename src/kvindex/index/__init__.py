"""Block index backends behind one contract (:class:`BlockIndex`), built by
:func:`make_index` (kvindex.index.factory)."""

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
from kvindex.index.factory import IndexConfig, IndexConfigError, make_index, wrap_index
from kvindex.index.locked import LockedIndex
from kvindex.index.memory import MemoryIndex, MemoryIndexConfig

__all__ = [
    "BlockIndex",
    "Clear",
    "IndexConfig",
    "IndexConfigError",
    "IndexOp",
    "IndexStats",
    "LockedIndex",
    "MemoryIndex",
    "MemoryIndexConfig",
    "PrefixMatch",
    "Remove",
    "Store",
    "StoredBlock",
    "Tier",
    "make_index",
    "wrap_index",
]
