"""Prometheus metrics of the kvindex service: every metric name lives here.

One :class:`KvindexMetrics` per service, on a registry the service owns (never the global
default registry, so several services can run in one process, e.g. in tests). Index size
metrics are collected from ``index.stats()`` at scrape time rather than updated on the hot
path. The score / gRPC layer uses the ``score_*`` metrics defined here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvindex.engine_blocks import EngineBlockSizes
from kvindex.index.base import IndexStats
from kvindex.ingest import IngestCounts
from kvindex.sync import SyncState

__all__ = [
    "PREFIX",
    "EngineSeries",
    "IndexStatsCollector",
    "KvindexMetrics",
    "RedisWriteMetrics",
    "TokenizerCacheCollector",
]

PREFIX = "kvindex_"

_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class IndexStatsCollector(Collector):
    """Reads ``index.stats()`` when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], IndexStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        try:
            stats = self._stats()
        except Exception:  # a degraded backend must not break /metrics
            return
        yield GaugeMetricFamily(
            PREFIX + "index_keys", "Distinct content keys held by any engine", stats.keys
        )
        yield GaugeMetricFamily(
            PREFIX + "index_entries", "(key, engine, tier) entries in the index", stats.entries
        )
        yield GaugeMetricFamily(
            PREFIX + "index_engines", "Engines holding at least one block", stats.engines
        )
        yield GaugeMetricFamily(
            PREFIX + "index_bytes", "Estimated bytes held by the index", stats.approx_bytes
        )
        yield CounterMetricFamily(
            PREFIX + "index_evictions", "Keys evicted by the capacity bound", stats.evictions
        )

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return []


# (CacheStats field, metric name after PREFIX, help, is a counter) of TokenizerCacheCollector.
_TOKENIZER_CACHE_METRICS = (
    ("hits", "tokenizer_cache_hits", "Segment cache hits", True),
    ("misses", "tokenizer_cache_misses", "Segment cache misses", True),
    ("evictions", "tokenizer_cache_evictions", "Segment cache evictions", True),
    (
        "uncached_calls",
        "tokenizer_uncached_calls",
        "Prompts tokenized whole (cache exactness not shown)",
        True,
    ),
    ("entries", "tokenizer_cache_entries", "Segment cache entries", False),
    ("bytes", "tokenizer_cache_bytes", "Segment cache bytes (approx.)", False),
    (
        "prefix_hits",
        "tokenizer_prefix_hits",
        "Prompts whose long prefix came from the prefix memo",
        True,
    ),
    ("prefix_entries", "tokenizer_prefix_entries", "Prefix memo entries", False),
    ("prefix_bytes", "tokenizer_prefix_bytes", "Prefix memo bytes (approx.)", False),
)


