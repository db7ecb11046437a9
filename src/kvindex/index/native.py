"""The native in-memory block index: :class:`MemoryIndex` semantics over the C core
``kvindex._native`` (flat open-addressing tables, interned holder bitmasks; docs/index.md).

Results equal :class:`MemoryIndex`'s for every operation sequence (tests/kvindex/
test_native_index.py runs both side by side under hypothesis), including its eviction order
(oldest stored first, per tier, the largest tier first). Differences, all documented:

* content keys must be ints in [0, 2**64) (what :func:`kvindex.keys.chain_keys` makes) and
  engine hashes int or bytes; anything else raises TypeError/OverflowError before the
  operation touches the index; a block must cover at least one key (ValueError);
* ``stats().approx_bytes`` is computed from the C tables' allocated sizes;
* ``memory_budget_bytes`` caps ``max_keys`` with the native per-entry cost.

Not thread-safe on its own (like MemoryIndex): :func:`kvindex.index.make_index` (backend
``memory`` or ``native``) wraps it in ``LockedIndex``, and falls back to MemoryIndex with a
warning when the extension is not built.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from kvindex.errors import EngineLimitError
from kvindex.index.base import (
    Clear,
    IndexOp,
    IndexStats,
    PrefixMatch,
    Remove,
    Store,
)
from kvindex.index.memory import MemoryIndexConfig, orphan_sweep_threshold
from kvindex.keys import ContentKey
from kvindex.wire import EngineHash

try:
    from kvindex import _native
except ImportError:  # built without a compiler: the pure-Python index serves instead
    _native = None  # type: ignore[assignment]

__all__ = ["NATIVE_AVAILABLE", "NATIVE_BYTES_PER_ENTRY", "NativeIndex"]

NATIVE_AVAILABLE = _native is not None

# Measured by benchmarks/native_index.py (bytes per (block, engine) entry, 1 holder per key,
# at 1M and 10M entries: the upper of the two); memory_budget_bytes divides by it.
NATIVE_BYTES_PER_ENTRY = 60


class NativeIndex:
    """:class:`kvindex.index.base.BlockIndex` over the C core. Raises RuntimeError when the
    extension was not built (:func:`kvindex.index.make_index` falls back instead)."""

    def __init__(self, config: MemoryIndexConfig | None = None) -> None:
        if _native is None:
            raise RuntimeError(
                "kvindex._native is not built (no C compiler at install time); "
                "reinstall with gcc and the Python headers, or use the python index"
            )
        self._config = config = config or MemoryIndexConfig()
        max_keys = config.effective_max_keys(NATIVE_BYTES_PER_ENTRY)
        max_entries = config.effective_max_entries(NATIVE_BYTES_PER_ENTRY)
        self._max_keys = max_keys
        self._core = _native.Core(
            max_keys,
            config.keep(max_keys),
            max_entries,
            config.keep(max_entries),
            orphan_sweep_threshold(max_keys),
        )
        # Engine names <-> slots as MemoryIndex assigns them (freed slots reused last-in
        # first-out), so both backends agree bit for bit.
        self._slot_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        self._free_slots: list[int] = []

    @property
    def max_keys(self) -> int:
        return self._max_keys

    def _slot(self, engine: str) -> int:
        slot = self._slot_of.get(engine)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._slot_of)
            if slot >= _native.MAX_SLOTS:
                raise EngineLimitError(
                    f"more than {_native.MAX_SLOTS} engines in one index (engine {engine[:80]!r}"
                    " refused); purge engines that left, or cap them with max_engines"
                )
            self._slot_of[engine] = slot
            self._name_of[slot] = engine
        return slot

    def apply(self, engine: str, ops: Sequence[IndexOp]) -> None:
        slot = self._slot(engine)
        core = self._core
        for op in ops:
            if isinstance(op, Store):
                core.store(
                    slot, int(op.tier), op.blocks, -1 if op.copies_from is None else op.copies_from
                )
            elif isinstance(op, Remove):
                core.remove(slot, int(op.tier), op.engine_hashes)
            elif isinstance(op, Clear):
                core.clear(slot, -1 if op.tier is None else int(op.tier))
        core.evict_if_needed()

    def age_copies(self) -> None:
        """One tick of the copy clock (:meth:`MemoryIndex.age_copies`)."""
        self._core.age_copies()

    def purge(self, engine: str) -> None:
        slot = self._slot_of.pop(engine, None)
        if slot is None:
            return
        self._core.clear(slot, -1)
        del self._name_of[slot]
        self._free_slots.append(slot)

    def resolve(self, engine: str, engine_hash: EngineHash) -> ContentKey | None:
        slot = self._slot_of.get(engine)
        if slot is None:
            return None
        return self._core.resolve(slot, engine_hash)

    def lookup(
        self, keys: Sequence[ContentKey], engines: Collection[str] | None = None
    ) -> dict[str, PrefixMatch]:
        slots: list[int] | None = None
        if engines is not None:
            slots = [s for s in map(self._slot_of.get, engines) if s is not None]
        name_of = self._name_of
        result: dict[str, PrefixMatch] = {}
        for slot, blocks, gpu, cpu, storage in self._core.lookup(keys, slots):
            engine = name_of.get(slot)
            if engine is not None:
                result[engine] = PrefixMatch(blocks, [gpu, cpu, storage])
        return result

    def engines(self) -> list[str]:
        name_of = self._name_of
        return sorted(name_of[s] for s in self._core.slots_with_blocks() if s in name_of)

    def stats(self) -> IndexStats:
        keys, entries, evictions, approx_bytes, _slots = self._core.stats()
        return IndexStats(
            keys=keys,
            entries=entries,
            engines=len(self.engines()),
            evictions=evictions,
            approx_bytes=approx_bytes,
        )
