"""The Redis block index: the in-memory backend's behaviour, with state shared by replicas.

Layout and protocol are in docs/redis.md. In short: per (tier, content key) a bitmap of
engine slots (TTL refreshed on store), per (engine slot, tier) a hash engine hash -> content
key(s), an engine <-> slot registry, and an epoch key that disappears when Redis loses its
data. Each public call is one round trip: a Lua script (redis_scripts.py) that does the whole
operation atomically, so concurrent writers (replicas, a remove racing a store) cannot leave
half-applied batches.

Thread safety: the client uses a blocking connection pool (one connection per concurrent
call, up to ``max_connections``) and the little local state (health, epoch) is guarded by a
lock, so one instance may be shared by an ingest thread and a lookup thread pool.

Faults: no call lets a Redis error escape except :meth:`RedisIndex.apply`, which raises
:class:`IndexUnavailable` (one type, documented) so the caller can schedule a replay of that
engine. Reads return empty results while degraded. After a failure the index backs off
(exponentially, capped) and fails fast until the next probe time, so a dead Redis costs no
timeouts on the hot path.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kvindex.errors import KVIndexError
from kvindex.index import redis_scripts
from kvindex.index.base import (
    BlockIndex,
    Clear,
    IndexOp,
    IndexStats,
    PrefixMatch,
    Remove,
    Store,
    Tier,
)
from kvindex.index.redis_schema import (
    GroupKeys,
    RedisKeySchema,
    StreamPosition,
    encode_engine_hash,
)
from kvindex.keys import ContentKey
from kvindex.wire import EngineHash

__all__ = [
    "REDIS_ERRORS",
    "ClientSource",
    "IndexHealth",
    "IndexUnavailable",
    "NotWriter",
    "RedisIndex",
    "RedisIndexConfig",
    "ResetCallback",
    "redis_client_from_url",
]

log = logging.getLogger(__name__)

RedisClient = redis.Redis | RedisCluster
# A client, or a factory called (again after each failure) until it returns one: RedisCluster
# connects in its constructor, so a cluster that is down at start-up needs the factory.
ClientSource = RedisClient | Callable[[], RedisClient]
# What a Redis call may raise: RedisClusterException is no RedisError.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)
ResetCallback = Callable[[str | None, str], None]  # (old epoch, new epoch)

# Estimated Redis memory per structure, measured by benchmarks/redis_index.py (Redis 7.0,
# jemalloc, MEMORY USAGE): a holder bitmap key of a few bytes, one engine-map hash field.
BYTES_PER_HOLDER_KEY = 96
BYTES_PER_MAP_ENTRY = 68

_SCRIPTS = (
    "APPLY",
    "AGE",
    "ASSIGN",
    "ENGINE_LEASES",
    "MEMBERS",
    "RESOLVE",
    "ENGINES",
    "LOOKUP",
    "PING",
)

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class IndexUnavailable(KVIndexError):
    """Redis could not apply the batch (unreachable, timed out, out of memory, read-only
    replica, or degraded and backing off). The batch is all-or-nothing, and nothing unless
    the call timed out (Redis may run it when it resumes): the caller should request a
    replay of this engine once :meth:`RedisIndex.health` is ok (replays are idempotent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotWriter(IndexUnavailable):
    """The batch was refused because this instance's fencing owner does not hold the writer
    lease (another replica took over); nothing was written."""


@dataclass(frozen=True, slots=True)
class RedisIndexConfig:
    prefix: str = "kvi"  # key prefix, used as the hash tag: keys are {prefix}:...
    ttl_seconds: int | None = 3600  # holder bitmaps expire unless re-stored; None = never
    backoff_initial_s: float = 0.05  # first wait after a failure before Redis is probed
    backoff_max_s: float = 5.0
    stats_scan_count: int = 1000  # SCAN COUNT hint for stats()
    # Engine groups (docs/redis.md, "Sharding"): each engine's keys live in one group's hash
    # slot; lookups run one script per group, pipelined. 1: the whole index in one slot.
    groups: int = 1
    # age_copies() ticks each group at most once per this interval, whichever replica calls
    # (0: every call ticks, as the in-memory index does).
    copy_age_interval_s: float = 0.0


@dataclass(frozen=True, slots=True)
class IndexHealth:
    ok: bool
    reason: str | None  # why degraded (last Redis error), None when ok
    epoch: str | None  # the data generation last seen (None before first contact)
    resets: int  # epoch changes seen (Redis lost its data) since this instance started
    failed_applies: int
    failed_reads: int  # lookups / resolves / engines / stats answered empty while degraded
    degraded_for_s: float | None  # seconds since the first failure of this outage


def redis_client_from_url(
    url: str,
    *,
    cluster: bool = False,
    socket_timeout: float = 1.0,
    connect_timeout: float = 1.0,
    max_connections: int = 32,
    **kwargs: Any,
) -> RedisClient:
    """A redis-py client for ``redis://``, ``rediss://`` (TLS), ``unix://`` URLs (password,
    ``user:password@`` ACL user and ``/db`` as redis-py parses them), or a cluster for
    ``redis+cluster://`` / ``rediss+cluster://`` / ``cluster=True``; a bare ``host:port``
    (llm-d's ``redisAddr``) means ``redis://host:port``. redis-py's own retries
    are off: :class:`RedisIndex` owns backoff, so a dead Redis fails fast."""
    if "://" not in url:  # llm-d's redisAddr form "host:port"
        url = "redis://" + url
    scheme, sep, rest = url.partition("://")
    if scheme in _CLUSTER_SCHEMES:
        cluster = True
        url = _CLUSTER_SCHEMES[scheme] + sep + rest
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), 0),
        **kwargs,
    }
    if cluster:
        if url.startswith("unix://"):
            raise ValueError("Redis Cluster cannot be reached over a unix socket URL")
        return RedisCluster.from_url(url, max_connections=max_connections, **common)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=connect_timeout + socket_timeout, **common
    )
    return redis.Redis(connection_pool=pool)


