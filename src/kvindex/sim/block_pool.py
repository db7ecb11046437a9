"""A prefix-cache block pool like vLLM's (pure: returns events, does no I/O).

* Physical blocks with reference counts; full blocks are registered under their vLLM digest.
* A request reuses the longest cached prefix of its full prompt blocks (capped so at least
  one prompt token is computed, as vLLM does) and takes new blocks from the free queue.
* Free blocks form an LRU queue (OrderedDict, oldest first). A cached block stays cached
  while free; when it is taken for reuse its digest is dropped and BlockRemoved is emitted.
  A finished request's blocks are appended tail-first, so a chain's tail is evicted first.
* Deviation from vLLM (documented in docs/simulator.md): a request reserves all blocks for
  prompt + max_tokens at admission instead of growing step by step (no preemption).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvindex.sim.events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from kvindex.vllm_hash import RequestExtras


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    digest: bytes | None = None


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
    def __init__(self, num_blocks: int, spec: KVGroupSpec, medium: str = MEDIUM_GPU) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.spec = spec
        self.medium = medium
        self.num_blocks = num_blocks
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self._blocks)
        self._cached: dict[bytes, Block] = {}

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

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
        free_hits = sum(1 for d in digests[:hits] if self._cached[d].ref_cnt == 0)
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
            block = self._cached[digest]
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
            blocks.append(block)
        events: list[KVEvent] = []
        evicted: list[bytes] = []
        for _ in range(self.blocks_needed(total_tokens) - hits):
            _, block = self._free.popitem(last=False)
            if block.digest is not None:
                if self._cached.get(block.digest) is block:
                    del self._cached[block.digest]
                evicted.append(block.digest)
                block.digest = None
            block.ref_cnt = 1
            blocks.append(block)
        if evicted:
            events.append(self._removed(evicted))
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
        for i in range(start, end):
            block = alloc.blocks[i]
            if block.digest is None and digests[i] not in self._cached:
                block.digest = digests[i]
                self._cached[digests[i]] = block
        alloc.num_cached_blocks = max(end, start)
        parent = digests[first - 1] if first > 0 else None
        bs = self.block_size
        extras = alloc.extras
        event_keys = [extras.event_keys(i, bs) for i in range(first, end)]
        return [
            BlockStored(
                block_hashes=list(digests[first:end]),
                parent_block_hash=parent,
                token_ids=list(token_ids[first * bs : end * bs]),
                block_size=bs,
                lora_id=None,
                medium=self.medium,
                lora_name=extras.lora_name,
                extra_keys=None if all(k is None for k in event_keys) else event_keys,
                group_idx=self.spec.group_idx,
                kv_cache_spec_kind=self.spec.kind,
                kv_cache_spec_sliding_window=self.spec.sliding_window,
            )
        ]

    def free(self, alloc: Allocation) -> None:
        """Release a finished request; tail blocks become the first eviction candidates."""
        for block in reversed(alloc.blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
        alloc.blocks = []

    def reset(self) -> list[KVEvent]:
        """Forget every cached digest (POST /reset_prefix_cache)."""
        for block in self._blocks:
            block.digest = None
        self._cached.clear()
        return [AllBlocksCleared()]

    def _removed(self, digests: list[bytes]) -> BlockRemoved:
        return BlockRemoved(
            block_hashes=list[BlockHash](digests), medium=self.medium, group_idx=self.spec.group_idx
        )
