"""Turning decoded KV-event batches into index operations: pure, no I/O.

:class:`EventApplier` owns the per-engine rules: content keys from ``token_ids`` (chained from
the parent's key or the model root), canonical block splitting, tier mapping, which KV groups
are indexed, extra keys, and events whose parent is not (yet) known, which are held and
retried rather than dropped with their descendants. :class:`SequenceTracker` decides, per
engine, what a batch's sequence number means (next, duplicate, gap, restart); the subscriber
acts on it (replay, clear).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kvindex import keys as _keys
from kvindex.engine_blocks import EngineBlockSizes, EngineResidency
from kvindex.index.base import BlockIndex, Clear, IndexOp, Remove, Store, StoredBlock, Tier
from kvindex.keys import DEFAULT_BLOCK_SIZE, BlockExtra, ContentKey, chain_keys, root_key
from kvindex.speculative import SpeculativeIndex
from kvindex.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    EngineHash,
    Medium,
)

try:  # C construction of the StoredBlocks of one event (tests/kvindex/test_native_keys.py)
    from kvindex._native import stored_blocks as _native_stored_blocks
except ImportError:  # built without a compiler
    _native_stored_blocks = None  # type: ignore[assignment]

__all__ = [
    "EventApplier",
    "IngestConfig",
    "IngestCounts",
    "SeqAction",
    "SequenceTracker",
    "extras_for_blocks",
]

FULL_ATTENTION = "full_attention"

_STORED = BlockStored.__name__
_REMOVED = BlockRemoved.__name__
_CLEARED = AllBlocksCleared.__name__
_GPU = Medium.GPU
# Media as engines spell them; others (lower case, unknown) go through Tier.from_medium.
_TIER_OF_MEDIUM: dict[str, Tier] = {t.name: t for t in Tier}
_MAX_CACHED_ROOTS = 1024


@dataclass(frozen=True, slots=True)
class IngestConfig:
    block_size: int = DEFAULT_BLOCK_SIZE  # canonical block size (tokens)
    # KV-cache group kinds that are indexed; None kind (older engines) is full attention.
    indexed_kinds: frozenset[str] = frozenset({FULL_ATTENTION})
    default_model: str = ""  # model of engines whose topic names none
    max_pending_per_engine: int = 4096  # events held for an unknown parent
    # Count each engine's resident GPU blocks (EventApplier.residency). Off unless a reader
    # asks (the picker's in-process index): it costs an index lookup per root event, a
    # round trip on Redis.
    track_residency: bool = False


@dataclass(slots=True)
class IngestCounts:
    """What one apply did; the edge adds these into its metrics."""

    events: dict[str, int] = field(default_factory=dict)  # by type
    stored_blocks: int = 0
    removed_blocks: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # by reason
    pending: int = 0  # events now waiting for their parent
    resolved_pending: int = 0  # held events applied once their parent arrived

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def add(self, other: IngestCounts) -> None:
        for name, n in other.events.items():
            self.events[name] = self.events.get(name, 0) + n
        for reason, n in other.skipped.items():
            self.skip(reason, n)
        self.stored_blocks += other.stored_blocks
        self.removed_blocks += other.removed_blocks
        self.pending = other.pending
        self.resolved_pending += other.resolved_pending


def extras_for_blocks(
    extra_keys: list[Any] | None,
    n_blocks: int,
    lora_name: str | None,
    chain_start: bool,
    split: int = 1,
    canonical: int = DEFAULT_BLOCK_SIZE,
) -> list[BlockExtra | None] | None:
    """Canonical-block extras from an event's untagged ``extra_keys`` (one entry per engine
    block). Entries hold, in order, the LoRA name (already in the chain root, so dropped),
    ``(mm_identifier, offset)`` pairs, the cache salt on the first block of a chain, and
    prompt-embedding digests (bytes). A string on the first block of a chain is the salt
    unless it equals ``lora_name`` (or is the first of two strings); elsewhere it is the
    LoRA name. An engine block splits into ``split`` canonical blocks: multimodal items and
    digests apply to each (offsets rebased to the canonical block), the salt to the first."""
    if not extra_keys:
        return None
    out: list[BlockExtra | None] = []
    for i in range(n_blocks):
        entry = extra_keys[i] if i < len(extra_keys) else None
        if not entry:
            out.extend([None] * split)
            continue
        salt: str | None = None
        if chain_start and i == 0:
            strings = [e for e in entry if isinstance(e, str)]
            if len(strings) >= 2:
                salt = strings[1]
            elif strings and strings[0] != lora_name:
                salt = strings[0]
        mm = [
            (item[0], item[1])
            for item in entry
            if isinstance(item, list | tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], int)
        ]
        embeds = tuple(item for item in entry if isinstance(item, bytes))
        for j in range(split):
            extra = BlockExtra(
                mm=tuple((ident, offset - j * canonical) for ident, offset in mm),
                cache_salt=salt if j == 0 else None,
                embeds=embeds,
            )
            out.append(extra if extra else None)
    return out if any(out) else None


class EventApplier:
    """Applies decoded batches of events to a :class:`BlockIndex`, one engine at a time."""

    def __init__(
        self,
        index: BlockIndex,
        config: IngestConfig | None = None,
        block_sizes: EngineBlockSizes | None = None,
    ) -> None:
        self.index = index
        self.config = config or IngestConfig()
        # Each engine's block size as its events say; the scorer rounds matches with it.
        self.block_sizes = block_sizes or EngineBlockSizes(self.config.block_size)
        # The GPU blocks each engine holds per its stream (stores - removals): where a new
        # prefix fits without evicting (read by routers with the engine's capacity).
        self.residency = EngineResidency() if self.config.track_residency else None
        # The scorer's speculative entries (set by whoever wires the two): the engine's own
        # events settle them. A stored block is real from now on, so its twin goes (else a
        # removal of the block would leave the twin claiming it until its TTL); a cleared
        # cache refutes them all.
        self.speculative: SpeculativeIndex | None = None
        self._pending: dict[str, deque[tuple[BlockStored, str]]] = {}
        self._engine_block_size: dict[tuple[str, int], int] = {}
        self._skipped_groups: dict[str, set[int]] = {}
        self._roots: dict[tuple[str, str | None], ContentKey] = {}

    def apply_batch(
        self, engine: str, batch: DecodedBatch, model: str | None, fresh: bool = True
    ) -> IngestCounts:
        """Apply one batch from ``engine`` (an endpoint key) serving ``model``. ``fresh``:
        the batch was not applied before (False: a replay re-applying it), so a block it
        stores again after its parent is another physical copy (docs/index.md, "Duplicates")."""
        counts = IngestCounts()
        model = model or self.config.default_model
        ops: list[IndexOp] = []
        local: dict[EngineHash, ContentKey] = {}  # blocks stored earlier in this batch
        stored_any = False
        # Per-type event counts as locals, folded into counts.events once (hot loop).
        n_stored = n_removed = n_cleared = 0
        # GPU blocks the engine stored and removed since its last clear in this batch.
        gpu_stored = gpu_removed = 0
        cleared = False
        residency = self.residency
        stored = self._stored
        for event in batch.events:
            if isinstance(event, BlockStored):
                n_stored += 1
                if (
                    residency is not None
                    and event.medium == _GPU
                    and not self._reannounced(engine, event, local)
                ):
                    gpu_stored += len(event.block_hashes)
                op = stored(engine, model, event, local, counts)
                if op is not None:
                    ops.append(op)
                    stored_any = True
            elif isinstance(event, BlockRemoved):
                n_removed += 1
                if event.medium == _GPU:
                    gpu_removed += len(event.block_hashes)
                self._removed(engine, event, ops, counts, local)
            elif isinstance(event, AllBlocksCleared):
                n_cleared += 1
                ops.append(Clear())
                local.clear()
                self._pending.pop(engine, None)
                cleared, gpu_stored, gpu_removed = True, 0, 0
        if residency is not None and fresh:  # a replay re-applying batches repeats stores
            if cleared:
                residency.clear(engine)
            residency.add(engine, gpu_stored, gpu_removed)
        events = counts.events
        if n_stored:
            events[_STORED] = n_stored
        if n_removed:
            events[_REMOVED] = n_removed
        if n_cleared:
            events[_CLEARED] = n_cleared
        if ops:
            if not fresh:  # re-applied: stores of held blocks are not new copies
                ops = [Store(op.tier, op.blocks) if isinstance(op, Store) else op for op in ops]
            self.index.apply(engine, ops)
            spec = self.speculative
            if spec is not None and spec.tracks(engine):
                if cleared:
                    spec.purge_engine(engine)
                elif stored_any:
                    spec.forget(
                        engine,
                        [
                            k
                            for op in ops
                            if isinstance(op, Store)
                            for b in op.blocks
                            for k in b.keys
                        ],
                    )
        if stored_any and self._pending.get(engine):
            self._retry_pending(engine, counts)
        counts.pending = len(self._pending.get(engine, ()))
        return counts

    def forget(self, engine: str) -> None:
        """Drop ingest state of an engine (it restarted or left discovery)."""
        self._pending.pop(engine, None)
        self._skipped_groups.pop(engine, None)
        for key in [k for k in self._engine_block_size if k[0] == engine]:
            del self._engine_block_size[key]
        self.block_sizes.forget(engine)
        if self.residency is not None:
            self.residency.forget(engine)
        if self.speculative is not None:
            self.speculative.purge_engine(engine)

    # -- events ------------------------------------------------------------------------------

    def _reannounced(
        self, engine: str, event: BlockStored, local: dict[EngineHash, ContentKey]
    ) -> bool:
        """A chain from the root whose first block the engine already holds: hits reported
        again (kv_cache_report_mode "full"), not new blocks (one lookup per root event; a
        block stored after a parent is always new, a copy if it was held)."""
        if event.parent_block_hash is not None or not event.block_hashes:
            return False
        first = event.block_hashes[0]
        return first in local or self.index.resolve(engine, first) is not None

    def _tier(self, medium: str, counts: IngestCounts) -> Tier | None:
        tier = _TIER_OF_MEDIUM.get(medium)  # the exact spellings engines send (hot path)
        if tier is not None:
            return tier
        try:
            return Tier.from_medium(medium)
        except KeyError:
            counts.skip("unknown_medium")
            return None

    def _root(self, model: str, lora_name: str | None) -> ContentKey:
        """root_key(model, lora_name), cached: a handful of (model, adapter) pairs start
        every chain (bounded: cleared when full, so a flood of adapter names cannot grow it)."""
        pair = (model, lora_name)
        key = self._roots.get(pair)
        if key is None:
            if len(self._roots) >= _MAX_CACHED_ROOTS:
                self._roots.clear()
            key = self._roots[pair] = root_key(model, lora_name)
        return key

    def _stored(
        self,
        engine: str,
        model: str,
        event: BlockStored,
        local: dict[EngineHash, ContentKey],
        counts: IngestCounts,
    ) -> Store | None:
        kind = event.kv_cache_spec_kind
        if kind is not None and kind not in self.config.indexed_kinds:
            self._skipped_groups.setdefault(engine, set()).add(event.group_idx)
            counts.skip("group_not_indexed", len(event.block_hashes))
            return None
        tier = _TIER_OF_MEDIUM.get(event.medium)
        if tier is None:
            tier = self._tier(event.medium, counts)
            if tier is None:
                return None
        size = event.block_size
        canonical = self.config.block_size
        n = len(event.block_hashes)
        group = (engine, event.group_idx)
        known = self._engine_block_size.get(group, 0)
        if size < known:
            counts.skip("partial_block", n)  # smaller than the group's established size
            return None
        if size % canonical:
            self.block_sizes.learn(engine, size)  # reported, never silently unindexed
            counts.skip("block_size_not_multiple", n)
            return None
        if len(event.token_ids) != n * size:
            counts.skip("token_count_mismatch", n)
            return None
        if size > known:
            self._engine_block_size[group] = size
            self.block_sizes.learn(engine, size)
        parent_hash = event.parent_block_hash
        if parent_hash is None:
            parent = self._root(model, event.lora_name)
        else:
            found = local.get(parent_hash)
            if found is None:
                found = self.index.resolve(engine, parent_hash)
            if found is None:
                self._hold(engine, event, model, counts)
                return None
            parent = found
        split = size // canonical
        extras = None
        if event.extra_keys:
            extras = extras_for_blocks(
                event.extra_keys, n, event.lora_name, parent_hash is None, split, canonical
            )
        try:
            # chain_keys' own C fast path, called directly (one Python frame less per event);
            # None is a case it leaves to chain_keys.
            native = None if extras else _keys._native_chain_keys  # type: ignore[attr-defined]
            keys = None if native is None else native(parent, event.token_ids, canonical)
            if keys is None:
                keys = chain_keys(parent, event.token_ids, canonical, extras)
        except OverflowError:
            counts.skip("token_id_out_of_range", n)
            return None
        made = None
        if _native_stored_blocks is not None:  # the same blocks, made in C (ingest hot path)
            made = _native_stored_blocks(StoredBlock, event.block_hashes, keys, split, local)
        if made is not None:
            blocks = made
        elif split == 1:  # the common case: one content key per engine block
            blocks = [StoredBlock(h, (k,)) for h, k in zip(event.block_hashes, keys, strict=True)]
            local.update(zip(event.block_hashes, keys, strict=True))
        else:
            blocks = [
                StoredBlock(h, tuple(keys[i * split : (i + 1) * split]))
                for i, h in enumerate(event.block_hashes)
            ]
            for block in blocks:
                local[block.engine_hash] = block.keys[-1]
        counts.stored_blocks += n
        # Blocks stored after a parent are blocks the engine just computed, so one it already
        # holds is another physical copy (a block-aligned prompt's last block, recomputed);
        # from the chain's root they may be hits reported again (kv_cache_report_mode
        # "full"), never counted (docs/index.md, "Duplicates").
        return Store(tier, blocks, 0 if parent_hash is not None else None)

    def _removed(
        self,
        engine: str,
        event: BlockRemoved,
        ops: list[IndexOp],
        counts: IngestCounts,
        local: dict[EngineHash, ContentKey],
    ) -> None:
        if event.group_idx in self._skipped_groups.get(engine, ()):
            counts.skip("group_not_indexed", len(event.block_hashes))
            return
        tier = self._tier(event.medium, counts)
        if tier is None:
            return
        for h in event.block_hashes:
            local.pop(h, None)
        ops.append(Remove(tier, event.block_hashes))
        counts.removed_blocks += len(event.block_hashes)
        if self._pending.get(engine):
            self._forget_held(engine, event.block_hashes, counts)

    # -- unknown parents ---------------------------------------------------------------------

    def _hold(self, engine: str, event: BlockStored, model: str, counts: IngestCounts) -> None:
        queue = self._pending.setdefault(engine, deque())
        if len(queue) >= self.config.max_pending_per_engine:
            dropped, _ = queue.popleft()
            counts.skip("unknown_parent_dropped", len(dropped.block_hashes))
        queue.append((event, model))
        counts.skip("unknown_parent_held", len(event.block_hashes))

    def _forget_held(
        self, engine: str, removed: Sequence[EngineHash], counts: IngestCounts
    ) -> None:
        """The engine evicted blocks that held events (waiting for their parent) would store:
        drop those events, else the parent's arrival would apply a block the engine no longer
        holds (a false hit). A whole event goes: what it stored after an evicted block is
        unreachable for a prefix match anyway, and fewer claims are only misses."""
        gone = set(removed)
        kept: deque[tuple[BlockStored, str]] = deque()
        dropped = 0
        for item in self._pending[engine]:
            if gone.isdisjoint(item[0].block_hashes):
                kept.append(item)
            else:
                dropped += len(item[0].block_hashes)
        if not dropped:
            return
        counts.skip("unknown_parent_evicted", dropped)
        if kept:
            self._pending[engine] = kept
        else:
            del self._pending[engine]

    def _retry_pending(self, engine: str, counts: IngestCounts) -> None:
        """Apply held events whose parent is now known, repeatedly (a held chain resolves
        link by link)."""
        queue = self._pending[engine]
        progress = True
        while progress and queue:
            progress = False
            still: deque[tuple[BlockStored, str]] = deque()
            for event, model in queue:
                parent = event.parent_block_hash
                if parent is not None and self.index.resolve(engine, parent) is not None:
                    sub = IngestCounts()
                    op = self._stored(engine, model, event, {}, sub)
                    if op is not None:
                        self.index.apply(engine, [op])
                        counts.stored_blocks += sub.stored_blocks
                        counts.resolved_pending += 1
                        progress = True
                else:
                    still.append((event, model))
            queue = still
        if queue:
            self._pending[engine] = queue
        else:
            del self._pending[engine]


class SeqAction(Enum):
    APPLY = "apply"  # the next batch (or the first one seen)
    DUPLICATE = "duplicate"  # already applied (e.g. replayed twice): drop
    GAP = "gap"  # batches were lost before this one: replay from `expected`
    RESET = "reset"  # the engine restarted (seq back to 0): clear it, then apply


@dataclass(slots=True)
class _SeqState:
    last: int


class SequenceTracker:
    """Per-engine sequence bookkeeping. ``observe`` classifies a seq and, for APPLY / GAP /
    RESET, records it as the newest seen."""

    def __init__(self) -> None:
        self._state: dict[str, _SeqState] = {}

    def last(self, engine: str) -> int | None:
        state = self._state.get(engine)
        return None if state is None else state.last

    def observe(self, engine: str, seq: int) -> SeqAction:
        state = self._state.get(engine)
        if state is None:
            self._state[engine] = _SeqState(seq)
            return SeqAction.APPLY
        if seq == state.last + 1:
            state.last = seq
            return SeqAction.APPLY
        if seq > state.last + 1:
            state.last = seq
            return SeqAction.GAP
        if seq == 0 or seq < state.last // 2:
            # Seq restarted: the publisher (engine) restarted; its cache is empty.
            state.last = seq
            return SeqAction.RESET
        return SeqAction.DUPLICATE

    def forget(self, engine: str) -> None:
        self._state.pop(engine, None)

    def engines(self) -> Sequence[str]:
        return list(self._state)