class RedisIndex:
    """Redis implementation of :class:`kvindex.index.base.BlockIndex` (plus health/epoch)."""

    def __init__(
        self,
        client: ClientSource,
        config: RedisIndexConfig | None = None,
        *,
        fencing_owner: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or RedisIndexConfig()
        self.schema = RedisKeySchema(self.config.prefix, self.config.groups)
        self.groups = self.config.groups
        self._factory: Callable[[], RedisClient] | None = None
        self._client: RedisClient | None = None
        if isinstance(client, redis.Redis | RedisCluster):
            self._client = client
        else:
            self._factory = client
        self._connect_lock = threading.Lock()
        self._scripts: dict[str, Script] = {}
        self._clock = clock
        self._fencing_owner = fencing_owner
        self._ttl = max(0, int(self.config.ttl_seconds or 0))
        self._lock = threading.Lock()
        self._candidates = [uuid.uuid4().hex for _ in range(self.groups)]
        self._epochs: list[str | None] = [None] * self.groups
        self._group_of: dict[str, int] = {}  # engine -> group (several groups only)
        # engine -> position to record with its next write
        self._positions: dict[str, StreamPosition] = {}
        self._fence_engine = False  # fencing by the engine's own lease (EngineLeases)
        self._resets = 0
        self._reset_callbacks: list[ResetCallback] = []
        self._down_reason: str | None = None
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._failed_applies = 0
        self._failed_reads = 0
        self._sent = 0  # calls sent, and per group the newest whose reply set the epoch
        self._observed_seq = [0] * self.groups

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "kvi",
        ttl_seconds: int | None = 3600,
        cluster: bool = False,
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        max_connections: int = 32,
        fencing_owner: str | None = None,
        backoff_max_s: float = 5.0,
        groups: int = 1,
        copy_age_interval_s: float = 0.0,
        **client_kwargs: Any,
    ) -> RedisIndex:
        """One call from ``--redis-url`` to an index (see :func:`redis_client_from_url`).
        Connects lazily: a Redis that is down at start-up yields a degraded index."""

        def connect() -> RedisClient:
            return redis_client_from_url(
                url,
                cluster=cluster,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                max_connections=max_connections,
                **client_kwargs,
            )

        is_cluster = cluster or url.partition("://")[0] in _CLUSTER_SCHEMES
        client: ClientSource = connect if is_cluster else connect()
        config = RedisIndexConfig(
            prefix=prefix,
            ttl_seconds=ttl_seconds,
            backoff_max_s=backoff_max_s,
            groups=groups,
            copy_age_interval_s=copy_age_interval_s,
        )
        return cls(client, config, fencing_owner=fencing_owner)

    def connected_client(self) -> RedisClient:
        """The redis-py client, created on first use when built from a factory (raises one
        of REDIS_ERRORS if that fails). The writer lease shares it."""
        client = self._client
        if client is not None and self._scripts:
            return client  # the hot path: no lock once connected
        with self._connect_lock:
            if self._client is None:
                assert self._factory is not None
                self._client = self._factory()
            if not self._scripts:
                self._scripts = {
                    name: self._client.register_script(getattr(redis_scripts, name))
                    for name in _SCRIPTS
                }
            return self._client

    # -- health and epoch --------------------------------------------------------------------

    def on_reset(self, callback: ResetCallback) -> None:
        """Call ``callback(old_epoch, new_epoch)`` (from the thread that noticed) whenever the
        epoch changes: Redis lost its data (restart without persistence, FLUSHALL, eviction
        of the epoch), so every engine must be replayed in full."""
        with self._lock:
            self._reset_callbacks.append(callback)

    def generation(self) -> str | None:
        """The epoch token last seen (with several groups, theirs joined by ``|``): equal on
        every replica sharing this Redis and prefix; it changes exactly when data was lost."""
        with self._lock:
            return self._generation()

    def _generation(self) -> str | None:
        if self.groups == 1:
            return self._epochs[0]
        if any(e is None for e in self._epochs):
            return None
        return "|".join(e or "" for e in self._epochs)

    def set_fencing_owner(self, owner: str | None, *, per_engine: bool = False) -> None:
        """Refuse writes (NotWriter) unless ``owner`` holds the writer lease of this prefix,
        or with ``per_engine`` the lease of the engine written (:class:`EngineLeases`);
        checked inside the apply script, so a paused ex-writer cannot write late."""
        with self._lock:
            self._fencing_owner = owner
            self._fence_engine = per_engine

    def note_position(self, engine: str, seq: int, digest: int | None = None) -> None:
        """Record ``seq`` (and its batch's payload ``digest``) as the engine's stream position
        with its next write (atomically with that batch; :meth:`positions` reads it back:
        where a new writer resumes, checking the engine still holds that batch)."""
        with self._lock:
            self._positions[engine] = StreamPosition(seq, digest)

    def take_position(self, engine: str) -> StreamPosition | None:
        """The noted position not yet written (removed: the caller writes it)."""
        with self._lock:
            return self._positions.pop(engine, None)

    def positions(self, engines: Sequence[str]) -> dict[str, StreamPosition]:
        """The stream positions recorded for ``engines`` (absent: none recorded)."""
        out: dict[str, StreamPosition] = {}
        for engine in engines:
            group = self.group_of(engine, allocate=False)
            if group is None:
                continue
            client = self.connected_client()
            value = client.hget(self.schema.group(group).positions, engine)
            position = None if value is None else StreamPosition.parse(_text(value))
            if position is not None:
                out[engine] = position
        return out

    def health(self) -> IndexHealth:
        """Probe Redis (unless backing off) and report."""
        with contextlib.suppress(IndexUnavailable):
            self._run("PING", [])
        with self._lock:
            since = self._down_since
            return IndexHealth(
                ok=self._down_reason is None,
                reason=self._down_reason,
                epoch=self._generation(),
                resets=self._resets,
                failed_applies=self._failed_applies,
                failed_reads=self._failed_reads,
                degraded_for_s=None if since is None else self._clock() - since,
            )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- the round trip ----------------------------------------------------------------------

    def _run(self, name: str, args: list[Any], group: int = 0) -> list[Any]:
        return self._run_groups(name, [(group, args)])[0]

    def _run_groups(self, name: str, calls: Sequence[tuple[int, list[Any]]]) -> list[list[Any]]:
        """Run script ``name`` once per (group, args): one call, or one pipeline over the
        groups' shards (each script atomic on its own shard)."""
        now = self._clock()
        with self._lock:
            if self._down_reason is not None and now < self._retry_at:
                raise IndexUnavailable(f"degraded (backing off): {self._down_reason}")
            candidates = list(self._candidates)
            self._sent += 1
            seq = self._sent
        try:
            client = self.connected_client()
            script = self._scripts[name]
            if len(calls) == 1:
                group, args = calls[0]
                keys = self.schema.group(group)
                replies = [script(keys=[keys.epoch], args=[keys.base, candidates[group], *args])]
            else:
                replies = self._pipelined_scripts(client, script, calls, candidates)
        except REDIS_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"
            with self._lock:
                if self._down_reason is None:
                    self._down_since = now
                    log.warning("redis index degraded: %s", reason)
                self._down_reason = reason
                self._backoff = min(
                    self.config.backoff_max_s,
                    self._backoff * 2 if self._backoff else self.config.backoff_initial_s,
                )
                self._retry_at = now + self._backoff
            raise IndexUnavailable(reason) from exc
        results = [cast(list[Any], reply) for reply in replies]
        for (group, _), result in zip(calls, results, strict=True):
            self._observe(_text(result[0]), seq, group)
        return results

    def _pipelined_scripts(
        self,
        client: RedisClient,
        script: Script,
        calls: Sequence[tuple[int, list[Any]]],
        candidates: list[str],
    ) -> list[Any]:
        for attempt in (0, 1):
            pipe = client.pipeline(transaction=False)
            for group, args in calls:
                keys = self.schema.group(group)
                pipe.evalsha(script.sha, 1, keys.epoch, keys.base, candidates[group], *args)
            try:
                return cast(list[Any], pipe.execute())
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                client.script_load(script.script)  # a cluster loads it on every primary
        raise AssertionError("unreachable")

    def _observe(self, epoch: str, seq: int, group: int = 0) -> None:
        fire: list[ResetCallback] = []
        with self._lock:
            if self._down_reason is not None:
                log.warning("redis index recovered after: %s", self._down_reason)
            self._down_reason = None
            self._down_since = None
            self._backoff = 0.0
            if epoch == self._candidates[group]:
                # ours was installed; the next reset needs a new one
                self._candidates[group] = uuid.uuid4().hex
            # Replies of concurrent calls may be processed out of order; an epoch older than
            # what a later-sent call already reported must not count as a (second) reset.
            if seq < self._observed_seq[group]:
                return
            self._observed_seq[group] = seq
            old_generation = self._generation()
            previous = self._epochs[group]
            self._epochs[group] = epoch
            old, epoch = old_generation, self._generation() or epoch
            if previous is not None and previous != self._epochs[group]:
                self._resets += 1
                self._group_of.clear()  # the registry may have been lost with it
                fire = list(self._reset_callbacks)
        if fire:
            log.warning("redis index epoch changed %s -> %s: data lost, replay needed", old, epoch)
        for callback in fire:
            try:
                callback(old, epoch)
            except Exception:  # a subscriber's bug must not fail the lookup that noticed
                log.exception("redis index on_reset callback failed")

    def _read_failed(self) -> None:
        with self._lock:
            self._failed_reads += 1

    # -- engine groups ---------------------------------------------------------------------

    def group_of(self, engine: str, *, allocate: bool = False) -> int | None:
        """The engine's group (0 with one group). With several, the registry on group 0
        assigns an unknown engine to the group with the fewest engines when ``allocate``;
        None: not assigned. Cached (cleared on a reset). Raises IndexUnavailable."""
        if self.groups == 1:
            return 0
        with self._lock:
            group = self._group_of.get(engine)
        if group is not None:
            return group
        reply = self._run("ASSIGN", [engine, "1" if allocate else "0", self.groups])
        found = int(reply[1])
        if found < 0:
            return None
        with self._lock:
            self._group_of[engine] = found
        return found

    # -- writes ------------------------------------------------------------------------------

    def apply(self, engine: str, ops: Sequence[IndexOp]) -> None:
        """Apply one batch atomically in one round trip. Raises IndexUnavailable (NotWriter
        when fenced out; then nothing was written)."""
        if not ops:
            return
        has_store, args = _apply_args(ops)
        self._write(engine, has_store, args)

    def apply_many(
        self, batches: Sequence[tuple[str, Sequence[IndexOp], StreamPosition | None]]
    ) -> list[IndexUnavailable | None]:
        """Apply several (engine, ops, position) batches in one pipeline (each atomic on
        its engine's shard; the scripts of one engine run in order). Per batch: None when
        applied, NotWriter when fenced out; raises IndexUnavailable when the pipeline
        failed (any part of it may have been applied: replays are idempotent)."""
        with self._lock:
            owner = self._fencing_owner or ""
            mode = "E" if self._fence_engine else "G"
        calls: list[tuple[int, list[Any]]] = []
        index_of: list[int] = []
        for i, (engine, ops, position) in enumerate(batches):
            has_store, args = _apply_args(ops)
            group = self.group_of(engine, allocate=has_store == "1" or position is not None)
            if group is None or (not args and position is None):
                continue
            calls.append(
                (group, [owner, mode, self._ttl, engine, has_store, _pos(position), *args])
            )
            index_of.append(i)
        out: list[IndexUnavailable | None] = [None] * len(batches)
        if not calls:
            return out
        try:
            replies = self._run_groups("APPLY", calls)
        except IndexUnavailable:
            with self._lock:
                self._failed_applies += len(calls)
            raise
        for i, reply in zip(index_of, replies, strict=True):
            if int(reply[1]) == 0:
                with self._lock:
                    self._failed_applies += 1
                out[i] = NotWriter(f"writer lease of {batches[i][0]} is not held by {owner!r}")
        return out

    def purge(self, engine: str) -> None:
        """Forget the engine (its bits, maps and slot). Raises IndexUnavailable like apply."""
        self._write(engine, "0", ["P", "*", 0])
        if self.groups > 1:
            with self._lock:
                self._group_of.pop(engine, None)
            try:
                self._run("ASSIGN", [engine, "D", self.groups])
            except IndexUnavailable:
                with self._lock:
                    self._failed_applies += 1
                raise

    def age_copies(self) -> None:
        """One tick of the copy clock in every group (docs/index.md, "Duplicates"); with
        ``copy_age_interval_s`` at most one tick per interval whichever replica calls.
        Raises IndexUnavailable."""
        interval = str(int(self.config.copy_age_interval_s * 1000))
        self._run_groups("AGE", [(g, [interval]) for g in range(self.groups)])

    def _write(self, engine: str, has_store: str, ops: list[Any]) -> None:
        with self._lock:
            owner = self._fencing_owner or ""
            mode = "E" if self._fence_engine else "G"
            position = self._positions.pop(engine, None)
        try:
            group = self.group_of(engine, allocate=has_store == "1" or position is not None)
            if group is None:
                return  # never stored anything: nothing to remove or clear
            reply = self._run(
                "APPLY",
                [owner, mode, self._ttl, engine, has_store, _pos(position), *ops],
                group,
            )
        except IndexUnavailable:
            with self._lock:
                self._failed_applies += 1
            raise
        if int(reply[1]) == 0:
            with self._lock:
                self._failed_applies += 1
            raise NotWriter(f"writer lease of {engine} is not held by {owner!r}")

    def flush_position(self, engine: str) -> None:
        """Record a noted position that no write carried yet (a batch whose events were all
        held back). Raises IndexUnavailable / NotWriter."""
        with self._lock:
            if engine not in self._positions:
                return
        self._write(engine, "0", [])

    # -- reads -------------------------------------------------------------------------------

    def resolve(self, engine: str, engine_hash: EngineHash) -> ContentKey | None:
        """As the in-memory backend; None as well while degraded."""
        try:
            group = self.group_of(engine)
            if group is None:
                return None
            reply = self._run("RESOLVE", [engine, encode_engine_hash(engine_hash)], group)
        except IndexUnavailable:
            self._read_failed()
            return None
        value = reply[1]
        if not value:
            return None
        return int(_text(value).rsplit(",", 1)[-1])

    def lookup(
        self, keys: Sequence[ContentKey], engines: Collection[str] | None = None
    ) -> dict[str, PrefixMatch]:
        """One round trip whatever the prompt length (one script per group, pipelined);
        {} while degraded."""
        if not keys or (engines is not None and not engines):
            return {}
        names = [] if engines is None else sorted(set(engines))
        count = -1 if engines is None else len(names)
        args: list[Any] = [count, *names, *keys]
        try:
            replies = self._run_groups("LOOKUP", [(g, args) for g in range(self.groups)])
        except IndexUnavailable:
            self._read_failed()
            return {}
        result: dict[str, PrefixMatch] = {}
        for reply in replies:
            for i in range(1, len(reply), 4):
                blocks, n_cpu, n_storage = int(reply[i + 1]), int(reply[i + 2]), int(reply[i + 3])
                result[_text(reply[i])] = PrefixMatch(
                    blocks, [blocks - n_cpu - n_storage, n_cpu, n_storage]
                )
        return result

    def engines(self) -> list[str]:
        try:
            replies = self._run_groups("ENGINES", [(g, []) for g in range(self.groups)])
        except IndexUnavailable:
            self._read_failed()
            return []
        return sorted({_text(name) for reply in replies for name in reply[1:]})

    def stats(self) -> IndexStats:
        """Counts by SCAN over this prefix's holder keys: O(keys), for diagnostics and
        metrics scrapes, not the hot path. Zeros while degraded. ``evictions`` is the
        server's ``evicted_keys`` (server-wide: Redis does not count per prefix)."""
        try:
            return self._stats()
        except Exception as exc:
            if not isinstance(exc, (*REDIS_ERRORS, IndexUnavailable)):
                raise
            log.debug("redis index stats unavailable: %s", exc)
            self._read_failed()
            return IndexStats(keys=0, entries=0, engines=0, evictions=0, approx_bytes=0)

    def group_stats(self) -> list[tuple[int, int]]:
        """Per group: (holder keys, engine-map entries). Raises one of REDIS_ERRORS."""
        out = []
        client = self.connected_client()
        for keys in self.schema.group_keys:
            holder_keys = self._scan(keys.holders_pattern, keys)
            slots = cast(dict[Any, Any], client.hgetall(keys.engine_slots))
            map_keys = [
                keys.engine_map(int(slot), tier) for slot in slots.values() for tier in Tier
            ]
            entries = sum(
                int(n) for n in self._pipelined(lambda pipe, key: pipe.hlen(key), map_keys)
            )
            out.append((len(holder_keys), entries))
        return out

    def _stats(self) -> IndexStats:
        engines = self.engines()
        client = self.connected_client()
        distinct: set[str] = set()
        entries = 0
        n_holder_keys = 0
        map_entries = 0
        for keys in self.schema.group_keys:
            holder_keys = self._scan(keys.holders_pattern, keys)
            n_holder_keys += len(holder_keys)
            counts = self._pipelined(lambda pipe, key: pipe.bitcount(key), holder_keys)
            for key, count in zip(holder_keys, counts, strict=True):
                if int(count):
                    entries += int(count)
                    distinct.add(key.rsplit(":", 1)[-1])
            slots = cast(dict[Any, Any], client.hgetall(keys.engine_slots))
            map_keys = [
                keys.engine_map(int(slot), tier) for slot in slots.values() for tier in Tier
            ]
            map_entries += sum(
                int(n) for n in self._pipelined(lambda pipe, key: pipe.hlen(key), map_keys)
            )
        return IndexStats(
            keys=len(distinct),
            entries=entries,
            engines=len(engines),
            evictions=self._server_evictions(client),
            approx_bytes=n_holder_keys * BYTES_PER_HOLDER_KEY + map_entries * BYTES_PER_MAP_ENTRY,
        )

    def _scan(self, pattern: str, keys: GroupKeys | None = None) -> list[str]:
        count = self.config.stats_scan_count
        client = self.connected_client()
        if isinstance(client, RedisCluster):
            epoch = (keys or self.schema.home).epoch
            node = client.get_node_from_key(epoch)  # type: ignore[no-untyped-call]
            found = client.scan_iter(match=pattern, count=count, target_nodes=node)
        else:
            found = client.scan_iter(match=pattern, count=count)
        return [_text(key) for key in found]

    def _pipelined(self, command: Callable[[Any, str], Any], keys: list[str]) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(keys), 1000):
            pipe = self.connected_client().pipeline(transaction=False)
            for key in keys[start : start + 1000]:
                command(pipe, key)
            out += pipe.execute()
        return out

    @staticmethod
    def _server_evictions(client: RedisClient) -> int:
        try:
            info: Any = client.info("stats")
        except REDIS_ERRORS:
            return 0
        if isinstance(client, RedisCluster):  # {node: section}
            return sum(int(v.get("evicted_keys", 0)) for v in info.values() if isinstance(v, dict))
        return int(info.get("evicted_keys", 0))


def _apply_args(ops: Sequence[IndexOp]) -> tuple[str, list[Any]]:
    """('1' if the batch stores, the APPLY script's op arguments)."""
    args: list[Any] = []
    has_store = False
    for op in ops:
        if isinstance(op, Store):
            has_store = True
            n = len(op.blocks)
            first_copy = n if op.copies_from is None else max(0, op.copies_from)
            args += ("S", int(op.tier), n, min(first_copy, n))
            for block in op.blocks:
                args += (encode_engine_hash(block.engine_hash), len(block.keys), *block.keys)
        elif isinstance(op, Remove):
            args += ("R", int(op.tier), len(op.engine_hashes))
            args += map(encode_engine_hash, op.engine_hashes)
        elif isinstance(op, Clear):
            args += ("C", "*" if op.tier is None else int(op.tier), 0)
    return ("1" if has_store else "0"), args


def _pos(position: StreamPosition | None) -> str:
    return "" if position is None else position.encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


if TYPE_CHECKING:  # mypy proves RedisIndex satisfies the BlockIndex protocol

    def _is_block_index(index: RedisIndex) -> BlockIndex:
        return index
