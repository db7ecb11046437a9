"""The in-memory block index: pure Python, no I/O.

Layout, chosen for lookups linear in the prompt's blocks and small per-entry cost:

* one dict per tier, content key -> bitmask of engine slots (bit ``i`` = engine slot ``i``);
  a prompt lookup ANDs masks key by key, so it is independent of the number of engines up to
  the width of a Python int;
* per (engine slot, tier), a dict engine hash -> content key (or a tuple of keys when the
  engine's block covers several canonical blocks), so BlockRemoved resolves;
* capacity: the tier dicts keep insertion order, re-stores move a key to the end, and when
  the total number of (key, tier) slots passes ``max_keys`` the oldest 1% are evicted in one
  sweep (amortised O(1) per eviction).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from kvindex.index.base import (
    Clear,
    IndexOp,
    IndexStats,
    PrefixMatch,
    Remove,
    Store,
    StoredBlock,
    Tier,
)
from kvindex.keys import ContentKey
from kvindex.wire import EngineHash

__all__ = ["MemoryIndex", "MemoryIndexConfig"]

_TIERS = tuple(Tier)

# Measured by benchmarks/ingest.py (CPython 3.11, 64-bit, RSS deltas at 10M entries, 8
# engines): 165 bytes per (block, engine) entry when every key has one holder, 112 when each
# key has four; solving entry = ENGINE_ENTRY + KEY_SLOT / holders gives the two constants. A
# key slot is a tier-dict entry plus its int key (masks of <= 8 engines are cached small ints);
# an engine entry is an engine-hash dict entry plus its int hash.
BYTES_PER_KEY_SLOT = 71
BYTES_PER_ENGINE_ENTRY = 94


@dataclass(frozen=True, slots=True)
class MemoryIndexConfig:
    max_keys: int = 100_000_000  # (content key, tier) slots, as llm-d's in-memory size
    memory_budget_bytes: int | None = None  # if set, caps max_keys to fit the budget
    evict_fraction: float = 0.01

    def effective_max_keys(self) -> int:
        if self.memory_budget_bytes is None:
            return self.max_keys
        per_key = BYTES_PER_KEY_SLOT + BYTES_PER_ENGINE_ENTRY
        return max(1, min(self.max_keys, self.memory_budget_bytes // per_key))


_Keys = ContentKey | tuple[ContentKey, ...]


def _iter_keys(value: _Keys) -> Iterable[ContentKey]:
    return (value,) if isinstance(value, int) else value


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _count(counter: list[int], mask: int) -> None:
    """Add 1 to the bit-sliced counter of every engine in `mask` (ripple-carry adder)."""
    carry = mask
    for i, word in enumerate(counter):
        counter[i] = word ^ carry
        carry &= word
        if not carry:
            return
    counter.append(carry)


def _read_count(counter: list[int], slot: int) -> int:
    return sum(((word >> slot) & 1) << i for i, word in enumerate(counter))


class MemoryIndex:
    """In-memory implementation of :class:`kvindex.index.base.BlockIndex`."""

    def __init__(self, config: MemoryIndexConfig | None = None) -> None:
        self._config = config or MemoryIndexConfig()
        self._max_keys = self._config.effective_max_keys()
        self._holders: tuple[dict[ContentKey, int], ...] = tuple({} for _ in _TIERS)
        self._slot_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        self._free_slots: list[int] = []
        # (slot, tier) -> engine hash -> key(s)
        self._blocks: dict[tuple[int, Tier], dict[EngineHash, _Keys]] = {}
        self._evictions = 0
        # (key, engine, tier) entries, kept incrementally so stats() (read at every metrics
        # scrape, under the service's index lock) does not walk millions of keys.
        self._entries = 0

    # -- engine slots ------------------------------------------------------------------------

    def _slot(self, engine: str) -> int:
        slot = self._slot_of.get(engine)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._slot_of)
            self._slot_of[engine] = slot
            self._name_of[slot] = engine
        return slot

    # -- writes ------------------------------------------------------------------------------

    def apply(self, engine: str, ops: Sequence[IndexOp]) -> None:
        slot = self._slot(engine)
        for op in ops:
            if isinstance(op, Store):
                self._store(slot, op.tier, op.blocks)
            elif isinstance(op, Remove):
                self._remove(slot, op.tier, op.engine_hashes)
            elif isinstance(op, Clear):
                for tier in _TIERS if op.tier is None else (op.tier,):
                    self._clear(slot, tier)
        if sum(map(len, self._holders)) > self._max_keys:
            self._evict()

    def _store(self, slot: int, tier: Tier, blocks: Sequence[StoredBlock]) -> None:
        holders = self._holders[tier]
        mine = self._blocks.setdefault((slot, tier), {})
        bit = 1 << slot
        for block in blocks:
            keys = block.keys
            mine[block.engine_hash] = keys[0] if len(keys) == 1 else keys
            for key in keys:
                # pop + insert moves the key to the young end of the dict's order.
                old = holders.pop(key, 0)
                holders[key] = old | bit
                if not old & bit:
                    self._entries += 1

    def _remove(self, slot: int, tier: Tier, engine_hashes: Sequence[EngineHash]) -> None:
        mine = self._blocks.get((slot, tier))
        if not mine:
            return
        holders = self._holders[tier]
        clear_bit = ~(1 << slot)
        for engine_hash in engine_hashes:
            value = mine.pop(engine_hash, None)
            if value is None:
                continue
            for key in _iter_keys(value):
                mask = holders.get(key)
                if mask is None or mask & clear_bit == mask:
                    continue
                self._entries -= 1
                mask &= clear_bit
                if mask:
                    holders[key] = mask
                else:
                    del holders[key]

    def _clear(self, slot: int, tier: Tier) -> None:
        mine = self._blocks.get((slot, tier))
        if mine:
            self._remove(slot, tier, list(mine))
        self._blocks.pop((slot, tier), None)

    def _evict(self) -> None:
        total = sum(map(len, self._holders))
        target = total - int(self._max_keys * (1.0 - self._config.evict_fraction))
        while target > 0:
            holders = max(self._holders, key=len)
            victims = list(itertools.islice(holders, min(target, len(holders))))
            for key in victims:
                self._entries -= holders.pop(key).bit_count()
            self._evictions += len(victims)
            target -= len(victims)

    def purge(self, engine: str) -> None:
        slot = self._slot_of.pop(engine, None)
        if slot is None:
            return
        for tier in _TIERS:
            self._clear(slot, tier)
        del self._name_of[slot]
        self._free_slots.append(slot)

    # -- reads -------------------------------------------------------------------------------

    def resolve(self, engine: str, engine_hash: EngineHash) -> ContentKey | None:
        slot = self._slot_of.get(engine)
        if slot is None:
            return None
        for tier in _TIERS:
            mine = self._blocks.get((slot, tier))
            if mine:
                value = mine.get(engine_hash)
                if value is not None:
                    return value if isinstance(value, int) else value[-1]
        return None

    def lookup(
        self, keys: Sequence[ContentKey], engines: Collection[str] | None = None
    ) -> dict[str, PrefixMatch]:
        if engines is None:
            active = -1
        else:
            active = 0
            for name in engines:
                slot = self._slot_of.get(name)
                if slot is not None:
                    active |= 1 << slot
        gpu, cpu, storage = self._holders
        # Per-engine counts of blocks held only below GPU, as bit-sliced counters: bit `slot`
        # of word i is bit i of that engine's count, so adding one block for every engine of
        # a mask costs O(log blocks) big-int operations, not one step per engine.
        cpu_count: list[int] = []
        storage_count: list[int] = []
        matched: dict[int, int] = {}
        position = 0
        for key in keys:
            held_gpu = gpu.get(key, 0)
            held = held_gpu
            if cpu:
                held |= cpu.get(key, 0)
            if storage:
                held |= storage.get(key, 0)
            held &= active
            dropped = active & ~held
            if dropped and position:
                for slot in _bits(dropped):
                    matched[slot] = position
            below_gpu = held & ~held_gpu
            if below_gpu:
                in_cpu = below_gpu & cpu.get(key, 0)
                if in_cpu:
                    _count(cpu_count, in_cpu)
                if below_gpu & ~in_cpu:
                    _count(storage_count, below_gpu & ~in_cpu)
            active = held
            position += 1  # noqa: SIM113 (the count survives the early break)
            if not active:
                break
        else:
            if position and active:
                for slot in _bits(active):
                    matched[slot] = position
        result: dict[str, PrefixMatch] = {}
        for slot, blocks in matched.items():
            engine = self._name_of.get(slot)
            if engine is None:
                continue
            n_cpu = _read_count(cpu_count, slot)
            n_storage = _read_count(storage_count, slot)
            result[engine] = PrefixMatch(blocks, [blocks - n_cpu - n_storage, n_cpu, n_storage])
        return result

    def engines(self) -> list[str]:
        return sorted({self._name_of[slot] for (slot, _), mine in self._blocks.items() if mine})

    def stats(self) -> IndexStats:
        gpu, cpu, storage = self._holders
        # Keys held in several tiers count once; with only a GPU tier (common) this is O(1).
        n_keys = len(set(gpu).union(cpu, storage)) if cpu or storage else len(gpu)
        slots = sum(map(len, self._holders))
        engine_entries = sum(map(len, self._blocks.values()))
        return IndexStats(
            keys=n_keys,
            entries=self._entries,
            engines=len(self.engines()),
            evictions=self._evictions,
            approx_bytes=slots * BYTES_PER_KEY_SLOT + engine_entries * BYTES_PER_ENGINE_ENTRY,
        )
