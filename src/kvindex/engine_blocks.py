"""Each engine's KV block size, learnt from its events, and what an engine can really reuse.

The index keys prompts in canonical blocks (``--block-size``, 16 tokens by default, as llm-d),
but an engine caches and reuses whole blocks of its own size (vLLM's ``--block-size``: 16 or
64 on GPUs, multiples of 32 on CPUs), and vLLM never reuses the block that holds the prompt's
last token (it must compute that token's logits). Every ``BlockStored`` event names its
``block_size``, so the ingest side learns each engine's size here and the scorer rounds a
match down to what the engine would actually reuse: never assumed, never over-counted.

An engine whose block size the canonical size does not divide cannot be indexed at all (its
blocks are skipped as ``block_size_not_multiple``); it is listed here so the service reports it
(a WARNING once, ``/v1/debug``, ``kvindex doctor``, a gauge) instead of scoring it 0 silently.

Writers: the ingest thread. Readers: scoring threads. Reads and writes are single dict
operations (atomic under the GIL); the maps are bounded by the engines ingest tracks.
"""

from __future__ import annotations

from collections.abc import Callable

from kvindex.engines import MAX_ENGINES_LIMIT

__all__ = ["EngineBlockSizes", "EngineResidency", "reusable_blocks", "unindexable_message"]


def unindexable_message(engine: str, size: int, canonical: int) -> str:
    """What to tell the operator about an engine whose blocks cannot be indexed."""
    return (
        f"engine {engine} uses {size}-token KV blocks, which the index's {canonical}-token "
        "blocks cannot divide: its blocks are skipped and it scores 0; set the index's block "
        f"size (--block-size / blockSizeTokens) to a divisor of {size}, e.g. 16"
    )


def reusable_blocks(
    matched: int, canonical: int, engine_block: int, prompt_tokens: int | None
) -> int:
    """Canonical blocks of a ``matched``-block prefix match that the engine can reuse: whole
    engine blocks only, and never the engine block holding the prompt's last token.

    ``prompt_tokens`` None: the prompt is known to extend past the matched blocks (no cap)."""
    ratio = engine_block // canonical
    whole = matched // ratio
    if prompt_tokens is not None:
        whole = min(whole, max(prompt_tokens - 1, 0) // engine_block)
    return whole * ratio


class EngineBlockSizes:
    """engine -> its block size in tokens (the largest of its indexed KV-cache groups), and the
    engines whose block size ``canonical`` cannot divide."""

    def __init__(self, canonical: int, max_engines: int = MAX_ENGINES_LIMIT) -> None:
        if canonical < 1:
            raise ValueError(f"canonical block size must be >= 1, got {canonical}")
        self.canonical = canonical
        self._max = max_engines
        self._sizes: dict[str, int] = {}
        self._incompatible: dict[str, int] = {}
        # Called once per engine found unindexable (engine, its size, canonical): the edges
        # set it to log the fix.
        self.on_unindexable: Callable[[str, int, int], None] | None = None

    def learn(self, engine: str, size: int) -> bool:
        """Record a block size seen in ``engine``'s events; True the first time it is seen to
        be one the canonical size cannot divide (the caller warns once)."""
        if size % self.canonical:
            if engine in self._incompatible:
                return False
            if len(self._incompatible) >= self._max:
                return False
            self._incompatible[engine] = size
            if self.on_unindexable is not None:
                self.on_unindexable(engine, size, self.canonical)
            return True
        if size > self._sizes.get(engine, 0):
            if engine not in self._sizes and len(self._sizes) >= self._max:
                return False
            self._sizes[engine] = size
        return False

    def get(self, engine: str) -> int | None:
        return self._sizes.get(engine)

    def incompatible(self) -> dict[str, int]:
        """engine -> block size that cannot be indexed with this canonical size."""
        return dict(self._incompatible)

    def forget(self, engine: str) -> None:
        """The engine left or restarted (it may come back with another block size)."""
        self._sizes.pop(engine, None)
        self._incompatible.pop(engine, None)

    def reusable(self, engine: str, matched: int, prompt_tokens: int | None) -> int:
        """`reusable_blocks` with ``engine``'s learnt block size (canonical until known)."""
        size = self._sizes.get(engine, self.canonical)
        return reusable_blocks(matched, self.canonical, size, prompt_tokens)


class EngineResidency:
    """How many KV blocks (in the engine's own block size) each engine holds on its GPU,
    counted from its event stream: blocks stored minus blocks removed, back to 0 when it
    clears its cache, restarts or leaves. vLLM announces each physical block it caches once
    and each one it evicts once, so this is what the engine's prefix cache holds; hits
    reported again (``kv_cache_report_mode`` full: a chain from the root whose first block is
    held) are not counted. Blocks stored before the index first heard from an engine and
    never replayed are missing (it counts low; readers cap it at the engine's capacity when
    it counts high). A router compares it with the engine's capacity (``num_gpu_blocks``) to
    know where a new prefix fits without evicting anything.

    Writers: the ingest thread. Readers: scoring threads (single dict reads)."""

    def __init__(self, max_engines: int = MAX_ENGINES_LIMIT) -> None:
        self._blocks: dict[str, int] = {}
        self._max_engines = max_engines

    def add(self, engine: str, stored: int, removed: int) -> None:
        if engine not in self._blocks and len(self._blocks) >= self._max_engines:
            return  # bounded: ingest tracks at most this many engines anyway
        self._blocks[engine] = max(0, self._blocks.get(engine, 0) + stored - removed)

    def clear(self, engine: str) -> None:
        if engine in self._blocks:  # an engine not tracked (the bound) stays untracked
            self._blocks[engine] = 0

    def forget(self, engine: str) -> None:
        self._blocks.pop(engine, None)

    def get(self, engine: str) -> int | None:
        """Blocks held, or None when nothing was ever seen from ``engine``."""
        return self._blocks.get(engine)
