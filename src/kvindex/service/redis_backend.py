"""``--backend redis`` for the service: a :class:`RedisIndex` behind the service's backend
interface (``health() -> str | None`` for ``/readyz``) and its health as metrics. Both are
built by :func:`kvindex.index.make_index` (``IndexConfig(backend="redis")``), the one place
index backends are made.

Writer model (docs/redis.md, "Writer model"): ``--redis-writers all`` (default): every
replica writes every engine; ``leased``: one writer per engine stream
(:class:`kvindex.index.redis_lease.EngineLeases`, driven by the ingest service).

Writes (docs/redis.md, "Writes"): with ``write_queue`` > 0, ``apply`` enqueues the batch and
returns; a writer thread sends up to ``pipeline`` queued batches per pipeline (one round trip
per shard). The queue is bounded: when it is full ``apply`` blocks (back-pressure reaches
ingest, so a slow Redis shows as apply lag, never as silent loss). A batch Redis refused is
reported by the next ``apply`` of its engine (IndexUnavailable / NotWriter), so ingest
replays it. ``resolve`` first waits for the queue to drain (read your own writes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Collection, Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from kvindex.index.base import IndexOp, IndexStats, PrefixMatch
from kvindex.index.redis import IndexHealth, IndexUnavailable, NotWriter, RedisIndex, ResetCallback
from kvindex.index.redis_schema import StreamPosition
from kvindex.keys import ContentKey
from kvindex.metrics import PREFIX, RedisWriteMetrics
from kvindex.threads import named_thread
from kvindex.wire import EngineHash

__all__ = ["RedisBackend", "RedisHealthCollector", "RegistryBridge", "WriteQueue"]

log = logging.getLogger(__name__)

_Item = tuple[str, Sequence[IndexOp], StreamPosition | None, float]  # engine, ops, position, at


class WriteQueue:
    """Bounded write-behind queue drained by one thread in pipelines (see module doc)."""

    def __init__(
        self,
        index: RedisIndex,
        *,
        limit: int = 4096,
        pipeline: int = 128,
        metrics: RedisWriteMetrics | None = None,
    ) -> None:
        self.index = index
        self.limit = max(1, limit)
        self.pipeline = max(1, pipeline)
        self.metrics = metrics or RedisWriteMetrics()
        self.metrics.queue_limit.set(self.limit)
        self._items: deque[_Item] = deque()
        self._busy = 0  # items taken by the writer thread, not yet written
        self._cond = threading.Condition()
        self._failed: dict[str, IndexUnavailable] = {}
        self._stop = False
        self._thread = named_thread(self._run, "kvindex-redis-writer")
        self._thread.start()

    def put(self, engine: str, ops: Sequence[IndexOp], position: StreamPosition | None) -> None:
        with self._cond:
            failed = self._failed.pop(engine, None)
            if failed is not None:
                raise failed
            if len(self._items) >= self.limit:
                waited = time.monotonic()
                while len(self._items) >= self.limit and not self._stop:
                    self._cond.wait(0.5)
                self.metrics.backpressure.inc(time.monotonic() - waited)
            self._items.append((engine, ops, position, time.monotonic()))
            self.metrics.queue_depth.set(len(self._items))
            self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued batch was sent; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._items or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def take_failures(self) -> dict[str, IndexUnavailable]:
        """Engines whose queued batches Redis refused since the last call (each reported
        once, here or by the engine's next ``put``)."""
        with self._cond:
            failed, self._failed = self._failed, {}
        return failed

    def depth(self) -> int:
        with self._cond:
            return len(self._items) + self._busy

    def close(self) -> None:
        self.flush(5.0)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stop:
                    self._cond.wait()
                if self._stop and not self._items:
                    return
                n = min(self.pipeline, len(self._items))
                batch = [self._items.popleft() for _ in range(n)]
                self._busy = n
                self.metrics.queue_depth.set(len(self._items))
                self._cond.notify_all()
            self._write(batch)
            with self._cond:
                self._busy = 0
                self._cond.notify_all()

    def _write(self, batch: list[_Item]) -> None:
        try:
            results = self.index.apply_many([(e, ops, pos) for e, ops, pos, _ in batch])
        except IndexUnavailable as exc:
            self.metrics.failed.labels("unavailable").inc(len(batch))
            with self._cond:
                for engine, *_ in batch:
                    self._failed.setdefault(engine, exc)
            return
        except Exception as exc:  # a bug must not kill the writer thread silently
            log.exception("redis write pipeline failed")
            with self._cond:
                for engine, *_ in batch:
                    self._failed.setdefault(engine, IndexUnavailable(repr(exc)))
            return
        self.metrics.pipelines.inc()
        self.metrics.batches.inc(len(batch))
        now = time.monotonic()
        lag: dict[str, float] = {}
        for (engine, _, _, enqueued), result in zip(batch, results, strict=True):
            if result is None:
                lag[engine] = now - enqueued
                continue
            self.metrics.failed.labels(
                "not_writer" if isinstance(result, NotWriter) else "unavailable"
            ).inc()
            with self._cond:
                self._failed.setdefault(engine, result)
        for engine, seconds in lag.items():
            self.metrics.apply_lag.labels(engine).set(seconds)


class RedisBackend:
    """A :class:`RedisIndex` as the service's index: same calls, plus ``health()`` as a
    reason string (None: healthy) and the full :class:`IndexHealth` as ``details()``."""

    thread_safe = True  # LockedIndex takes no lock: RedisIndex is safe across threads

    def __init__(
        self,
        index: RedisIndex,
        *,
        write_queue: int = 0,
        pipeline: int = 128,
        metrics: RedisWriteMetrics | None = None,
    ) -> None:
        self.redis = index
        self.metrics = metrics or RedisWriteMetrics()
        self.queue: WriteQueue | None = None
        if write_queue > 0:
            self.queue = WriteQueue(
                index, limit=write_queue, pipeline=pipeline, metrics=self.metrics
            )

    def apply(self, engine: str, ops: Sequence[IndexOp]) -> None:
        if self.queue is None:
            self.redis.apply(engine, ops)
            return
        position = self.redis.take_position(engine)
        if ops or position is not None:
            self.queue.put(engine, ops, position)

    def note_position(self, engine: str, seq: int, digest: int | None = None) -> None:
        """The engine's stream position, recorded with its next write (docs/redis.md)."""
        self.redis.note_position(engine, seq, digest)

    def flush(self, timeout: float = 10.0) -> bool:
        return True if self.queue is None else self.queue.flush(timeout)

    def take_write_failures(self) -> dict[str, IndexUnavailable]:
        """Engines whose queued writes failed (ingest replays them: rule 1)."""
        return {} if self.queue is None else self.queue.take_failures()

    def resolve(self, engine: str, engine_hash: EngineHash) -> ContentKey | None:
        if self.queue is not None:
            self.queue.flush()
        return self.redis.resolve(engine, engine_hash)

    def age_copies(self) -> None:
        self.redis.age_copies()

    def lookup(
        self, keys: Sequence[ContentKey], engines: Collection[str] | None = None
    ) -> dict[str, PrefixMatch]:
        return self.redis.lookup(keys, engines)

    def purge(self, engine: str) -> None:
        if self.queue is not None:
            self.queue.flush()
        self.redis.purge(engine)
        self.metrics.forget_engine(engine)

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
        if self.queue is not None:
            self.queue.close()
        self.redis.close()


class RegistryBridge(Collector):
    """Exposes the metrics of another registry (the backend's write metrics) on the
    service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        yield from self._registry.collect()

    def describe(self) -> Iterable[Metric]:
        return []


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
