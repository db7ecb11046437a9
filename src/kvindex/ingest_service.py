"""The live write path: subscriber -> decode -> sequence tracking -> EventApplier -> index.

One dedicated thread (:class:`IngestService`) owns the ZMQ sockets and applies batches, per
engine stream in sequence order. Why a thread and not asyncio: decoding and applying are
CPU-bound and the index contract is synchronous (the Redis backend blocks on I/O), so running
them on the event loop would stall request handling in the same process; on its own thread
the loop only contends for the GIL and the index lock (:class:`kvindex.index.locked.LockedIndex`),
held for one batch at a time.

Engine identity (the index's engine key, ``ip:port``), by precedence:

1. connect mode with discovery: the discovery entry's ``endpoint`` for that socket (its DP
   rank's port already applied); model from the entry, else the topic, else the default;
2. otherwise the topic ``kv@ip:port@model`` plus the batch's ``data_parallel_rank``
   (``EngineId.endpoint(rank, dp_port_stride)``). A topic without a port is indexed under the
   bare host, warned once per engine and counted (``kvindex_ingest_topic_without_port``).

Sequence handling per stream (see docs/ingest.md): gaps are repaired by replay (live batches
buffered meanwhile, replayed ones applied in order, duplicates dropped, loss counted on
timeout); seq back to 0 clears the engine; events held for an unknown parent trigger one
rate-limited replay from seq 0. Nothing raises out of the loop: everything is counted.

Index faults (the Redis backend's contract, docs/redis.md): a batch the index refuses
(:class:`~kvindex.index.redis.IndexUnavailable`) puts its engine into recovery: later batches
of that engine are only sequence-tracked and counted as deferred (no queue), and once the
index's ``health()`` is ok again the engine is replayed from seq 0 (rule 1).
:meth:`IngestService.request_full_replay` (the index's ``on_reset``: Redis lost its data)
puts every engine into recovery (rule 2). Replays are idempotent, so replaying more than was
lost is safe.

Per-engine facts for the doctor (:meth:`IngestService.engine_activity`) are kept outside
Prometheus in a small lock-guarded table.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import xxhash

from kvindex.curve import CurveConfig
from kvindex.discovery import EngineEntry, RankSource, rank_sources
from kvindex.engines import (
    DEFAULT_MAX_ENGINES,
    DEFAULT_MAX_TOPIC_BYTES,
    EngineId,
    TopicError,
    parse_topic,
)
from kvindex.hostport import HostPortError, split_host_port
from kvindex.index.base import BlockIndex, Clear
from kvindex.index.redis import IndexUnavailable, NotWriter
from kvindex.index.redis_schema import StreamPosition
from kvindex.ingest import EventApplier, IngestConfig, SeqAction, SequenceTracker
from kvindex.metrics import EngineSeries, KvindexMetrics
from kvindex.sources import PeerCheck, parse_networks, resolve_host
from kvindex.subscriber import (
    BadMessage,
    LiveMessage,
    RefusedPeer,
    ReplayMessage,
    SubscriberMessage,
    ZmqSubscriber,
)
from kvindex.sync import SyncConfig, SyncReason, SyncState, SyncTable
from kvindex.threads import named_thread
from kvindex.wire import DecodedBatch, decode_batch

__all__ = ["EngineActivity", "IngestService", "IngestServiceConfig"]

if TYPE_CHECKING:
    from kvindex.index.redis_lease import EngineLeases as WriterLeases

log = logging.getLogger("kvindex.ingest")

GAP = "gap"
# The first batch seen from an engine has seq > 0: what it published before (while this index
# was not running, or before it subscribed) is asked for from seq 0.
FIRST_CONTACT = "first_contact"
# Two different batches came with one seq: two publishers share the stream (a forged one).
# The engine is cleared and rebuilt from its replay buffer.
SEQ_CONFLICT = "seq_conflict"
# Payload digests of the newest applied seqs kept per stream, to tell a true duplicate from
# a different batch under the same seq.
_RECENT_DIGESTS = 64
UNKNOWN_PARENT = "unknown_parent"
INDEX_RECOVERY = "index_recovery"  # rule 1: the index refused a batch of this engine
INDEX_RESET = "index_reset"  # rule 2: the index lost its data (epoch change)
# The engine restarted and the new stream's first batches were not seen: replay from 0.
RESTART = "restart"
# Liveness: an engine silent for stale_after_s is asked for a replay from its newest applied
# seq. The same batch back (same digest) and nothing else: alive and idle. More batches: the
# ones it published that never arrived (a dropped last batch). Another batch under that seq,
# or nothing at all: it restarted. No answer: it is withheld (kvindex.sync).
PROBE = "probe"
# One writer per engine stream (--redis-writers leased): this replica took the engine's lease
# and resyncs it by replay from the position the index recorded (docs/redis.md).
TAKEOVER = "takeover"
# Replay reasons whose outcome decides an engine's sync state (kvindex.sync): an unknown-parent
# repair only adds what was missed, and leaves the state alone.
_SYNC_REASONS = {
    GAP: SyncReason.GAP,
    FIRST_CONTACT: SyncReason.FIRST_CONTACT,
    SEQ_CONFLICT: SyncReason.SEQ_CONFLICT,
    RESTART: SyncReason.RESTART,
    INDEX_RECOVERY: SyncReason.INDEX_UNAVAILABLE,
    INDEX_RESET: SyncReason.INDEX_UNAVAILABLE,
    TAKEOVER: SyncReason.TAKEOVER,
}
# Replays that start from 0 over an engine whose entries were cleared (or never held): a
# first replayed seq > 0 is a loss, nothing to clear.
_FROM_START = {FIRST_CONTACT, SEQ_CONFLICT, RESTART, INDEX_RESET}
_STATE_VALUES = frozenset(state.value for state in SyncState)
_SYNC_TICK_S = 0.25  # how often silence and aged losses are checked
_MAX_CACHED_TOPICS = 4096


@dataclass(frozen=True, slots=True)
class IngestServiceConfig:
    zmq_bind: tuple[str, ...] = ()
    zmq_connect: tuple[str, ...] = ()
    topic_filter: str = "kv@"
    dp_port_stride: int = 1
    # Engine endpoint (ip:port of the rank) -> its replay ROUTER endpoint.
    replay_endpoints: Mapping[str, str] = field(default_factory=dict)
    replay_timeout_s: float = 2.0  # without any reply for this long, a replay has failed
    repair_interval_s: float = 30.0  # at most one unknown-parent replay per engine per this
    max_buffered_batches: int = 10_000  # live batches held while a replay runs
    max_engines: int = DEFAULT_MAX_ENGINES  # engines tracked at once (a new one beyond: dropped)
    max_topic_bytes: int = DEFAULT_MAX_TOPIC_BYTES  # longer topics are dropped unparsed
    # Strict by default: a batch that arrives on a bind socket is accepted only when its
    # topic names an engine discovery knows (static entries, the engines file, Kubernetes);
    # sockets this service connects itself (zmq_connect, discovered zmq endpoints) are
    # trusted. True: any topic is an engine (docs/security.md).
    accept_any_engine: bool = False
    # A sequence break (jump ahead, or back as a restart) is believed when the next batch
    # continues after it, or when no other batch came within this many seconds.
    seq_confirm_s: float = 1.0
    # ZMQ CURVE for the sockets (kvindex.curve); None: plain
    curve: CurveConfig | None = None
    # Strict mode also checks who publishes: a batch on a tcp bind socket must come from
    # the address of the engine its topic names, or from one of these networks (CIDR; NAT, a
    # relay beside the engines).
    allow_sources: tuple[str, ...] = ()
    poll_interval_ms: int = 20  # while a replay, a held sequence break or a recovery runs
    # Otherwise (a batch wakes the poll at once either way): the loop's timers (sync ticks,
    # lease rounds, discovery changes) need no finer step, and an idle index wakes 10 times
    # a second instead of 50 (the precise picker idle: 0.6-0.85% -> 0.20-0.25% of a core).
    idle_poll_interval_ms: int = 100
    health_check_interval_s: float = 0.2  # probe of a failed index while engines wait
    # Per-engine sync state: liveness, loss reporting, unsynced scores (kvindex.sync).
    sync: SyncConfig = field(default_factory=SyncConfig)
    # An extra physical copy of a block (docs/index.md, "Duplicates") counts this long
    # unless a store confirms it; the index's copy clock ticks every half of it.
    copy_ttl_s: float = 20.0


@dataclass(slots=True)
class _Replay:
    reason: str
    cursor: int  # highest seq applied in this stream so far (-1: none)
    deadline: float
    # live batches held meanwhile: seq -> (batch, payload digest)
    buffered: dict[int, tuple[DecodedBatch, int]] = field(default_factory=dict)
    last_replayed: int = -1
    replayed: int = 0
    # The replay starts at the newest applied seq when its digest is known: the engine must
    # answer with that same batch first, or it is another process (restarted) or its buffer
    # no longer reaches back (docs/ingest.md, "Sync state").
    verify_seq: int = -1
    verify_digest: int = 0
    verified: bool = False
    # the first seq the replay must bring for the index to be whole (None: a repair)
    need: int | None = None
    generation: int | None = None  # of the DEALER asked (ReplayMessage.generation)


@dataclass(slots=True)
class _Held:
    """A batch that breaks its stream's sequence (a jump ahead, or back as a restart), held
    until the stream confirms it: believed when the next batch continues after it (or no batch
    came within ``seq_confirm_s``), dropped when the old sequence goes on instead. One frame
    alone can thus not clear an engine (seq 0), freeze it (a far seq makes its real batches
    duplicates) or jump it ahead."""

    seq: int
    decoded: DecodedBatch
    digest: int  # of the raw payload
    kind: SeqAction  # GAP or RESET: what the tracker made of it
    previous: int | None  # the tracker's last seq before it
    since: float  # monotonic time it arrived


@dataclass(slots=True)
class _Stream:
    key: str
    model: str | None
    replay_endpoint: str | None
    applied_seq: int = -1
    pending: int = 0
    pending_grew: bool = False  # held events grew since the last repair decision
    last_repair: float = -math.inf
    replay: _Replay | None = None
    series: EngineSeries | None = None  # cached metric children
    pending_reported: int = -1  # the value last set on series.pending (-1: none yet)
    last_ts: float = 0.0  # newest batch timestamp applied
    discovered_dropped: bool = False  # entries dropped for silence while discovered
    recovery: str | None = None  # INDEX_RECOVERY / INDEX_RESET: waiting for a healthy index
    deferred: int = 0  # batches refused or not applied during this recovery
    held: _Held | None = None  # a sequence break waiting for confirmation
    # seq -> payload digest of the newest applied live batches (at most _RECENT_DIGESTS)
    recent: OrderedDict[int, int] = field(default_factory=OrderedDict)


@dataclass(slots=True)
class EngineActivity:
    """What ingest knows of one engine, for the doctor (copies are handed out)."""

    engine: str
    model: str | None = None
    discovered: bool = False
    batches: int = 0
    events: dict[str, int] = field(default_factory=dict)  # by event type
    skipped: dict[str, int] = field(default_factory=dict)  # skipped blocks by reason
    last_seq: int | None = None
    last_batch_time: float | None = None  # unix seconds
    topic_without_port: bool = False
    recovering: str | None = None  # INDEX_RECOVERY / INDEX_RESET while waiting
    sync: dict[str, object] | None = None  # kvindex.sync.EngineSync.to_builtins

    def copy(self) -> EngineActivity:
        return EngineActivity(
            self.engine,
            self.model,
            self.discovered,
            self.batches,
            dict(self.events),
            dict(self.skipped),
            self.last_seq,
            self.last_batch_time,
            self.topic_without_port,
            self.recovering,
            self.sync,
        )


class IngestService:
    """Drives the write path on its own thread. ``open()`` (bind errors raise here, on the
    caller's thread), ``start()``, ``update_engines()`` from any thread, ``stop()``."""

    def __init__(
        self,
        config: IngestServiceConfig,
        index: BlockIndex,
        ingest_config: IngestConfig | None = None,
        metrics: KvindexMetrics | None = None,
        subscriber: ZmqSubscriber | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.applier = EventApplier(index, ingest_config)
        self.metrics = metrics or KvindexMetrics()
        self.tracker = SequenceTracker()
        self.peers = PeerCheck(parse_networks(config.allow_sources))
        self.subscriber = subscriber or ZmqSubscriber(config.topic_filter, curve=config.curve)
        self._streams: dict[str, _Stream] = {}
        # Streams of engines no discovery names, least recently active first: the ones given
        # up to make room under max_engines (discovered engines never are).
        self._undiscovered: OrderedDict[str, None] = OrderedDict()
        self._holding: set[str] = set()  # streams with a held sequence break
        # discovered endpoints by host, for port-less topics (kv@<ip>@<model>)
        self._endpoints_by_host: dict[str, list[str]] = {}
        self._replaying: set[str] = set()
        self._ranks: dict[str, RankSource] = {}  # discovered: rank endpoint -> sockets
        self._source_identity: dict[str, RankSource] = {}  # connect endpoint -> rank
        self._warned: set[str] = set()
        self._topics: dict[bytes, EngineId] = {}
        self._commands: queue.SimpleQueue[Mapping[str, EngineEntry]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._discovery_expected = False
        self._opened = False
        self._recovering: set[str] = set()
        self._purges_pending: set[str] = set()  # engines gone while the index was down
        self._reset_requested = threading.Event()
        self._next_health_check = 0.0
        # Per-engine facts read by other threads (the doctor): guarded by _activity_lock.
        self._activity: dict[str, EngineActivity] = {}
        self._activity_lock = threading.Lock()
        # Per-engine sync state (kvindex.sync); the scorer reads self.sync.factors.
        self.sync = SyncTable(config.sync)
        self.sync.listener = self.metrics.set_sync_state
        self._next_sync_tick = 0.0
        self._next_copy_age = time.monotonic() + config.copy_ttl_s / 2
        # One writer per engine stream (set_writer_leases): None = this replica writes all.
        self.leases: WriterLeases | None = None
        self._note_position: Callable[[str, int, int], None] | None = None
        self._next_lease_round = 0.0
        # A backend with queued writes reports refused batches after apply() returned.
        inner: object = index
        while inner is not None and not hasattr(inner, "take_write_failures"):
            inner = getattr(inner, "inner", None)
        self._write_failures: Callable[[], Mapping[str, IndexUnavailable]] | None = getattr(
            inner, "take_write_failures", None
        )

    def set_writer_leases(self, leases: WriterLeases) -> None:
        """Write only the engine streams whose lease this replica holds (before start()):
        the others are tracked for their sync state only; a stream taken over is resynced by
        replay from the position the index recorded, replaying -> synced (docs/redis.md,
        "Writer model")."""
        self.leases = leases
        inner: object = self.index
        while inner is not None and not hasattr(inner, "note_position"):
            inner = getattr(inner, "inner", None)
        self._note_position = getattr(inner, "note_position", None)

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> list[str]:
        """Create the sockets: bind endpoints (raises zmq.ZMQError, e.g. EADDRINUSE) and
        static connect endpoints. Returns the actual bind endpoints."""
        for endpoint in self.config.zmq_bind:
            actual = self.subscriber.bind(endpoint)
            log.info("event=zmq_bound endpoint=%s", actual)
        if self.config.zmq_bind and self.config.accept_any_engine:
            log.warning(
                "event=accept_any_engine: events on %s are accepted from any topic; anyone who "
                "reaches the port can add engines and steer routing (docs/security.md)",
                ", ".join(self.config.zmq_bind),
            )
        for endpoint in self.config.zmq_connect:
            self.subscriber.connect(endpoint)
            log.info("event=zmq_connect endpoint=%s", endpoint)
        self._opened = True
        self._update_source_gauges()
        return list(self.subscriber.bound)

    def expect_discovery(self) -> None:
        """Engines will arrive from discovery: ready even before the first one does."""
        self._discovery_expected = True

    def start(self) -> None:
        if not self._opened:
            self.open()
        self._thread = named_thread(self._run, "kvindex-ingest")
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self.subscriber.close()

    def update_engines(self, entries: Mapping[str, EngineEntry]) -> None:
        """The full discovered set (thread-safe; applied by the ingest thread)."""
        self._commands.put(dict(entries))

    def request_full_replay(self) -> None:
        """The index lost its data (thread-safe, coalescing): replay every engine from seq 0
        once the index is healthy (docs/redis.md, rule 2)."""
        self._reset_requested.set()

    def engine_activity(self) -> list[EngineActivity]:
        """Per-engine facts (thread-safe copies): every engine seen on the wire or known
        from discovery, sorted by engine key, with its sync state."""
        now = time.monotonic()
        sync = {r.engine: r.to_builtins(now) for r in self.sync.records()}
        with self._activity_lock:
            out = [self._activity[k].copy() for k in sorted(self._activity)]
        for record in out:
            record.sync = sync.get(record.engine)
        return out

    def sync_summary(self) -> dict[str, object]:
        """Engines by sync state (thread-safe), for /readyz: counts, and the engines not
        synced by name with their reason."""
        now = time.monotonic()
        counts = {state.value: 0 for state in SyncState}
        others: dict[str, dict[str, object]] = {}
        for record in self.sync.records():
            if record.reason is SyncReason.NO_EVENTS:
                continue  # known from discovery, nothing sent yet: nothing to withhold
            counts[record.state.value] += 1
            if record.state is not SyncState.SYNCED:
                others[record.engine] = record.to_builtins(now)
        scores = self.config.sync.unsynced_scores
        return {"counts": counts, "not_synced": others, "unsynced_scores": scores}

    def knows(self, engine: str) -> bool:
        """Is ``engine`` discovered or publishing events this service accepted (thread-safe,
        no copy: the write and debug APIs ask it per request)?"""
        with self._activity_lock:
            return engine in self._activity

    def _activity_of(self, key: str) -> EngineActivity:
        """The engine's record (the caller holds _activity_lock)."""
        record = self._activity.get(key)
        if record is None:
            record = self._activity[key] = EngineActivity(key)
        return record

    def readiness(self) -> str | None:
        """None when ingest is up; otherwise why not."""
        if self._thread is None or not self._thread.is_alive():
            return "ingest thread not running"
        bound, connected = self.subscriber.counts()
        if not (bound or connected or self._discovery_expected):
            return "no subscriber sockets"
        return None

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                for message in self.subscriber.poll(self._poll_ms()):
                    self.handle(message)
                now = time.monotonic()
                self._check_timeouts(now)
                if self._write_failures is not None:
                    self._guard(self._check_write_failures)
                self._guard(self.check_recovery, now)
                if now >= self._next_sync_tick:
                    self._next_sync_tick = now + _SYNC_TICK_S
                    self._guard(self.check_sync, now)
                if self.leases is not None and now >= self._next_lease_round:
                    self._next_lease_round = now + self.leases.renew_interval_s
                    self._guard(self.lease_round, now)
        finally:
            if self.leases is not None:
                self.leases.release_all()
            self.subscriber.close()

    def _poll_ms(self) -> int:
        busy = (
            self._replaying
            or self._holding
            or self._recovering
            or self._purges_pending
            or self._write_failures is not None
            or self._reset_requested.is_set()
        )
        return self.config.poll_interval_ms if busy else self.config.idle_poll_interval_ms

    def _drain_commands(self) -> None:
        while True:
            try:
                entries = self._commands.get_nowait()
            except queue.Empty:
                return
            self._guard(self._apply_discovery, entries)

    def _guard(self, fn: object, *args: object) -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except Exception:
            self.metrics.internal_errors.inc()
            log.exception("event=ingest_internal_error")

    def handle(self, message: SubscriberMessage) -> None:
        """Process one subscriber message (the ingest thread's only entry point)."""
        try:
            if isinstance(message, LiveMessage):
                self._on_live(message)
            elif isinstance(message, ReplayMessage):
                self._on_replay(message)
            elif isinstance(message, RefusedPeer):
                self.metrics.refused_peers.inc()
                self._warn_once(
                    "refused_peer",
                    "event=peer_refused address=%s: a CURVE client whose key is not in "
                    "--zmq-curve-clients was refused (further ones are counted in "
                    "kvindex_ingest_refused_peers, not logged)",
                    message.address,
                )
            else:
                self._on_bad(message)
        except Exception:
            self.metrics.internal_errors.inc()
            log.exception("event=ingest_internal_error")

    # -- identity ----------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        # Bounded: a flood of distinct bad topics must not grow memory (metrics still count).
        if key not in self._warned and len(self._warned) < 10_000:
            self._warned.add(key)
            log.warning(message, *args)

    def _parse_topic(self, topic: bytes) -> EngineId:
        """parse_topic, cached per topic (every batch carries one; parsing is pure). Bad
        topics are not cached (they raise every time, and are counted every time)."""
        engine = self._topics.get(topic)
        if engine is None:
            engine = parse_topic(topic)
            if len(self._topics) >= _MAX_CACHED_TOPICS:
                self._topics.clear()
            self._topics[topic] = engine
        return engine

    def _stream_for(self, message: LiveMessage, rank: int | None) -> _Stream | None:
        topic = message.frame.topic
        if len(topic) > self.config.max_topic_bytes:
            # Never parsed, cached, logged or used as a label: one counter, one warning.
            self.metrics.refused_batches.labels("topic_too_long").inc()
            self._warn_once(
                "topic_too_long",
                "event=topic_too_long source=%s bytes=%d limit=%d (batches dropped; "
                "counted in kvindex_ingest_refused_batches{reason=topic_too_long})",
                message.source,
                len(topic),
                self.config.max_topic_bytes,
            )
            return None
        identity = self._source_identity.get(message.source)
        topic_model: str | None = None
        engine = None
        portless = False
        if identity is not None:
            key = identity.endpoint
            with contextlib.suppress(TopicError):
                topic_model = self._parse_topic(topic).model
            model = identity.model or topic_model
        else:
            try:
                engine = self._parse_topic(topic)
            except TopicError as exc:
                self.metrics.malformed_frames.labels("bad_topic").inc()
                self._warn_once(
                    "topic:" + topic.decode("utf-8", "replace"),
                    "event=bad_topic source=%s error=%r (batches dropped)",
                    message.source,
                    str(exc),
                )
                return None
            key = engine.endpoint(rank, self.config.dp_port_stride)
            if engine.port is None:
                key = self._portless_endpoint(engine.host, rank) or key
            if not self._accepts(message, key):
                return None
            portless = engine.port is None and key not in self._ranks
            discovered = self._ranks.get(key)
            model = engine.model or (discovered.model if discovered else None)
        stream = self._streams.get(key)
        if stream is None:
            if not self._make_room(message, key):
                return None
            stream = _Stream(key, model, self._replay_endpoint(key))
            self._streams[key] = stream
            self.sync.known(key, time.monotonic())
            if key not in self._ranks:
                self._undiscovered[key] = None
            with self._activity_lock:
                record = self._activity_of(key)
                record.model = model or record.model
                record.topic_without_port = portless
            log.info(
                "event=engine_seen engine=%s model=%s replay=%s source=%s",
                key,
                model,
                stream.replay_endpoint,
                message.source,
            )
        elif model and stream.model != model:
            stream.model = model
            with self._activity_lock:
                self._activity_of(key).model = model
        if portless:
            self.metrics.topic_without_port.labels(key).inc()
            self._warn_once(
                "noport:" + key,
                "event=topic_without_port engine=%s topic=%r: indexed under the bare host, "
                "which will not match the picker's ip:port endpoints; set the engine's "
                "topic to kv@<ip>:<port>@<model>",
                key,
                topic.decode("utf-8", "replace"),
            )
        return stream

    def _portless_endpoint(self, host: str, rank: int | None) -> str | None:
        """The discovered endpoint of a port-less topic's host (``kv@<ip>@<model>``, as older
        llm-d guides configure vLLM): the one discovered engine on that host (or the rank's
        one, for data-parallel ranks); None when discovery names none or several."""
        candidates = self._endpoints_by_host.get(host, [])
        if rank is not None and len(candidates) > 1:
            candidates = [e for e in candidates if self._ranks[e].rank == rank]
        return candidates[0] if len(candidates) == 1 else None

    def _accepts(self, message: LiveMessage, key: str) -> bool:
        """Strict mode: the topic's engine must be one discovery knows, unless the batch came
        on a socket this service connected itself."""
        if self.config.accept_any_engine or message.source in self.config.zmq_connect:
            return True
        if key in self._ranks:
            if message.peer is None or self.peers.allows(key, message.peer):
                return True
            self.metrics.refused_batches.labels("wrong_peer").inc()
            self._warn_once(
                "wrong_peer",
                "event=wrong_peer source=%s engine=%.80s peer=%s: a batch for this engine came "
                "from another address and was dropped (counted in kvindex_ingest_refused_"
                "batches{reason=wrong_peer}; further ones are not logged). If the engines "
                "publish through NAT or a relay, allow its network with --zmq-allow-source",
                message.source,
                key,
                message.peer,
            )
            return False
        self.metrics.refused_batches.labels("unknown_engine").inc()
        self._warn_once(
            "unknown_engine",
            "event=unknown_engine source=%s engine=%.80s: no discovery names this engine, its "
            "batches are dropped (counted in kvindex_ingest_refused_batches"
            "{reason=unknown_engine}; further ones are not logged). Name the engines "
            "(engines, --engines-file, Kubernetes) or accept any with --accept-any-engine",
            message.source,
            key,
        )
        return False

    def _make_room(self, message: LiveMessage, key: str) -> bool:
        """True when a new engine ``key`` may get a stream: below max_engines, or after
        dropping the least recently active undiscovered engine (entries and all). With every
        tracked engine discovered, the new one is refused and counted."""
        if len(self._streams) < self.config.max_engines:
            return True
        if self._undiscovered:
            oldest = next(iter(self._undiscovered))
            self._warn_once(
                "engine_evicted",
                "event=engine_evicted engine=%.80s for=%.80s limit=%d: the least recently "
                "active undiscovered engine was dropped to make room (further evictions are "
                "counted in kvindex_ingest_engines_evicted, not logged)",
                oldest,
                key,
                self.config.max_engines,
            )
            self._drop_engine(oldest)
            self.metrics.engines_evicted.inc()
            return True
        self._refuse_engine(message, key)
        return False

    def _refuse_engine(self, message: LiveMessage, key: str) -> None:
        # No per-engine state, label or log line for the refused engine: a flood of invented
        # topics costs one counter and one warning.
        self.metrics.refused_batches.labels("engine_limit").inc()
        self._warn_once(
            "engine_limit",
            "event=engine_limit source=%s engine=%.80s limit=%d: events of engines beyond the "
            "limit are dropped (kvindex_ingest_refused_batches{reason=engine_limit}); raise "
            "--max-engines if the fleet is that large",
            message.source,
            key,
            self.config.max_engines,
        )

    def _replay_endpoint(self, key: str) -> str | None:
        configured = self.config.replay_endpoints.get(key)
        if configured:
            return configured
        discovered = self._ranks.get(key)
        return discovered.replay if discovered else None

    # -- live batches ------------------------------------------------------------------------

    def _decode(self, payload: bytes) -> DecodedBatch | None:
        decoded = decode_batch(payload)
        if decoded.error is not None:
            self.metrics.decode_errors.labels("batch").inc()
            self._warn_once("decode", "event=undecodable_batch error=%r", decoded.error)
            return None
        if decoded.unknown:
            self.metrics.unknown_events.inc(decoded.unknown)
        if decoded.malformed:
            self.metrics.decode_errors.labels("event").inc(decoded.malformed)
        return decoded

    def _on_live(self, message: LiveMessage) -> None:
        decoded = self._decode(message.frame.payload)
        if decoded is None:
            return
        stream = self._stream_for(message, decoded.data_parallel_rank)
        if stream is None:
            return
        if stream.key in self._undiscovered:
            self._undiscovered.move_to_end(stream.key)
        seq = message.frame.seq
        if self.leases is not None and not self.leases.owns(stream.key):
            return  # another replica writes this stream (its state comes with lease rounds)
        if stream.recovery is not None:
            # Waiting for the index: track the sequence only; the replay will bring it all.
            self.tracker.observe(stream.key, seq)
            stream.deferred += 1
            self.metrics.deferred_batches.inc()
            return
        digest = xxhash.xxh3_64_intdigest(message.frame.payload)
        self._sequence(stream, seq, decoded, digest, time.monotonic())

    def _sequence(
        self, stream: _Stream, seq: int, decoded: DecodedBatch, digest: int, now: float
    ) -> None:
        """Classify a live batch by its seq and act on it (apply, drop, hold, replay)."""
        replay = stream.replay
        if replay is not None:
            if seq == 0 or seq < replay.cursor // 2:
                self._finish_replay(stream, ok=False, why="engine restarted")
                if stream.replay is not None:  # the replay's end started another one
                    stream.replay.buffered[seq] = (decoded, digest)
                    return
            else:
                replay.buffered[seq] = (decoded, digest)
                if len(replay.buffered) > self.config.max_buffered_batches:
                    self._finish_replay(stream, ok=False, why="live buffer full")
                return
        previous = self.tracker.last(stream.key)
        if previous is None:
            # First contact (or the first batch after the engine's entries were dropped).
            if seq > 0 and stream.replay_endpoint is not None:
                log.info(
                    "event=first_contact engine=%s seq=%d action=replay from 0",
                    stream.key,
                    seq,
                )
                self._start_replay(stream, FIRST_CONTACT, 0, -1, now)
                assert stream.replay is not None
                stream.replay.buffered[seq] = (decoded, digest)
                return
            if seq > 0:
                # No replay endpoint: what batches 0..seq-1 stored is unknown (a subset).
                self._warn_once(
                    "noreplay-first:" + stream.key,
                    "event=first_contact engine=%s seq=%d: no replay endpoint configured for "
                    "this engine (--replay-endpoint); blocks it stored before are unknown "
                    "(degraded)",
                    stream.key,
                    seq,
                )
                self.sync.lost(stream.key, now, seq)
            self.sync.synced(
                stream.key, now, SyncReason.STREAM_START if seq == 0 else SyncReason.FIRST_CONTACT
            )
        action = self.tracker.observe(stream.key, seq)
        if action is SeqAction.DUPLICATE and stream.recent.get(seq, digest) != digest:
            # Another batch was applied with this seq: two publishers on one stream, or an
            # engine that restarted and whose first batches were lost.
            self._conflict(stream, seq, decoded, digest, previous, now)
            return
        if action is SeqAction.DUPLICATE and stream.last_ts and decoded.ts > stream.last_ts:
            # An older seq carrying a newer timestamp: the engine restarted and its first
            # batches were lost before the (re)connection, so seq did not drop far enough for
            # the tracker to call it a restart. Live duplicates do not otherwise occur.
            self.tracker.forget(stream.key)
            self.tracker.observe(stream.key, seq)
            action = SeqAction.RESET
        held = stream.held
        if held is not None:
            if seq == held.seq + 1 and action is not SeqAction.APPLY:
                # The stream goes on after the held batch: its break was real.
                self._believe(stream, now)
                self._sequence(stream, seq, decoded, digest, now)
                return
            if action is SeqAction.APPLY:
                # The old sequence goes on: the held batch was not this engine's.
                stream.held = None
                self._refuse_held(stream, held, "the engine's sequence went on")
        if action is SeqAction.GAP or action is SeqAction.RESET:
            if stream.held is not None:
                self._refuse_held(stream, stream.held, "another sequence break came first")
            stream.held = _Held(seq, decoded, digest, action, previous, now)
            self._holding.add(stream.key)
            self._rewind(stream.key, previous)
            return
        self._act(stream, action, seq, decoded, digest, previous, now)

    def _conflict(
        self,
        stream: _Stream,
        seq: int,
        decoded: DecodedBatch,
        digest: int,
        previous: int | None,
        now: float,
    ) -> None:
        """Two different batches with one seq: what the index holds for this engine cannot be
        vouched for. Clear it and rebuild it from the engine's replay buffer (the new batch
        held meanwhile: a real one comes in the replay too); without a replay endpoint, from
        this batch on, as after a restart (degraded: what it held before is unknown)."""
        self.metrics.seq_conflicts.inc()
        log.warning(
            "event=seq_conflict engine=%s seq=%d: two different batches with one seq (another "
            "publisher on this engine's stream); clearing the engine and %s",
            stream.key,
            seq,
            "replaying it from 0" if stream.replay_endpoint else "rebuilding from its next batches",
        )
        if not self._reset(stream, previous):
            return
        self.tracker.forget(stream.key)
        self.sync.restarted(stream.key, now)
        if stream.replay_endpoint is not None:
            self._start_replay(stream, SEQ_CONFLICT, 0, -1, now)
            assert stream.replay is not None
            stream.replay.buffered[seq] = (decoded, digest)
            return
        self.sync.lost(stream.key, now, 0)
        self.tracker.observe(stream.key, seq)
        self._act(stream, SeqAction.APPLY, seq, decoded, digest, previous, now)

    def _rewind(self, key: str, last: int | None) -> None:
        """Set the tracker back to ``last`` (a held break is not believed yet)."""
        self.tracker.forget(key)
        if last is not None:
            self.tracker.observe(key, last)

    def _believe(self, stream: _Stream, now: float) -> None:
        held = stream.held
        assert held is not None
        stream.held = None
        self.tracker.forget(stream.key)
        self.tracker.observe(stream.key, held.seq)
        self._act(stream, held.kind, held.seq, held.decoded, held.digest, held.previous, now)

    def _refuse_held(self, stream: _Stream, held: _Held, why: str) -> None:
        self.metrics.refused_batches.labels("seq_unconfirmed").inc()
        self._warn_once(
            "seq_unconfirmed",
            "event=seq_unconfirmed engine=%s seq=%d previous=%s: a batch that broke the "
            "sequence (%s) was dropped: %s (counted in kvindex_ingest_refused_batches"
            "{reason=seq_unconfirmed}; further ones are not logged)",
            stream.key,
            held.seq,
            held.previous,
            "restart" if held.kind is SeqAction.RESET else "jump ahead",
            why,
        )

    def _act(
        self,
        stream: _Stream,
        action: SeqAction,
        seq: int,
        decoded: DecodedBatch,
        digest: int,
        previous: int | None,
        now: float,
    ) -> None:
        if action is SeqAction.DUPLICATE:
            self.metrics.duplicate_batches.inc()
            return
        if action is SeqAction.APPLY:
            if self._apply(stream, seq, decoded, digest, now):
                self._maybe_repair(stream)
        elif action is SeqAction.RESET:
            if not self._reset(stream, previous):
                return
            self.sync.restarted(stream.key, now)
            if seq > 0 and stream.replay_endpoint is not None:
                # The new stream's first batches were not seen: bring them by replay.
                self._start_replay(stream, RESTART, 0, -1, now)
                assert stream.replay is not None
                stream.replay.buffered[seq] = (decoded, digest)
                return
            if seq > 0:
                self.sync.lost(stream.key, now, seq)
            if self._apply(stream, seq, decoded, digest, now):
                self._maybe_repair(stream)
        else:  # GAP
            assert previous is not None
            self.metrics.gaps.inc()
            missing = seq - previous - 1
            if stream.replay_endpoint is not None:
                log.info(
                    "event=seq_gap engine=%s expected=%d got=%d action=replay",
                    stream.key,
                    previous + 1,
                    seq,
                )
                self._start_replay(stream, GAP, previous + 1, stream.applied_seq, now)
                assert stream.replay is not None
                stream.replay.buffered[seq] = (decoded, digest)
            else:
                self.metrics.lost_batches.inc(missing)
                self._warn_once(
                    "noreplay:" + stream.key,
                    "event=seq_gap engine=%s expected=%d got=%d lost=%d: no replay endpoint "
                    "configured for this engine (--replay-endpoint): what the lost batches "
                    "stored or evicted is unknown, so the engine is cleared and rebuilt from "
                    "its next batches (degraded)",
                    stream.key,
                    previous + 1,
                    seq,
                    missing,
                )
                if not self._clear(stream):
                    return
                self.metrics.resyncs.inc()
                self.sync.lost(stream.key, now, missing)
                if self._apply(stream, seq, decoded, digest, now):
                    self._maybe_repair(stream)

    def _apply(
        self, stream: _Stream, seq: int, decoded: DecodedBatch, digest: int, now: float
    ) -> bool:
        """Apply one batch; False when the index refused it (the engine is now recovering,
        any replay of it was cancelled)."""
        if self._note_position is not None:
            self._note_position(stream.key, seq, digest)
        try:
            counts = self.applier.apply_batch(
                stream.key, decoded, stream.model, seq > stream.applied_seq
            )
        except IndexUnavailable as exc:
            self._index_failed(stream, exc)
            return False
        self.metrics.add_counts(counts)
        recent = stream.recent
        recent[seq] = digest
        if len(recent) > _RECENT_DIGESTS:
            recent.popitem(last=False)
        self.sync.seen(stream.key, now)
        series = stream.series
        if series is None:
            series = stream.series = self.metrics.engine_series(stream.key)
        wall = time.time()
        series.last_seq.set(seq)
        series.last_batch_time.set(wall)
        ts = decoded.ts
        if ts > stream.last_ts:  # replayed (older) batches say nothing about lag
            lag = wall - ts if wall > ts else 0.0
            series.lag.set(lag)
            self.metrics.lag_histogram.observe(lag)
            stream.last_ts = ts
        pending = counts.pending
        if pending != stream.pending_reported:  # the gauge already says so otherwise
            series.pending.set(pending)
            stream.pending_reported = pending
        if seq > stream.applied_seq:
            stream.applied_seq = seq
        if pending > stream.pending:
            stream.pending_grew = True
        stream.pending = pending
        with self._activity_lock:
            record = self._activity_of(stream.key)
            record.batches += 1
            for kind, n in counts.events.items():
                record.events[kind] = record.events.get(kind, 0) + n
            for reason, n in counts.skipped.items():
                record.skipped[reason] = record.skipped.get(reason, 0) + n
            record.last_seq = seq
            record.last_batch_time = wall
        return True

    # -- index faults (docs/redis.md, "Faults and recovery") --------------------------------

    def _index_failed(self, stream: _Stream, exc: IndexUnavailable) -> None:
        """Rule 1: the index refused a batch of this engine: stop applying it (later batches
        are deferred) until the index is healthy, then replay it."""
        if isinstance(exc, NotWriter) and self.leases is not None:
            # Fenced out: another replica holds the engine's lease now; it resyncs it.
            log.warning("event=not_writer engine=%s: lease lost, stopped writing", stream.key)
            self.leases.forfeit(stream.key)
            self._stand_down(stream)
            return
        self.metrics.index_unavailable.inc()
        stream.deferred += 1  # the refused batch: lost unless a replay brings it back
        if stream.replay is not None:
            self._cancel_replay(stream)
        self.sync.unavailable(stream.key, time.monotonic())
        if stream.recovery is None:
            log.warning(
                "event=index_unavailable engine=%s error=%r action=replay_when_healthy",
                stream.key,
                exc.reason,
            )
            self._enter_recovery(stream, INDEX_RECOVERY)

    def _check_write_failures(self) -> None:
        assert self._write_failures is not None
        for key, exc in self._write_failures().items():
            stream = self._streams.get(key)
            if stream is not None:
                self._index_failed(stream, exc)

    def _enter_recovery(self, stream: _Stream, reason: str) -> None:
        if stream.recovery != INDEX_RESET:  # a reset outranks a plain recovery
            stream.recovery = reason
        self._recovering.add(stream.key)
        self.sync.unavailable(stream.key, time.monotonic())
        with self._activity_lock:
            self._activity_of(stream.key).recovering = stream.recovery

    def _cancel_replay(self, stream: _Stream) -> None:
        replay = stream.replay
        assert replay is not None
        stream.replay = None
        self._replaying.discard(stream.key)
        self.subscriber.drop_replay(stream.key)
        self.metrics.replays.labels(replay.reason, "failed").inc()

    def _index_health(self) -> str | None:
        check = getattr(self.index, "health", None)
        if check is None:
            return None
        reason = check()
        return None if reason is None else str(reason)

    def check_recovery(self, now: float) -> None:
        """Rule 2 (a requested full replay) and the replays of recovering engines once the
        index is healthy again (probed at most every health_check_interval_s). Called by the
        ingest loop every tick (like :meth:`handle`, only on the ingest thread)."""
        if not (self._recovering or self._purges_pending or self._reset_requested.is_set()):
            return
        if now < self._next_health_check:
            return
        self._next_health_check = now + self.config.health_check_interval_s
        unhealthy = self._index_health()  # may itself notice an epoch change (on_reset)
        if self._reset_requested.is_set():
            self._reset_requested.clear()
            log.warning(
                "event=index_reset engines=%d action=full_replay_when_healthy", len(self._streams)
            )
            for every in self._streams.values():
                if every.replay is not None:
                    self._cancel_replay(every)
                self._enter_recovery(every, INDEX_RESET)
        if unhealthy is not None:
            return
        for key in sorted(self._purges_pending):
            if key not in self._ranks:  # still gone (it may have come back meanwhile)
                self._purge_from_index(key)
            else:
                self._purges_pending.discard(key)
        for key in sorted(self._recovering):
            self._recovering.discard(key)
            stream = self._streams.get(key)
            if stream is None or stream.recovery is None:
                continue
            if self.leases is not None and not self.leases.owns(key):
                stream.recovery, stream.deferred = None, 0  # its writer recovers it
                continue
            reason, deferred = stream.recovery, stream.deferred
            stream.recovery, stream.deferred = None, 0
            with self._activity_lock:
                self._activity_of(key).recovering = None
            self.applier.forget(key)
            stream.pending = 0
            stream.pending_grew = False
            if stream.replay_endpoint is None:
                self.metrics.lost_batches.inc(deferred)
                log.warning(
                    "event=index_recovered engine=%s reason=%s lost=%d: no replay endpoint "
                    "configured for this engine (--replay-endpoint): it is cleared and rebuilt "
                    "from its next batches (degraded)",
                    key,
                    reason,
                    deferred,
                )
                # What the refused batches evicted may still be claimed: start over.
                if self._clear(stream):
                    self.sync.lost(key, now, deferred)
                    self.sync.synced(key, now, SyncReason.LOST)
                continue
            log.info(
                "event=index_recovered engine=%s reason=%s deferred=%d action=replay_from_0",
                key,
                reason,
                deferred,
            )
            cursor = -1 if reason == INDEX_RESET else stream.applied_seq
            self._start_replay(stream, reason, 0, cursor, now)

    def _maybe_repair(self, stream: _Stream) -> None:
        """Events wait for a parent this index never saw (it started late, or a gap was not
        repaired): ask the engine for everything it still buffers, once per interval."""
        if not stream.pending_grew or stream.replay is not None:
            return
        stream.pending_grew = False
        if stream.replay_endpoint is None:
            return
        now = time.monotonic()
        if now - stream.last_repair < self.config.repair_interval_s:
            return
        stream.last_repair = now
        log.info(
            "event=unknown_parent engine=%s pending=%d action=replay_from_0",
            stream.key,
            stream.pending,
        )
        self._start_replay(stream, UNKNOWN_PARENT, 0, stream.applied_seq, now)

    def _reset(self, stream: _Stream, previous: int | None) -> bool:
        log.warning(
            "event=engine_restart engine=%s previous_seq=%s: clearing its blocks",
            stream.key,
            previous,
        )
        self.metrics.resets.inc()
        return self._clear(stream)

    def _clear(self, stream: _Stream) -> bool:
        """Drop everything the index and the applier hold for the engine; False when the
        index refused (the engine is then recovering)."""
        stream.recent.clear()
        self.applier.forget(stream.key)
        stream.pending = 0
        stream.pending_grew = False
        stream.applied_seq = -1
        stream.last_ts = 0.0
        try:
            self.index.apply(stream.key, [Clear()])
        except IndexUnavailable as exc:
            self._index_failed(stream, exc)
            return False
        return True

    # -- liveness (kvindex.sync) -------------------------------------------------------------

    def check_sync(self, now: float) -> None:
        """Silent engines are probed (or withheld), dead ones dropped, losses age out.
        Called by the ingest loop every _SYNC_TICK_S (only on the ingest thread)."""
        if now >= self._next_copy_age:
            self._next_copy_age = now + self.config.copy_ttl_s / 2
            age = getattr(self.index, "age_copies", None)
            if age is not None:
                with contextlib.suppress(IndexUnavailable):  # nothing to age while it is down
                    age()
        tick = self.sync.tick(now)
        leases = self.leases
        for key in tick.drop:
            if leases is not None and not leases.owns(key):
                continue  # its writer drops it
            self._drop_silent(key, now)
        for key in tick.probe:
            if leases is not None and not leases.owns(key):
                continue
            stream = self._streams.get(key)
            if stream is None:
                self.sync.silent(key, now)
                continue
            if stream.replay is not None or stream.recovery is not None:
                continue
            self.sync.probing(key, now)
            if stream.replay_endpoint is not None and stream.applied_seq >= 0:
                log.debug("event=probe engine=%s seq=%d", key, stream.applied_seq)
                self._start_replay(stream, PROBE, stream.applied_seq + 1, stream.applied_seq, now)
            else:
                self._silent(stream, now)

    def _silent(self, stream: _Stream, now: float) -> None:
        record = self.sync.get(stream.key)
        if record is not None and record.scored():
            log.warning(
                "event=engine_silent engine=%s silent_s=%.1f: no events%s; its entries are "
                "withheld until it publishes again",
                stream.key,
                now - record.last_seen,
                "" if stream.replay_endpoint is None else " and no answer to a replay probe",
            )
        self.sync.silent(stream.key, now)

    def _drop_silent(self, key: str, now: float) -> None:
        """An engine silent for drop_after_s: drop its entries. One no discovery names (a
        bind-socket topic, --zmq-connect) is forgotten entirely; a discovered one keeps its
        record (unsynced, dead) and is taken as a first contact when it speaks again."""
        log.warning(
            "event=engine_dead engine=%s silent_s>%.0f: dropping its entries",
            key,
            self.config.sync.drop_after_s,
        )
        if key not in self._ranks:
            self._drop_engine(key)
            return
        stream = self._streams.get(key)
        if stream is not None:
            if stream.replay is not None:
                self._cancel_replay(stream)
            stream.held = None
            self.tracker.forget(key)
            if not self._clear(stream):
                return
        self.sync.dropped(key, now)

    # -- one writer per engine stream (docs/redis.md, "Writer model") ----------------------

    def lease_round(self, now: float) -> None:
        """Renew, release and take engine leases; resync the streams taken over; mirror the
        sync state the writers of the other streams publish. Ingest thread only."""
        leases = self.leases
        assert leases is not None
        engines = sorted(self._streams)
        states = {}
        for key in engines:
            record = self.sync.get(key)
            if record is not None and leases.owns(key):
                states[key] = record.state.value
        result = leases.tick(engines, states)
        for key in result.lost:
            stream = self._streams.get(key)
            if stream is not None:
                self._stand_down(stream)
        for key in result.gained:
            stream = self._streams.get(key)
            view = result.views.get(key)
            if stream is not None:
                self._takeover(stream, None if view is None else view.position, now)
        for key, view in result.views.items():
            if view.ours:
                continue
            if view.held and view.state in _STATE_VALUES:
                self.sync.mirror(key, now, SyncState(view.state), SyncReason.OTHER_WRITER)
            else:
                self.sync.mirror(key, now, SyncState.UNSYNCED, SyncReason.NO_WRITER)

    def _stand_down(self, stream: _Stream) -> None:
        """Stop writing the stream (another replica took it): drop what is in flight."""
        if stream.replay is not None:
            self._cancel_replay(stream)
        stream.held = None
        self._holding.discard(stream.key)
        stream.recovery = None
        stream.deferred = 0
        self._recovering.discard(stream.key)
        self.applier.forget(stream.key)
        self.tracker.forget(stream.key)
        stream.pending = 0
        stream.pending_grew = False
        stream.recent.clear()

    def _takeover(self, stream: _Stream, position: StreamPosition | None, now: float) -> None:
        """This replica now writes the stream: resync by replay from where the index stands
        (the seq recorded with the previous writer's last write; that batch again, since only
        part of it may have been written), replaying -> synced. With that batch's digest
        recorded, the engine's batch under that seq must be the same one: another batch
        there (or none) means the engine restarted since, and what the index holds of it
        is cleared and replayed from 0."""
        self._stand_down(stream)
        stream.last_ts = 0.0
        log.info(
            "event=takeover engine=%s position=%s action=%s",
            stream.key,
            position,
            "replay" if stream.replay_endpoint else "clear (no replay endpoint)",
        )
        if stream.replay_endpoint is None:
            # Nothing can tell what the previous writer missed: rebuild from the live stream.
            stream.applied_seq = -1
            if self._clear(stream):
                self.sync.lost(stream.key, now, 0)
                self.sync.synced(stream.key, now, SyncReason.LOST)
            return
        if position is None:  # nothing recorded: the whole buffer, over a clean slate
            if not self._clear(stream):
                return
            self._start_replay(stream, FIRST_CONTACT, 0, -1, now)
            self.sync.replaying(stream.key, now, SyncReason.TAKEOVER)
            return
        stream.applied_seq = position.seq - 1
        self._start_replay(stream, TAKEOVER, position.seq, position.seq - 1, now)
        replay = stream.replay
        if replay is not None and position.digest is not None:
            replay.verify_seq, replay.verify_digest = position.seq, position.digest

    # -- replay ------------------------------------------------------------------------------

    def _start_replay(
        self, stream: _Stream, reason: str, start: int, cursor: int, now: float
    ) -> None:
        """Ask the engine for its batches from ``start`` (``cursor``: the newest applied seq
        of the stream, -1 if none). A gap or probe replay starts one batch earlier when that
        batch's digest is known, to check the engine is the process that sent it."""
        assert stream.replay_endpoint is not None
        if reason in _FROM_START:
            need: int | None = 0
        elif reason == UNKNOWN_PARENT:
            need = None
        elif reason in (GAP, PROBE, TAKEOVER):
            need = start
        else:  # INDEX_RECOVERY: what was deferred after the newest applied batch
            need = cursor + 1
        replay = _Replay(reason, cursor, now + self.config.replay_timeout_s, need=need)
        if reason in (GAP, PROBE) and cursor >= 0 and start == cursor + 1:
            digest = stream.recent.get(cursor)
            if digest is not None:
                replay.verify_seq, replay.verify_digest = cursor, digest
                start = cursor
        stream.replay = replay
        self._replaying.add(stream.key)
        self.metrics.replays.labels(reason, "requested").inc()
        sync_reason = _SYNC_REASONS.get(reason)
        if sync_reason is not None:
            self.sync.replaying(stream.key, now, sync_reason)
        replay.generation = self.subscriber.request_replay(
            stream.key, stream.replay_endpoint, start
        )

    def _on_replay(self, message: ReplayMessage) -> None:
        stream = self._streams.get(message.stream)
        replay = stream.replay if stream is not None else None
        if stream is None or replay is None:
            return  # a late answer to a replay already finished
        if message.generation is not None and message.generation != replay.generation:
            return  # an answer from a DEALER dropped since (read in the same poll)
        if message.frame is None:
            self._finish_replay(stream, ok=True)
            return
        now = time.monotonic()
        replay.deadline = now + self.config.replay_timeout_s
        seq = message.frame.seq
        first = replay.last_replayed < 0
        if first and replay.verify_seq >= 0 and seq == replay.verify_seq:
            if xxhash.xxh3_64_intdigest(message.frame.payload) != replay.verify_digest:
                replay.last_replayed = seq
                self._restarted_behind(
                    stream, f"its batch {seq} differs from the one applied under that seq", now
                )
                return
            replay.verified = True  # the same process: its stream goes on
            if replay.reason != TAKEOVER:
                replay.last_replayed = seq
                self.sync.seen(stream.key, now)
                return
            # A takeover applies that batch again: the previous writer may have written
            # only part of it.
        if seq <= replay.last_replayed or (replay.reason in (GAP, PROBE) and seq <= replay.cursor):
            self.metrics.duplicate_batches.inc()
            return
        decoded = self._decode(message.frame.payload)
        expected = replay.need if first else replay.last_replayed + 1
        replay.last_replayed = seq
        if decoded is None:
            return
        if (
            replay.need is not None
            and expected is not None
            and seq > expected
            and not self._replay_loss(stream, replay, expected, seq, first, now)
        ):
            return
        if not self._apply(
            stream, seq, decoded, xxhash.xxh3_64_intdigest(message.frame.payload), now
        ):
            return  # the index failed: the engine recovers (replay cancelled)
        replay.cursor = max(replay.cursor, seq)
        replay.replayed += 1
        self.metrics.replayed_batches.inc()
        for buffered in [s for s in replay.buffered if s <= seq]:
            del replay.buffered[buffered]
            self.metrics.duplicate_batches.inc()

    def _replay_loss(
        self, stream: _Stream, replay: _Replay, expected: int, seq: int, first: bool, now: float
    ) -> bool:
        """The replay skipped batches ``expected..seq-1`` (the engine's buffer no longer holds
        them): what they stored or evicted is unknown. Rebuild the engine from what the buffer
        holds (and the live batches held meanwhile) instead of keeping claims nobody vouches
        for; it ends degraded. False when the index refused the clear."""
        lost = seq - expected
        self.metrics.lost_batches.inc(lost)
        nothing_held = first and replay.reason in _FROM_START  # cleared (or empty) already
        log.warning(
            "event=%s engine=%s reason=%s expected=%d oldest_buffered=%d lost=%d: %s",
            "replay_incomplete" if nothing_held else "gap_beyond_replay",
            stream.key,
            replay.reason,
            expected,
            seq,
            lost,
            "blocks the lost batches stored are unknown (degraded)"
            if nothing_held
            else "clearing the engine and rebuilding it from the replay (degraded)",
        )
        if not nothing_held:
            self.metrics.resyncs.inc()
            if not self._clear(stream):
                return False
            replay.cursor = -1
        self.sync.lost(stream.key, now, lost)
        return True

    def _restarted_behind(self, stream: _Stream, why: str, now: float) -> None:
        """A gap, probe or takeover replay showed another process behind the engine's
        sockets (it restarted, and its new sequence may have passed the old one): clear the
        engine and replay the new process from 0, keeping the live batches held so far."""
        replay = stream.replay
        assert replay is not None
        log.warning(
            "event=engine_restart engine=%s detected_by=%s_replay: %s; clearing its blocks and "
            "replaying it from 0",
            stream.key,
            replay.reason,
            why,
        )
        self._cancel_replay(stream)  # its DEALER goes too: late answers cannot mix in
        self.metrics.resets.inc()
        if not self._clear(stream):
            return
        self.tracker.forget(stream.key)
        self.sync.restarted(stream.key, now)
        self._start_replay(stream, RESTART, 0, -1, now)
        assert stream.replay is not None
        stream.replay.buffered = {s: b for s, b in replay.buffered.items()}

    def _finish_replay(self, stream: _Stream, ok: bool, why: str = "") -> None:
        """End a replay: apply the buffered live batches in order. A hole left between them
        (batches dropped on the wire while the replay ran) starts another gap replay when this
        one worked and made progress; otherwise it is a loss (the engine is cleared and
        rebuilt, degraded)."""
        replay = stream.replay
        assert replay is not None
        now = time.monotonic()
        if ok and replay.verify_seq >= 0 and replay.last_replayed < 0:
            # Asked from our newest batch and given nothing: the process behind the socket
            # never published that seq (it restarted and has published less since).
            self._restarted_behind(stream, f"it holds no batch from seq {replay.verify_seq}", now)
            return
        stream.replay = None
        self._replaying.discard(stream.key)
        self.metrics.replays.labels(replay.reason, "succeeded" if ok else "failed").inc()
        if not ok:
            self.subscriber.drop_replay(stream.key)  # recreated on the next request
        if replay.reason == PROBE:
            if ok:
                self.sync.seen(stream.key, now)
            else:
                self._silent(stream, now)
        lost = 0
        cursor = replay.cursor
        expected: int | None = cursor + 1 if cursor >= 0 else None
        if replay.need is not None and replay.last_replayed < 0:
            expected = replay.need  # nothing replayed: the batches asked for are missing
        pending = sorted(replay.buffered)
        for i, seq in enumerate(pending):
            if seq <= cursor:
                self.metrics.duplicate_batches.inc()
                continue
            if expected is not None and seq > expected:
                if ok and replay.replayed and cursor >= 0 and stream.replay_endpoint is not None:
                    self._chain_replay(stream, cursor, replay, pending[i:], now)
                    return
                hole = seq - expected
                lost += hole
                nothing_held = cursor < 0 and replay.reason in _FROM_START
                if not nothing_held:
                    self.metrics.resyncs.inc()
                    if not self._clear(stream):
                        return
                self.sync.lost(stream.key, now, hole)
            decoded, digest = replay.buffered[seq]
            if not self._apply(stream, seq, decoded, digest, now):
                return  # the index failed: the engine recovers and is replayed again
            cursor = seq
            expected = seq + 1
        if lost:
            self.metrics.lost_batches.inc(lost)
        log_fn = log.info if ok and not lost else log.warning
        if replay.reason != PROBE or lost or not ok:
            log_fn(
                "event=replay_done engine=%s reason=%s ok=%s replayed=%d lost=%d%s",
                stream.key,
                replay.reason,
                ok,
                replay.replayed,
                lost,
                f" why={why!r}" if why else "",
            )
        # The tracker did not see buffered batches: restart it at the newest applied seq.
        self.tracker.forget(stream.key)
        if cursor >= 0:
            self.tracker.observe(stream.key, cursor)
        if replay.reason in _SYNC_REASONS:
            self.sync.replayed(stream.key, now)
        self._maybe_repair(stream)

    def _chain_replay(
        self, stream: _Stream, cursor: int, done: _Replay, remaining: list[int], now: float
    ) -> None:
        log.info(
            "event=seq_gap engine=%s expected=%d got=%d action=replay (during a replay)",
            stream.key,
            cursor + 1,
            remaining[0],
        )
        self.metrics.gaps.inc()
        self._start_replay(stream, GAP, cursor + 1, cursor, now)
        assert stream.replay is not None
        stream.replay.buffered = {seq: done.buffered[seq] for seq in remaining}

    def _check_timeouts(self, now: float) -> None:
        for key in list(self._holding):
            waiting = self._streams.get(key)
            if waiting is None or waiting.held is None:
                self._holding.discard(key)
            elif now - waiting.held.since > self.config.seq_confirm_s:
                # Nothing contradicted it: an engine that restarted and went idle.
                self._guard(self._believe, waiting, now)
        for key in list(self._replaying):
            stream = self._streams.get(key)
            if stream is None or stream.replay is None:
                self._replaying.discard(key)
            elif now > stream.replay.deadline:
                self._guard(self._finish_replay, stream, False, "timeout")

    # -- bad frames --------------------------------------------------------------------------

    def _on_bad(self, message: BadMessage) -> None:
        self.metrics.malformed_frames.labels(message.reason).inc()
        self._warn_once(
            f"bad:{message.source}:{message.reason}",
            "event=malformed_frame source=%s reason=%s detail=%r replay=%s",
            message.source,
            message.reason,
            message.detail,
            message.replay,
        )

    # -- discovery ---------------------------------------------------------------------------

    def _apply_discovery(self, entries: Mapping[str, EngineEntry]) -> None:
        ranks: dict[str, RankSource] = {}
        for entry in entries.values():
            for rank in rank_sources(entry, self.config.dp_port_stride):
                ranks[rank.endpoint] = rank
        for key in set(self._ranks) - set(ranks):
            self._purge(key)
        for endpoint in [e for e, r in self._source_identity.items() if r.endpoint not in ranks]:
            self.subscriber.disconnect(endpoint)
            del self._source_identity[endpoint]
        for rank in ranks.values():
            if rank.zmq is not None and rank.zmq not in self._source_identity:
                self.subscriber.connect(rank.zmq)
                self._source_identity[rank.zmq] = rank
                log.info("event=zmq_connect endpoint=%s engine=%s", rank.zmq, rank.endpoint)
        self._ranks = ranks
        for key in ranks:
            self._undiscovered.pop(key, None)
        resolved: dict[str, frozenset[str]] = {}  # host -> its addresses, resolved once
        addresses: dict[str, frozenset[str]] = {}
        by_host: dict[str, list[str]] = {}
        for key in ranks:
            host = _host_of(key)
            if host is None:
                continue
            by_host.setdefault(host, []).append(key)
            if host not in resolved:
                resolved[host] = resolve_host(host)
            addresses[key] = resolved[host]
        self._endpoints_by_host = by_host
        self.peers.set_engines(addresses)
        with self._activity_lock:
            for key, record in list(self._activity.items()):
                record.discovered = key in ranks
                if not record.discovered and key not in self._streams:
                    del self._activity[key]
            for key, rank in ranks.items():
                record = self._activity_of(key)
                record.discovered = True
                record.model = record.model or rank.model
        now = time.monotonic()
        for key in ranks:
            self.sync.known(key, now)
        for stream in self._streams.values():
            stream.replay_endpoint = self._replay_endpoint(stream.key)
            discovered = ranks.get(stream.key)
            if discovered is not None and discovered.model:
                stream.model = discovered.model
        self.metrics.discovered_engines.set(len(entries))
        self._update_source_gauges()

    def _purge(self, key: str) -> None:
        log.info("event=engine_purged engine=%s (left discovery)", key)
        self._drop_engine(key)
        self.metrics.purges.inc()

    def _drop_engine(self, key: str) -> None:
        """Forget everything of engine ``key``: its index entries, stream, sequence, activity
        record and metric series."""
        self._undiscovered.pop(key, None)
        self._purge_from_index(key)
        self.applier.forget(key)
        self.tracker.forget(key)
        self._streams.pop(key, None)
        self._replaying.discard(key)
        self._recovering.discard(key)
        self._holding.discard(key)
        self.sync.forget(key)
        with self._activity_lock:
            self._activity.pop(key, None)
        self.subscriber.drop_replay(key)
        self.metrics.forget_engine(key)

    def _purge_from_index(self, key: str) -> None:
        """Purge an engine's blocks; while the index is down, retried once it is back (the
        set is bounded by the engines that left)."""
        try:
            self.index.purge(key)
        except IndexUnavailable as exc:
            self.metrics.index_unavailable.inc()
            log.warning(
                "event=index_unavailable engine=%s op=purge error=%r action=retry_when_healthy",
                key,
                exc.reason,
            )
            self._purges_pending.add(key)
        else:
            self._purges_pending.discard(key)

    def _update_source_gauges(self) -> None:
        bound, connected = self.subscriber.counts()
        self.metrics.sources.labels("bind").set(bound)
        self.metrics.sources.labels("connect").set(connected)


def _host_of(endpoint: str) -> str | None:
    try:
        return split_host_port(endpoint)[0]
    except HostPortError:
        return None
