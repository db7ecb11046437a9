"""One simulated engine's KV cache: a fixed number of blocks, blocks referenced by running
requests pinned, unreferenced cached blocks evicted least recently used first.

Like vLLM, a finished request releases its blocks last block first, so the tail of a prompt
is evicted before its (more shareable) head. Every change a KV-event publisher would announce
is returned to the caller: keys newly stored, keys evicted.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvindex.keys import ContentKey

__all__ = ["EngineKV"]


class EngineKV:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity must be at least one block")
        self.capacity = capacity_blocks
        self._refs: dict[ContentKey, int] = {}  # cached key -> running requests using it
        self._lru: dict[ContentKey, None] = {}  # unreferenced cached keys, oldest first
        self.reserved = 0  # blocks allocated to running requests but not cached (yet)
        self.evicted = 0
        self.stored = 0

    # -- views -------------------------------------------------------------------------------

    def cached_prefix(self, keys: Sequence[ContentKey]) -> int:
        """How many leading blocks of ``keys`` are cached."""
        refs = self._refs
        n = 0
        for key in keys:
            if key not in refs:
                break
            n += 1
        return n

    @property
    def cached_blocks(self) -> int:
        return len(self._refs)

    def used(self) -> int:
        return len(self._refs) + self.reserved

    def usage(self) -> float:
        """KV usage as vLLM reports it: blocks held by running requests over capacity
        (cached but unreferenced blocks count as free)."""
        return min(1.0, (len(self._refs) - len(self._lru) + self.reserved) / self.capacity)

    def fits(self, keys: Sequence[ContentKey], hits: int, extra: int) -> bool:
        """Could a request with these keys (``hits`` of them cached) and ``extra`` uncached
        blocks (its output) be admitted now, evicting as needed?"""
        need = len(keys) - hits + extra
        pinned_hits = sum(1 for key in keys[:hits] if self._refs[key] == 0)
        free = self.capacity - self.used()
        return need <= free + len(self._lru) - pinned_hits

    # -- changes -----------------------------------------------------------------------------

    def admit(self, keys: Sequence[ContentKey], hits: int, extra: int) -> list[ContentKey]:
        """Pin the cached prefix, reserve the rest; returns the keys evicted to make room."""
        refs, lru = self._refs, self._lru
        for key in keys[:hits]:
            if refs[key] == 0:
                del lru[key]
            refs[key] += 1
        self.reserved += len(keys) - hits + extra
        return self._evict_to(self.capacity)

    def commit(self, keys: Sequence[ContentKey], hits: int) -> list[int]:
        """The prefill finished: its blocks are cached (pinned). Returns the positions (in
        ``keys``) of the blocks newly stored."""
        refs, lru = self._refs, self._lru
        stored: list[int] = []
        for position in range(hits, len(keys)):
            key = keys[position]
            count = refs.get(key)
            if count is None:
                refs[key] = 1
                stored.append(position)
            else:  # cached meanwhile by another request
                if count == 0:
                    del lru[key]
                refs[key] = count + 1
        self.reserved -= len(keys) - hits
        self.stored += len(stored)
        return stored

    def release(self, keys: Sequence[ContentKey], extra: int) -> list[ContentKey]:
        """The request finished: unpin its blocks (last first) and free its output blocks.
        Returns keys evicted because an oversized request had overcommitted the cache."""
        refs, lru = self._refs, self._lru
        for key in reversed(keys):
            count = refs[key] - 1
            refs[key] = count
            if count == 0:
                lru[key] = None
        self.reserved -= extra
        return self._evict_to(self.capacity)

    def _evict_to(self, limit: int) -> list[ContentKey]:
        excess = len(self._refs) + self.reserved - limit
        if excess <= 0 or not self._lru:
            return []
        victims: list[ContentKey] = []
        lru, refs = self._lru, self._refs
        for key in lru:
            victims.append(key)
            if len(victims) >= excess:
                break
        for key in victims:
            del lru[key]
            del refs[key]
        self.evicted += len(victims)
        return victims
