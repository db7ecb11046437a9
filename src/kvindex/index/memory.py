"""The in-memory block index: pure Python, no I/O.

Layout, chosen for lookups linear in the prompt's blocks and small per-entry cost:

* one dict per tier, content key -> bitmask of engine slots (bit ``i`` = engine slot ``i``);
  a prompt lookup ANDs masks key by key, so it is independent of the number of engines up to
  the width of a Python int;
* per (engine slot, tier), a dict engine hash -> content key (or a tuple of keys when the
  engine's block covers several canonical blocks), so BlockRemoved resolves;
* capacity: the tier dicts keep insertion order, re-stores move a key to the end, and when
  the total number of (key, tier) slots passes ``max_keys`` (or the (key, engine, tier)
  entries pass the memory budget's share) the oldest are evicted in one sweep (amortised O(1)
  per eviction); the engine-hash mappings left pointing at evicted keys are swept once they
  add up to a quarter of the bound (docs/index.md, "Memory");
* physical copies: per (engine slot, tier), engine hash -> extra copies beyond the first and
  two flags (aged, absorbed), only for blocks stored again as a new copy
  (``Store.copies_from``) or whose removal a copy absorbed; sparse (docs/index.md,
  "Duplicates").
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from kvindex.index.base import (
    MAX_COPIES,
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
# What memory_budget_bytes divides by: the peak RSS growth per entry while the capacity bound
# evicts (benchmarks/memory_budget.py, one holder per key, the worst case: dict tables at
# their growth slack, freed ints kept in pymalloc arenas, mappings waiting for the orphan
# sweep), well above the steady-state cost above.
BUDGET_BYTES_PER_ENTRY = 320


@dataclass(frozen=True, slots=True)
class MemoryIndexConfig:
    max_keys: int = 100_000_000  # (content key, tier) slots, as llm-d's in-memory size
    memory_budget_bytes: int | None = None  # if set, caps max_keys to fit the budget
    evict_fraction: float = 0.01
    # (key, engine, tier) entries held at most; None: what memory_budget_bytes holds
    max_entries: int | None = None

    def effective_max_keys(self, per_entry: int | None = None) -> int:
        """max_keys, capped by the budget at one entry per key (``per_entry``: bytes)."""
        if self.memory_budget_bytes is None:
            return self.max_keys
        per = per_entry or BUDGET_BYTES_PER_ENTRY
        return max(1, min(self.max_keys, self.memory_budget_bytes // per))

    def effective_max_entries(self, per_entry: int | None = None) -> int:
        """(key, engine, tier) entries the budget holds (unbounded without a budget): the
        bound that keeps memory within it when keys have several holders."""
        bound = _UNBOUNDED if self.max_entries is None else max(1, self.max_entries)
        if self.memory_budget_bytes is None:
            return bound
        per = per_entry or BUDGET_BYTES_PER_ENTRY
        return min(bound, max(1, self.memory_budget_bytes // per))

    def keep(self, bound: int) -> int:
        """What an eviction sweep leaves of ``bound``."""
        return max(0, min(bound, int(bound * (1.0 - self.evict_fraction))))


_UNBOUNDED = (1 << 64) - 1
# Orphaned engine-hash mappings (their keys evicted) are swept when there are this many, or
# a quarter of the key bound if more (amortised O(1) per eviction).
_MIN_ORPHAN_SWEEP = 1024


def orphan_sweep_threshold(max_keys: int) -> int:
    return max(_MIN_ORPHAN_SWEEP, max_keys // 4)


# Copy state of one engine block (MemoryIndex._copies values; the C core keeps the same bits
# in the engine-hash entry's meta byte).
_EXTRA = 0b0011  # physical copies beyond the first (0-3)
_AGED = 0b0100  # one age_copies() passed since it was last confirmed by a store
_ABSORBED = 0b1000  # a BlockRemoved was taken by an extra copy: the claim needs a store


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
        self._max_entries = self._config.effective_max_entries()
        self._orphans = 0  # entries evicted since the last orphan sweep
        # (slot, tier) -> engine hash -> physical copies beyond the first (sparse)
        self._copies: dict[tuple[int, Tier], dict[EngineHash, int]] = {}
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
                self._store(slot, op.tier, op.blocks, op.copies_from)
            elif isinstance(op, Remove):
                self._remove(slot, op.tier, op.engine_hashes)
            elif isinstance(op, Clear):
                for tier in _TIERS if op.tier is None else (op.tier,):
                    self._clear(slot, tier)
        if sum(map(len, self._holders)) > self._max_keys or self._entries > self._max_entries:
            self._evict()

    def _store(
        self,
        slot: int,
        tier: Tier,
        blocks: Sequence[StoredBlock],
        copies_from: int | None = None,
    ) -> None:
        holders = self._holders[tier]
        mine = self._blocks.setdefault((slot, tier), {})
        bit = 1 << slot
        first_copy = len(blocks) if copies_from is None else copies_from
        copies = self._copies.get((slot, tier))
        for i, block in enumerate(blocks):
            keys = block.keys
            value = keys[0] if len(keys) == 1 else keys
            engine_hash = block.engine_hash
            # Copy bookkeeping only where it can matter (hot path: most stores skip it).
            if i >= first_copy or (copies and engine_hash in copies):
                old_value = mine.get(engine_hash)
                if old_value is not None:
                    if old_value == value:
                        self._confirm(slot, tier, engine_hash, i >= first_copy)
                        copies = self._copies.get((slot, tier))
                    else:  # another block under this hash: its copies are not this one's
                        self._drop_copies(slot, tier, engine_hash)
            mine[engine_hash] = value
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
        copies = self._copies.get((slot, tier))
        for engine_hash in engine_hashes:
            if copies:
                state = copies.get(engine_hash)
                if state is not None:
                    if state & _EXTRA:  # another physical copy remains: still held, for now
                        copies[engine_hash] = (state & _EXTRA) - 1 | _ABSORBED
                        continue
                    del copies[engine_hash]
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
        self._copies.pop((slot, tier), None)
        mine = self._blocks.get((slot, tier))
        if mine:
            self._remove(slot, tier, list(mine))
        self._blocks.pop((slot, tier), None)

    def _confirm(self, slot: int, tier: Tier, engine_hash: EngineHash, new_copy: bool) -> None:
        """A held block stored again: the engine holds it (its aged and absorbed marks go),
        and with ``new_copy`` one more physical copy of it."""
        copies = self._copies.get((slot, tier))
        state = copies.get(engine_hash, 0) if copies else 0
        if not state and not new_copy:
            return
        extra = state & _EXTRA
        if new_copy:
            extra = min(extra + 1, MAX_COPIES - 1)
        if copies is None:
            copies = self._copies[(slot, tier)] = {}
        if extra:
            copies[engine_hash] = extra
        else:
            copies.pop(engine_hash, None)

    def age_copies(self) -> None:
        """One tick of the copy clock (the ingest service calls it every copy_ttl_s / 2): an
        extra copy not confirmed by a store for two ticks is forgotten, and a block kept only
        because an extra copy absorbed its BlockRemoved is dropped if no store confirmed it
        for two ticks. So a copy wrongly counted (a re-announced hit taken for a recompute)
        claims a block the engine no longer holds for at most two ticks."""
        for (slot, tier), copies in list(self._copies.items()):
            unconfirmed = []
            for engine_hash, state in list(copies.items()):
                if state & _AGED:
                    del copies[engine_hash]
                    if state & _ABSORBED:
                        unconfirmed.append(engine_hash)
                else:
                    copies[engine_hash] = state | _AGED
            if unconfirmed:
                self._remove(slot, tier, unconfirmed)
            if not copies:
                self._copies.pop((slot, tier), None)

    def _drop_copies(self, slot: int, tier: Tier, engine_hash: EngineHash) -> None:
        copies = self._copies.get((slot, tier))
        if copies:
            copies.pop(engine_hash, None)

    def _evict(self) -> None:
        """Evict the oldest keys of the largest tier until the (key, tier) slots are within
        max_keys and the entries within the budget's share, each less evict_fraction. The
        native core runs the same arithmetic (it evicts the same keys)."""
        keep_keys = self._config.keep(self._max_keys)
        keep_entries = self._config.keep(self._max_entries)
        evicted_entries = 0
        while True:
            slots = sum(map(len, self._holders))
            target = slots - keep_keys
            entries = self._entries
            if entries > keep_entries:
                target = max(target, -(-(entries - keep_entries) * slots // entries))
            if target <= 0 or not slots:
                break
            holders = max(self._holders, key=len)
            victims = list(itertools.islice(holders, min(target, len(holders))))
            for key in victims:
                n = holders.pop(key).bit_count()
                self._entries -= n
                evicted_entries += n
            self._evictions += len(victims)
        self._orphans += evicted_entries
        if self._orphans >= orphan_sweep_threshold(self._max_keys):
            self._sweep_orphans()

    def _sweep_orphans(self) -> None:
        """Drop engine-hash mappings none of whose keys the engine still holds in that tier
        (their keys were evicted), with their copy counts."""
        self._orphans = 0
        for (slot, tier), mine in list(self._blocks.items()):
            holders = self._holders[tier]
            bit = 1 << slot
            dead = [
                h
                for h, value in mine.items()
                if not any(holders.get(k, 0) & bit for k in _iter_keys(value))
            ]
            if not dead:
                continue
            copies = self._copies.get((slot, tier))
            for h in dead:
                del mine[h]
                if copies:
                    copies.pop(h, None)
            if not mine:
                del self._blocks[(slot, tier)]
                self._copies.pop((slot, tier), None)

    def purge(self, engine: str) -> None:
        slot = self._slot_of.pop(engine, None)
        if slot is None:
            return
        for tier in _TIERS:
            self._clear(slot, tier)
            self._copies.pop((slot, tier), None)
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
        copies = sum(map(len, self._copies.values()))
        return IndexStats(
            keys=n_keys,
            entries=self._entries,
            engines=len(self.engines()),
            evictions=self._evictions,
            approx_bytes=slots * BYTES_PER_KEY_SLOT
            + (engine_entries + copies) * BYTES_PER_ENGINE_ENTRY,
        )