class TokenizerCacheCollector(Collector):
    """The tokenizers' segment-cache counters by model, read at scrape time. ``stats``
    returns model -> an object with ``hits``, ``misses``, ``evictions``, ``entries``,
    ``bytes``, ``uncached_calls`` and the ``prefix_*`` memo figures
    (``kvindex.tokenize.CacheStats``)."""

    def __init__(self, stats: Callable[[], dict[str, object]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        try:
            by_model = self._stats()
        except Exception:  # a broken tokenizer must not break /metrics
            return
        families = [
            (CounterMetricFamily if counter else GaugeMetricFamily)(
                PREFIX + name, help_text, labels=["model"]
            )
            for _, name, help_text, counter in _TOKENIZER_CACHE_METRICS
        ]
        for model, stats in sorted(by_model.items()):
            for family, (field, *_) in zip(families, _TOKENIZER_CACHE_METRICS, strict=True):
                family.add_metric([model], float(getattr(stats, field, 0)))
        yield from families

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return []


@dataclass(frozen=True, slots=True)
class EngineSeries:
    last_seq: Gauge
    lag: Gauge
    pending: Gauge
    last_batch_time: Gauge


class KvindexMetrics:
    """All metric objects of one service."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = PREFIX
        # -- ingest: frames and payloads --------------------------------------------------
        self.batches = Counter(p + "ingest_batches", "Event batches applied", registry=r)
        self.events = Counter(p + "ingest_events", "Events applied, by type", ["type"], registry=r)
        self.unknown_events = Counter(
            p + "ingest_unknown_events", "Events of an unknown type, skipped", registry=r
        )
        self.decode_errors = Counter(
            p + "ingest_decode_errors",
            "Payloads or events that could not be decoded, by kind",
            ["kind"],
            registry=r,
        )
        self.malformed_frames = Counter(
            p + "ingest_malformed_frames",
            "Multipart messages that are not KV-event messages, by reason",
            ["reason"],
            registry=r,
        )
        self.refused_batches = Counter(
            p + "ingest_refused_batches",
            "Batches refused before any state was kept for them, by reason: unknown_engine "
            "(no discovery names the topic's engine; --accept-any-engine accepts it), "
            "wrong_peer (published from another address than the topic's engine), "
            "engine_limit (max_engines reached by discovered engines), topic_too_long",
            ["reason"],
            registry=r,
        )
        self.refused_peers = Counter(
            p + "ingest_refused_peers",
            "CURVE clients refused at the handshake: their key is not in --zmq-curve-clients",
            registry=r,
        )
        self.topic_without_port = Counter(
            p + "ingest_topic_without_port",
            "Batches whose topic names no port (indexed under the bare host: will not match "
            "the picker's ip:port endpoints)",
            ["engine"],
            registry=r,
        )
        # -- ingest: sequence handling -----------------------------------------------------
        self.gaps = Counter(p + "ingest_seq_gaps", "Sequence gaps detected", registry=r)
        self.lost_batches = Counter(
            p + "ingest_lost_batches", "Batches lost for good (not repaired by replay)", registry=r
        )
        self.resyncs = Counter(
            p + "ingest_resyncs",
            "Engines cleared and rebuilt from their replay buffer because a gap reached past it",
            registry=r,
        )
        self.seq_conflicts = Counter(
            p + "ingest_seq_conflicts",
            "Two different batches with one seq on an engine's stream (another publisher): the "
            "engine was cleared and rebuilt",
            registry=r,
        )
        self.duplicate_batches = Counter(
            p + "ingest_duplicate_batches", "Batches already applied, dropped", registry=r
        )
        self.replays = Counter(
            p + "ingest_replays",
            "Replay requests by reason (gap, unknown_parent, index_recovery, index_reset) and "
            "outcome (requested, "
            "succeeded, failed)",
            ["reason", "outcome"],
            registry=r,
        )
        self.replayed_batches = Counter(
            p + "ingest_replayed_batches", "Batches received by replay and applied", registry=r
        )
        self.resets = Counter(
            p + "ingest_resets", "Engine restarts detected (seq back to 0)", registry=r
        )
        # -- ingest: blocks ------------------------------------------------------------------
        self.stored_blocks = Counter(p + "ingest_stored_blocks", "Blocks stored", registry=r)
        self.removed_blocks = Counter(p + "ingest_removed_blocks", "Blocks removed", registry=r)
        self.skipped_blocks = Counter(
            p + "ingest_skipped_blocks", "Blocks not indexed, by reason", ["reason"], registry=r
        )
        self.resolved_pending = Counter(
            p + "ingest_resolved_pending",
            "Held events applied once their parent arrived",
            registry=r,
        )
        self.pending = Gauge(
            p + "ingest_pending_events",
            "Events held for an unknown parent, per engine",
            ["engine"],
            registry=r,
        )
        self.lag = Gauge(
            p + "ingest_lag_seconds",
            "Now minus the newest applied batch's timestamp, per engine",
            ["engine"],
            registry=r,
        )
        self.lag_histogram = Histogram(
            p + "ingest_batch_lag_seconds",
            "Now minus batch timestamp when applied",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.last_seq = Gauge(
            p + "ingest_last_seq",
            "Newest applied sequence number, per engine",
            ["engine"],
            registry=r,
        )
        self.last_batch_time = Gauge(
            p + "ingest_last_batch_timestamp_seconds",
            "Unix time the newest batch of the engine was applied (staleness alerts)",
            ["engine"],
            registry=r,
        )
        self.internal_errors = Counter(
            p + "ingest_internal_errors",
            "Unexpected exceptions caught in the ingest loop (a bug: see the logs)",
            registry=r,
        )
        self.sources = Gauge(
            p + "ingest_sources", "Subscriber sockets open, by mode", ["mode"], registry=r
        )
        # -- discovery -------------------------------------------------------------------------
        self.discovered_engines = Gauge(
            p + "discovery_engines", "Engines currently discovered", registry=r
        )
        self.discovery_errors = Counter(
            p + "discovery_errors", "Discovery failures, by source", ["source"], registry=r
        )
        self.purges = Counter(
            p + "discovery_purges", "Engines purged after leaving discovery", registry=r
        )
        self.engines_evicted = Counter(
            p + "ingest_engines_evicted",
            "Undiscovered engines dropped, entries and all, to make room for a new engine "
            "under max_engines (least recently active first)",
            registry=r,
        )
        # -- index faults (docs/redis.md): engines recovering while the index is down --------
        self.index_unavailable = Counter(
            p + "ingest_index_unavailable",
            "Batches the index refused (Redis down); the engine is replayed once it is back",
            registry=r,
        )
        self.deferred_batches = Counter(
            p + "ingest_deferred_batches",
            "Live batches not applied while their engine waited for the index (replayed)",
            registry=r,
        )
        # -- per-engine sync state (kvindex.sync) ----------------------------------------------
        self.engine_sync_state = Gauge(
            p + "engine_sync_state",
            "1 for the engine's current sync state (unsynced, replaying, synced, degraded), 0 "
            "for the others; entries of unsynced and replaying engines are withheld from "
            "scores (or down-weighted)",
            ["engine", "state"],
            registry=r,
        )
        # -- engine block sizes (kvindex.engine_blocks) ----------------------------------------
        self.engines_block_size_unindexable = Gauge(
            p + "engines_block_size_unindexable",
            "Engines whose KV block size the canonical --block-size cannot divide: their "
            "blocks are skipped (block_size_not_multiple) and they score 0",
            registry=r,
        )
        # The read path's metrics (kvindex_score_*) are ScoreMetrics on this same registry.

        self._event_children: dict[str, Counter] = {}
        self._skip_children: dict[str, Counter] = {}

    def engine_series(self, engine: str) -> EngineSeries:
        """The per-engine gauges of one engine (cache it: see add_counts)."""
        return EngineSeries(
            self.last_seq.labels(engine),
            self.lag.labels(engine),
            self.pending.labels(engine),
            self.last_batch_time.labels(engine),
        )

    def watch_index(self, stats: Callable[[], IndexStats]) -> None:
        self.registry.register(IndexStatsCollector(stats))

    def watch_block_sizes(self, sizes: EngineBlockSizes) -> None:
        """Read the unindexable engines at scrape time."""
        self.engines_block_size_unindexable.set_function(lambda: len(sizes.incompatible()))

    def add_counts(self, counts: IngestCounts) -> None:
        """Fold one applied batch's counts into the counters (hot path: label children are
        cached, ``labels()`` takes a lock and builds a key per call)."""
        self.batches.inc()
        events = self._event_children
        for kind, n in counts.events.items():
            child = events.get(kind)
            if child is None:
                child = events[kind] = self.events.labels(kind)
            child.inc(n)
        skipped = self._skip_children
        for reason, n in counts.skipped.items():
            child = skipped.get(reason)
            if child is None:
                child = skipped[reason] = self.skipped_blocks.labels(reason)
            child.inc(n)
        if counts.stored_blocks:
            self.stored_blocks.inc(counts.stored_blocks)
        if counts.removed_blocks:
            self.removed_blocks.inc(counts.removed_blocks)
        if counts.resolved_pending:
            self.resolved_pending.inc(counts.resolved_pending)

    def set_sync_state(self, engine: str, state: SyncState | None) -> None:
        """The engine's sync state changed (None: the engine is gone; its series dropped).
        Bounded: four series per tracked engine."""
        for each in SyncState:
            if state is None:
                with contextlib.suppress(KeyError):
                    self.engine_sync_state.remove(engine, each.value)
            else:
                self.engine_sync_state.labels(engine, each.value).set(1 if each is state else 0)

    def forget_engine(self, engine: str) -> None:
        """Drop the per-engine series of an engine that left."""
        for gauge in (self.pending, self.lag, self.last_seq, self.last_batch_time):
            with contextlib.suppress(KeyError):
                gauge.remove(engine)
        with contextlib.suppress(KeyError):
            self.topic_without_port.remove(engine)


class RedisWriteMetrics:
    """The Redis backend's write path and writer leases (docs/redis.md, "Writes" and
    "Writer model"). Per-engine series are bounded by the engines ingest tracks
    (``max_engines``) and dropped by :meth:`forget_engine`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = PREFIX + "redis_"
        self.queue_depth = Gauge(
            p + "write_queue_depth", "Batches waiting to be written to Redis", registry=r
        )
        self.queue_limit = Gauge(
            p + "write_queue_limit",
            "Batches the write queue holds before ingest blocks",
            registry=r,
        )
        self.backpressure = Counter(
            p + "write_backpressure_seconds",
            "Time ingest waited for room in the Redis write queue (a slow Redis)",
            registry=r,
        )
        self.pipelines = Counter(p + "write_pipelines", "Pipelines sent to Redis", registry=r)
        self.batches = Counter(
            p + "write_batches", "Event batches written to Redis (apply calls)", registry=r
        )
        self.failed = Counter(
            p + "write_failed_batches",
            "Batches Redis refused (unreachable, or fenced: not the engine's writer)",
            ["reason"],
            registry=r,
        )
        self.apply_lag = Gauge(
            p + "apply_lag_seconds",
            "Per engine: seconds between a batch entering the write queue and Redis applying it"
            " (newest batch)",
            ["engine"],
            registry=r,
        )
        self.writer_engines = Gauge(
            p + "writer_engines",
            "Engine streams this replica holds the writer lease of",
            registry=r,
        )
        self.writer = Gauge(
            p + "writer",
            "1 for each engine stream this replica writes (lease held)",
            ["engine"],
            registry=r,
        )
        self.replicas = Gauge(
            p + "replicas", "Live replicas sharing the index (lease members)", registry=r
        )
        self._owned: set[str] = set()
        self.takeovers = Counter(
            p + "lease_takeovers",
            "Engine leases this replica took (start, or a dead writer)",
            registry=r,
        )

    def observe_leases(self, owned: Iterable[str], members: int, gained: int) -> None:
        """After a lease round: the engines written here, live replicas, takeovers."""
        owned = set(owned)
        for engine in self._owned - owned:
            with contextlib.suppress(KeyError):
                self.writer.remove(engine)
        for engine in owned:
            self.writer.labels(engine).set(1)
        self._owned = owned
        self.writer_engines.set(len(owned))
        self.replicas.set(members)
        if gained:
            self.takeovers.inc(gained)

    def forget_engine(self, engine: str) -> None:
        for gauge in (self.apply_lag, self.writer):
            with contextlib.suppress(KeyError):
                gauge.remove(engine)
