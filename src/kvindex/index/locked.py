"""A :class:`BlockIndex` wrapper that serialises calls with one lock.

The ingest thread writes while request handlers (HTTP, gRPC) read; the in-memory index is
plain dicts, so concurrent iteration during a write could fail. Every call takes the lock,
which is held for one batch apply or one lookup (both short).

A backend that is thread-safe by itself declares ``thread_safe = True`` (the Redis backend:
each call is one atomic script over a connection pool); then no lock is taken, so lookups
waiting on Redis round trips run concurrently instead of queueing behind each other and
behind the ingest thread's writes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Sequence
from typing import Any

from kvindex.index.base import BlockIndex, IndexOp, IndexStats, PrefixMatch
from kvindex.keys import ContentKey
from kvindex.wire import EngineHash

__all__ = ["LockedIndex"]


class LockedIndex:
    def __init__(self, inner: BlockIndex) -> None:
        self.inner = inner
        self.lock: Any = (
            contextlib.nullcontext() if getattr(inner, "thread_safe", False) else threading.RLock()
        )

    def apply(self, engine: str, ops: Sequence[IndexOp]) -> None:
        with self.lock:
            self.inner.apply(engine, ops)

    def resolve(self, engine: str, engine_hash: EngineHash) -> ContentKey | None:
        with self.lock:
            return self.inner.resolve(engine, engine_hash)

    def lookup(
        self, keys: Sequence[ContentKey], engines: Collection[str] | None = None
    ) -> dict[str, PrefixMatch]:
        with self.lock:
            return self.inner.lookup(keys, engines)

    def purge(self, engine: str) -> None:
        with self.lock:
            self.inner.purge(engine)

    def engines(self) -> list[str]:
        with self.lock:
            return self.inner.engines()

    def stats(self) -> IndexStats:
        with self.lock:
            return self.inner.stats()

    def health(self) -> str | None:
        """The inner backend's health report (None: healthy), if it has one."""
        check = getattr(self.inner, "health", None)
        return None if check is None else check()  # type: ignore[no-any-return]

    def age_copies(self) -> None:
        """The inner index's copy clock tick, if it counts copies (docs/index.md)."""
        age = getattr(self.inner, "age_copies", None)
        if age is not None:
            with self.lock:
                age()

    def close(self) -> None:
        """Release the inner backend's connections, if it has any (the Redis backend)."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
