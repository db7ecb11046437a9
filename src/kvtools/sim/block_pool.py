"""A prefix-cache block pool like vLLM's (pure: returns events, does no I/O).

* Physical blocks with reference counts; full blocks are registered under their vLLM digest.
* A request reuses the longest cached prefix of its full prompt blocks (capped so at least
  one prompt token is computed, as vLLM does) and takes new blocks from the free queue.
* Free blocks form an LRU queue (OrderedDict, oldest first). A cached block stays cached
  while free; when it is taken for reuse its digest is dropped and BlockRemoved is emitted.
  A finished request's cached blocks are appended tail-first, so a chain's tail is evicted
  first; its uncached blocks (a partial last block) go to the front, to be reused first.
* Deviation from vLLM (documented in docs/simulator.md): a request reserves all blocks for
  prompt + max_tokens at admission instead of growing step by step (no preemption).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvindex.vllm_hash import RequestExtras
from kvtools.sim.events import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEvent,
)


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    digest: bytes | None = None
    # What a BlockStored for this block alone needs (kept for the CPU offload tier).
    meta: BlockMeta | None = None


@dataclass(frozen=True, slots=True)
class BlockMeta:
    parent: bytes | None
    token_ids: tuple[int, ...]
    block_index: int
    extras: RequestExtras


@dataclass(slots=True)
class Allocation:
    """The blocks one running request holds, in token order."""

    request_id: str
    blocks: list[Block]
    hit_blocks: int
    num_cached_blocks: int = 0
    extras: RequestExtras = field(default_factory=RequestExtras)


@dataclass(frozen=True, slots=True)
class KVGroupSpec:
    """One KV-cache group (hybrid models have several)."""

    group_idx: int = 0
    block_size: int = 16
    kind: str = "full_attention"
    sliding_window: int | None = None


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        spec: KVGroupSpec,
        medium: str = MEDIUM_GPU,
        offload: CpuTier | None = None,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.spec = spec
        self.medium = medium
        self.num_blocks = num_blocks
        self.offload = offload
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self._blocks)
        # digest -> physical blocks holding it. vLLM does not deduplicate: two requests that
        # compute the same block concurrently both cache it (stored twice, removed twice).
        self._cached: dict[bytes, dict[int, Block]] = {}

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Distinct cached digests."""
        return len(self._cached)

    def _lookup(self, digest: bytes) -> Block:
        return next(iter(self._cached[digest].values()))

    @property
    def usage(self) -> float:
        """vLLM's kv_cache_usage_perc: fraction of blocks held by running requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def is_cached(self, digest: bytes) -> bool:
        return digest in self._cached

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def longest_hit(self, digests: Sequence[bytes], num_prompt_tokens: int) -> int:
        """Number of leading prompt blocks already cached (vLLM computes >= 1 token)."""
        limit = max(0, (num_prompt_tokens - 1) // self.block_size)
        hits = 0
        for digest in digests[:limit]:
            if digest not in self._cached:
                break
            hits += 1
        return hits

    def can_allocate(self, digests: Sequence[bytes], num_prompt_tokens: int, total: int) -> bool:
        hits = self.longest_hit(digests, num_prompt_tokens)
        # Hit blocks that sit in the free queue stop being free once touched.
        free_hits = sum(1 for d in digests[:hits] if self._lookup(d).ref_cnt == 0)
        return self.blocks_needed(total) - hits <= self.num_free - free_hits

    def allocate(
        self,
        request_id: str,
        digests: Sequence[bytes],
        num_prompt_tokens: int,
        total_tokens: int,
        extras: RequestExtras,
    ) -> tuple[Allocation, list[KVEvent]]:
        """Touch the cached prefix and take new blocks for the rest of `total_tokens`."""
        if not self.can_allocate(digests, num_prompt_tokens, total_tokens):
            raise MemoryError(f"not enough free blocks for request {request_id}")
        hits = self.longest_hit(digests, num_prompt_tokens)
        blocks: list[Block] = []
        for digest in digests[:hits]:
            block = self._lookup(digest)
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
            blocks.append(block)
        events: list[KVEvent] = []
        for _ in range(self.blocks_needed(total_tokens) - hits):
            _, block = self._free.popitem(last=False)
            if block.digest is not None:
                # Like vLLM: one BlockRemoved per evicted physical block.
                holders = self._cached[block.digest]
                del holders[block.block_id]
                if not holders:
                    del self._cached[block.digest]
                events.append(self._removed([block.digest]))
                if self.offload is not None and block.meta is not None:
                    events.extend(self.offload.store(block.digest, block.meta))
                block.digest = None
                block.meta = None
            block.ref_cnt = 1
            blocks.append(block)
        alloc = Allocation(request_id, blocks, hit_blocks=hits, num_cached_blocks=hits)
        alloc.extras = extras
        return alloc, events

    def cache_blocks(
        self,
        alloc: Allocation,
        digests: Sequence[bytes],
        token_ids: Sequence[int],
        *,
        announce_from: int | None = None,
    ) -> list[KVEvent]:
        """Register the newly full blocks of `alloc` (digests[i] for block i) and return the
        BlockStored event. `announce_from=0` re-announces from block 0 with parent None, as
        vLLM 0.33 does for a request that hit the prefix cache."""
        start = alloc.num_cached_blocks
        end = min(len(digests), len(alloc.blocks))
        first = start if announce_from is None else min(announce_from, start)
        if end <= first:
            return []
        bs = self.block_size
        for i in range(start, end):
            block = alloc.blocks[i]
            if block.digest is None:
                block.digest = digests[i]
                block.meta = BlockMeta(
                    digests[i - 1] if i > 0 else None,
                    tuple(token_ids[i * bs : (i + 1) * bs]),
                    i,
                    alloc.extras,
                )
                self._cached.setdefault(digests[i], {})[block.block_id] = block
        alloc.num_cached_blocks = max(end, start)
        parent = digests[first - 1] if first > 0 else None
        return [
            stored_event(
                self.spec,
                self.medium,
                list(digests[first:end]),
                parent,
                list(token_ids[first * bs : end * bs]),
                alloc.extras,
                first,
            )
        ]

    def hit_blocks_event(
        self, alloc: Allocation, digests: Sequence[bytes], token_ids: Sequence[int]
    ) -> list[KVEvent]:
        """BlockStored for the request's prefix-cache hits (blocks 0.., parent None): what
        vLLM reports for a request in `kv_cache_report_mode` "full"."""
        hits = alloc.hit_blocks
        if hits == 0:
            return []
        bs = self.block_size
        return [
            stored_event(
                self.spec,
                self.medium,
                list(digests[:hits]),
                None,
                list(token_ids[: hits * bs]),
                alloc.extras,
                0,
            )
        ]

    def free(self, alloc: Allocation) -> None:
        """Release a finished request, as vLLM does: its blocks tail-first; the cached ones
        go to the end of the free queue (tail blocks become the first eviction candidates),
        the uncached ones to its front (reused before any cached block is evicted)."""
        uncached: list[Block] = []
        for block in reversed(alloc.blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.digest is None:
                    uncached.append(block)
        for block in reversed(uncached):
            self._free.move_to_end(block.block_id, last=False)
        alloc.blocks = []

    def reset(self) -> list[KVEvent]:
        """Forget every cached digest (POST /reset_prefix_cache)."""
        for block in self._blocks:
            block.digest = None
            block.meta = None
        self._cached.clear()
        if self.offload is not None:
            self.offload.reset()
        return [AllBlocksCleared()]

    def cpu_hits(self, digests: Sequence[bytes], gpu_hits: int, num_prompt_tokens: int) -> int:
        """Blocks after the GPU hits found in the CPU tier (0 without a tier)."""
        if self.offload is None:
            return 0
        limit = max(0, (num_prompt_tokens - 1) // self.block_size)
        return self.offload.longest_hit(digests, gpu_hits, limit)

    def _removed(self, digests: list[bytes]) -> BlockRemoved:
        return BlockRemoved(
            block_hashes=list[BlockHash](digests), medium=self.medium, group_idx=self.spec.group_idx
        )


def stored_event(
    spec: KVGroupSpec,
    medium: str,
    digests: list[bytes],
    parent: bytes | None,
    token_ids: list[int],
    extras: RequestExtras,
    first_block_index: int,
) -> BlockStored:
    """BlockStored for consecutive blocks starting at `first_block_index` of a request."""
    keys = [extras.event_keys(first_block_index + i, spec.block_size) for i in range(len(digests))]
    return BlockStored(
        block_hashes=list[BlockHash](digests),
        parent_block_hash=parent,
        token_ids=token_ids,
        block_size=spec.block_size,
        lora_id=None,
        medium=medium,
        lora_name=extras.lora_name,
        # Like vLLM: one entry per block (None for a block without extras), never omitted.
        extra_keys=keys or None,
        group_idx=spec.group_idx,
        kv_cache_spec_kind=spec.kind,
        kv_cache_spec_sliding_window=spec.sliding_window,
    )


class CpuTier:
    """Optional CPU offload tier (medium "CPU"): a GPU block evicted from the prefix cache is
    copied here (BlockStored medium CPU) instead of being lost; the CPU tier has its own LRU
    (BlockRemoved medium CPU). A request's prefix continues from GPU hits into CPU hits."""

    def __init__(self, num_blocks: int, spec: KVGroupSpec) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_cpu_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.spec = spec
        self._lru: OrderedDict[bytes, None] = OrderedDict()

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    def is_cached(self, digest: bytes) -> bool:
        return digest in self._lru

    def store(self, digest: bytes, meta: BlockMeta) -> list[KVEvent]:
        if digest in self._lru:
            self._lru.move_to_end(digest)
            return []
        events: list[KVEvent] = []
        if len(self._lru) >= self.num_blocks:
            old, _ = self._lru.popitem(last=False)
            removed = BlockRemoved([old], MEDIUM_CPU, group_idx=self.spec.group_idx)
            events.append(removed)
        self._lru[digest] = None
        events.append(
            stored_event(
                self.spec,
                MEDIUM_CPU,
                [digest],
                meta.parent,
                list(meta.token_ids),
                meta.extras,
                meta.block_index,
            )
        )
        return events

    def longest_hit(self, digests: Sequence[bytes], start: int, limit: int) -> int:
        """Consecutive CPU hits from block `start` (exclusive of GPU hits), touching them."""
        hits = 0
        for digest in digests[start:limit]:
            if digest not in self._lru:
                break
            self._lru.move_to_end(digest)
            hits += 1
        return hits

    def reset(self) -> None:
        self._lru.clear()
