"""Exact result cache for remote tokenizers (the tokenizer sidecar, the engine's /tokenize):
a call's ids keyed by everything the call sends. A remote tokenizer's vocabulary is not known
here, so the segment cache cannot cut its texts; identical calls (a retried or repeated
prompt, a conversation scored again) are answered from memory instead, bounded by the same
`TokenizationCacheConfig.max_bytes` and counted in the same `CacheStats`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from kvindex.tokenize.cache_config import TokenizationCacheConfig
from kvindex.tokenize.segments import CacheStats, SegmentLRU


class ResultCache:
    """`await cache.get_or(key_parts, fetch)`: the cached ids of an identical earlier call,
    or `fetch()`'s (stored). Thread-safe (the LRU locks); failures are never stored."""

    def __init__(self, config: TokenizationCacheConfig | None) -> None:
        config = config or TokenizationCacheConfig()
        self._lru = SegmentLRU(config.max_bytes) if config.enabled else None
        self._uncached = CacheStats()

    async def get_or(self, key_parts: Any, fetch: Callable[[], Awaitable[list[int]]]) -> list[int]:
        if self._lru is None:
            self._uncached.uncached_calls += 1
            return await fetch()
        key = json.dumps(key_parts, sort_keys=True, ensure_ascii=False, default=str)
        hit = self._lru.get(key)
        if hit is not None:
            return list(hit)
        ids = await fetch()
        self._lru.put(key, tuple(ids))
        return ids

    def stats(self) -> CacheStats:
        if self._lru is None:
            return CacheStats(uncached_calls=self._uncached.uncached_calls)
        s = self._lru.stats
        return CacheStats(
            hits=s.hits, misses=s.misses, evictions=s.evictions, entries=s.entries, bytes=s.bytes
        )
