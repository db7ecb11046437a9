"""``--backend redis`` for the service: a :class:`RedisIndex` behind the service's backend
interface (``health() -> str | None`` for ``/readyz``) and its health as metrics. Both are
built by :func:`kvindex.index.make_index` (``IndexConfig(backend="redis")``), the one place
index backends are made.

Writer model (docs/redis.md, "Writer model"): every replica writes. Each replica subscribes
to every engine and applies its batches; writes are set-like and atomic, so N replicas
applying the same stream converge on the same state. No lease, so no failover gap.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvindex.index.base import IndexOp, IndexStats, PrefixMatch
from kvindex.index.redis import IndexHealth, RedisIndex, ResetCallback
from kvindex.keys import ContentKey
from kvindex.metrics import PREFIX
from kvindex.wire import EngineHash

__all__ = ["RedisBackend", "RedisHealthCollector"]


class RedisBackend:
    """A :class:`RedisIndex` as the service's index: same calls, plus ``health()`` as a
    reason string (None: healthy) and the full :class:`IndexHealth` as ``details()``."""

    thread_safe = True  # LockedIndex takes no lock: RedisIndex is safe across threads

    def __init__(self, index: RedisIndex) -> None:
        self.redis = index

    def apply(self, engine: str, ops: Sequence[IndexOp]) -> None:
        self.redis.apply(engine, ops)

    def resolve(self, engine: str, engine_hash: EngineHash) -> ContentKey | None:
        return self.redis.resolve(engine, engine_hash)

    def lookup(
        self, keys: Sequence[ContentKey], engines: Collection[str] | None = None
    ) -> dict[str, PrefixMatch]:
        return self.redis.lookup(keys, engines)

    def purge(self, engine: str) -> None:
        self.redis.purge(engine)

    def engines(self) -> list[str]:
        return self.redis.engines()

    def stats(self) -> IndexStats:
        return self.redis.stats()

    def on_reset(self, callback: ResetCallback) -> None:
        self.redis.on_reset(callback)

    def details(self) -> IndexHealth:
        return self.redis.health()

    def health(self) -> str | None:
        health = self.redis.health()
        if health.ok:
            return None
        return f"redis degraded: {health.reason} (scores are empty until it is back)"

    def close(self) -> None:
        self.redis.close()


class RedisHealthCollector(Collector):
    """``kvindex_index_degraded`` (0/1) and the Redis fault counters, read at scrape time."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        health = self._backend.details()
        yield GaugeMetricFamily(
            PREFIX + "index_degraded",
            "1 while the index backend is unreachable (reads empty, writes refused)",
            0 if health.ok else 1,
        )
        yield CounterMetricFamily(
            PREFIX + "index_resets",
            "Times the Redis index lost its data (epoch changes): full replays",
            health.resets,
        )
        yield CounterMetricFamily(
            PREFIX + "index_failed_applies",
            "Batches the Redis index could not apply",
            health.failed_applies,
        )
        yield CounterMetricFamily(
            PREFIX + "index_failed_reads",
            "Reads answered empty because Redis was down",
            health.failed_reads,
        )

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return []
