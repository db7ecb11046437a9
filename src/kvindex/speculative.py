"""Speculative entries: short-lived "engine E will soon hold these blocks" facts, recorded by a
router right after it sends a request to an engine, so that a burst of requests sharing a new
prefix sticks to that engine before its KV events arrive (llm-d's ``speculativeIndexing``).

Pure (no I/O), synchronous and thread-safe (one lock); the clock is injected. Entries live
``ttl_s`` seconds; expired entries are purged lazily (on every record and lookup, oldest
first), and the total is bounded by ``max_entries`` (oldest dropped first). Real index
entries take precedence in scoring (see :mod:`kvindex.scoring`): a speculative entry only
ever extends an engine's real match.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvindex.keys import ContentKey

__all__ = ["Clock", "SpeculativeConfig", "SpeculativeIndex", "SpeculativeStats"]

Clock = Callable[[], float]
"""Seconds, monotonic."""


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    ttl_s: float = 2.0  # llm-d's speculativeTTL default
    max_entries: int = 1_000_000  # (engine, key) pairs across all engines
    weight: float = 1.0  # tier weight of a speculative block in scores (as GPU by default)

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError(f"speculative ttl_s must be > 0, got {self.ttl_s}")
        if self.max_entries < 1:
            raise ValueError(f"speculative max_entries must be >= 1, got {self.max_entries}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"speculative weight must be in [0, 1], got {self.weight}")


@dataclass(frozen=True, slots=True)
class SpeculativeStats:
    entries: int
    recorded: int  # (engine, key) pairs recorded in total
    expired: int  # purged because their TTL passed
    dropped: int  # dropped by the max_entries bound


class SpeculativeIndex:
    """Per engine, content key -> expiry time, plus one queue of (expiry, engine, key) in
    record order. Every entry gets the same TTL, so the queue is in expiry order: purging pops
    from its front until the first live entry (queue items superseded by a re-record are
    skipped). Lookups are per engine, so they cost one dict probe per block."""

    def __init__(self, config: SpeculativeConfig | None = None, clock: Clock | None = None):
        self.config = config or SpeculativeConfig()
        self._clock = clock or time.monotonic
        # engine -> key -> (expiry, record number); the record number tells the queue item
        # of the newest record apart from those it superseded.
        self._by_engine: dict[str, dict[ContentKey, tuple[float, int]]] = {}
        self._queue: deque[tuple[float, int, str, ContentKey]] = deque()
        self._live = 0
        self._recorded = 0
        self._expired = 0
        self._dropped = 0
        # Edges call scoring from worker threads; one lock keeps the structures consistent.
        self._lock = threading.Lock()

    def record(self, engine: str, keys: Sequence[ContentKey]) -> int:
        """The engine was just sent a request whose prompt has these keys (from the first
        block on): it will hold them shortly. Returns the number of entries recorded."""
        with self._lock:
            now = self._clock()
            self._purge(now)
            expiry = now + self.config.ttl_s
            mine = self._by_engine.setdefault(engine, {})
            queue = self._queue
            number = self._recorded
            for key in keys:
                if key not in mine:
                    self._live += 1
                number += 1
                mine[key] = (expiry, number)
                queue.append((expiry, number, engine, key))
            self._recorded = number
            while self._live > self.config.max_entries:
                self._pop_front(dropping=True)
            return len(keys)

    def extend(self, engine: str, keys: Sequence[ContentKey], start: int = 0) -> int:
        """How many consecutive keys from ``keys[start]`` on the engine holds speculatively."""
        if not self._live:
            return 0
        with self._lock:
            now = self._clock()
            self._purge(now)
            mine = self._by_engine.get(engine)
            if not mine:
                return 0
            n = 0
            for position in range(start, len(keys)):
                entry = mine.get(keys[position])
                if entry is None or entry[0] <= now:
                    break
                n += 1
            return n

    def holds(self, engine: str, key: ContentKey) -> bool:
        """Whether the engine has a live speculative entry for ``key``."""
        return self.extend(engine, (key,)) == 1

    def engines(self) -> list[str]:
        """Engines with at least one live speculative entry."""
        with self._lock:
            self._purge(self._clock())
            return [engine for engine, mine in self._by_engine.items() if mine]

    def tracks(self, engine: str) -> bool:
        """Whether the engine may have entries (live or not yet purged): a cheap check before
        `forget` on every batch an engine publishes (one dict read, no lock: a stale answer
        only skips or spends one `forget`)."""
        return bool(self._by_engine.get(engine))

    def forget(self, engine: str, keys: Sequence[ContentKey]) -> None:
        """Drop entries the real index now confirms (they are irrelevant from here on); their
        queue items are skipped when they reach the front."""
        with self._lock:
            mine = self._by_engine.get(engine)
            if not mine:
                return
            for key in keys:
                if mine.pop(key, None) is not None:
                    self._live -= 1

    def purge_engine(self, engine: str) -> None:
        """Forget an engine entirely (it left discovery)."""
        with self._lock:
            mine = self._by_engine.pop(engine, None)
            if mine:
                self._live -= len(mine)

    def __len__(self) -> int:
        return self._live

    def stats(self) -> SpeculativeStats:
        with self._lock:
            self._purge(self._clock())
            return SpeculativeStats(self._live, self._recorded, self._expired, self._dropped)

    def _purge(self, now: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= now:
            self._pop_front(dropping=False)
        if not self._live and queue:
            queue.clear()  # only superseded items left
        if not self._live:
            self._by_engine.clear()

    def _pop_front(self, dropping: bool) -> None:
        expiry, number, engine, key = self._queue.popleft()
        mine = self._by_engine.get(engine)
        if mine is None or mine.get(key) != (expiry, number):
            return  # superseded by a later record of the same key, or forgotten
        del mine[key]
        if not mine:
            del self._by_engine[engine]
        self._live -= 1
        if dropping:
            self._dropped += 1
        else:
            self._expired += 1
