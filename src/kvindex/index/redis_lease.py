"""Writer election for replicas sharing one Redis index: a lease key (``SET NX PX``).

:class:`WriterLease` is the decision logic (pure apart from its :class:`LeaseStore` and a
clock); :class:`RedisLeaseStore` is the Redis side. The lease key is ``{prefix}:lease`` of the
index, in the index's hash slot, so the apply script can also check it (fencing:
:meth:`kvindex.index.redis.RedisIndex.set_fencing_owner`): a writer that paused past its
lease and wakes up cannot write late.

Usage (the service's ingest loop, every ``lease.renew_interval_s``)::

    lease = redis_writer_lease(index)          # owner: a fresh token per process
    index.set_fencing_owner(lease.owner)
    if lease.tick():                           # renew if writer, else try to take over
        ...apply batches...
    else:
        ...track sequence numbers only; on becoming writer, request replays...
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from kvindex.index import redis_scripts
from kvindex.index.redis import REDIS_ERRORS, ClientSource, IndexUnavailable, RedisIndex
from kvindex.index.redis_schema import StreamPosition

__all__ = [
    "EngineLeases",
    "LeaseRound",
    "LeaseStore",
    "LeaseView",
    "RedisLeaseStore",
    "WriterLease",
    "redis_writer_lease",
]

log = logging.getLogger(__name__)

_ROUND_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, IndexUnavailable)


class LeaseStore(Protocol):
    """Atomic lease primitives; each may raise on I/O failure."""

    def acquire(self, owner: str, ttl_ms: int) -> bool:
        """Take the lease if free (or extend it if ``owner`` holds it)."""
        ...

    def renew(self, owner: str, ttl_ms: int) -> bool:
        """Extend the lease only if ``owner`` holds it."""
        ...

    def release(self, owner: str) -> bool:
        """Drop the lease only if ``owner`` holds it."""
        ...

    def holder(self) -> str | None: ...


class RedisLeaseStore:
    """:class:`LeaseStore` on one Redis key, with compare-and-set scripts."""

    def __init__(self, client: ClientSource, key: str) -> None:
        self.key = key
        self._source = client

    def _client(self) -> redis.Redis | redis.RedisCluster:
        source = self._source
        return source if isinstance(source, redis.Redis | redis.RedisCluster) else source()

    def _script(self, source: str, owner: str, *extra: int) -> bool:
        script = self._client().register_script(source)  # no I/O: EVALSHA, load on NOSCRIPT
        return bool(script(keys=[self.key], args=[owner, *extra]))

    def acquire(self, owner: str, ttl_ms: int) -> bool:
        return self._script(redis_scripts.LEASE_ACQUIRE, owner, ttl_ms)

    def renew(self, owner: str, ttl_ms: int) -> bool:
        return self._script(redis_scripts.LEASE_RENEW, owner, ttl_ms)

    def release(self, owner: str) -> bool:
        return self._script(redis_scripts.LEASE_RELEASE, owner)

    def holder(self) -> str | None:
        value = self._client().get(self.key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)


class WriterLease:
    """Whether this process is the one writer. ``is_writer`` is decided by the local clock:
    true until ``ttl_s * (1 - safety)`` after the request that last took or renewed the
    lease was *sent*, so it turns false before Redis can expire the key and hand it to
    another replica. Store errors never raise: they just stop the lease being extended."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        owner: str | None = None,
        ttl_s: float = 10.0,
        safety: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or not 0 <= safety < 1:
            raise ValueError("lease ttl_s must be > 0 and safety in [0, 1)")
        self.store = store
        self.owner = owner or uuid.uuid4().hex
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._valid_for = ttl_s * (1 - safety)
        self._clock = clock
        self._valid_until = 0.0
        self.takeovers = 0  # times this process became writer
        self.errors = 0  # store calls that failed

    @property
    def renew_interval_s(self) -> float:
        """How often to call :meth:`tick` (a third of the TTL: two renewals may fail)."""
        return self.ttl_s / 3

    @property
    def is_writer(self) -> bool:
        return self._clock() < self._valid_until

    def try_acquire(self) -> bool:
        """Become writer if the lease is free (or already ours). Returns ``is_writer``."""
        was = self.is_writer
        sent = self._clock()
        try:
            ok = self.store.acquire(self.owner, self._ttl_ms)
        except REDIS_ERRORS as exc:
            self._failed("acquire", exc)
            return self.is_writer
        if ok:
            self._valid_until = sent + self._valid_for
            if not was:
                self.takeovers += 1
                log.info("writer lease taken by %s", self.owner)
        return self.is_writer

    def renew(self) -> bool:
        """Extend a lease we hold; False (and not writer) if another owner has it."""
        if self._valid_until == 0.0:
            return False
        sent = self._clock()
        try:
            ok = self.store.renew(self.owner, self._ttl_ms)
        except REDIS_ERRORS as exc:
            self._failed("renew", exc)
            return self.is_writer
        if ok:
            self._valid_until = sent + self._valid_for
        else:
            if self._valid_until:
                log.warning("writer lease of %s lost", self.owner)
            self._valid_until = 0.0
        return self.is_writer

    def tick(self) -> bool:
        """Renew when writer, else try to take over; returns ``is_writer``."""
        if self.is_writer:
            return self.renew()
        self._valid_until = 0.0
        return self.try_acquire()

    def release(self) -> None:
        """Step down (shutdown): the next replica can take over at once."""
        self._valid_until = 0.0
        try:
            self.store.release(self.owner)
        except REDIS_ERRORS as exc:
            self._failed("release", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        self.errors += 1
        log.warning("writer lease %s failed: %s", what, exc)


def redis_writer_lease(
    index: RedisIndex, *, owner: str | None = None, ttl_s: float = 10.0
) -> WriterLease:
    """A lease on ``index``'s lease key, through the index's client."""
    store = RedisLeaseStore(index.connected_client, index.schema.lease)
    return WriterLease(store, owner=owner, ttl_s=ttl_s)


@dataclass(frozen=True, slots=True)
class LeaseView:
    """What one lease round saw of an engine."""

    ours: bool  # this replica holds the engine's lease (and may write its stream)
    held: bool  # some replica holds it
    state: str  # the writer's published sync state ('' if none)
    position: StreamPosition | None  # recorded with this engine's newest write (None: none)


@dataclass(slots=True)
class LeaseRound:
    """The result of :meth:`EngineLeases.tick`."""

    gained: list[str] = field(default_factory=list)  # became writer: resync by replay
    lost: list[str] = field(default_factory=list)  # stopped being writer: stop writing
    views: dict[str, LeaseView] = field(default_factory=dict)
    members: int = 0


class EngineLeases:
    """One writer per engine stream: :class:`WriterLease` generalised to a lease per engine
    (docs/redis.md, "Writer model"). Every replica calls :meth:`tick` with the engines it
    knows every ``renew_interval_s``; it heartbeats its membership (``{p}:members``), renews
    the leases it holds, releases those beyond its fair share (ceil(engines / live replicas))
    and takes free ones up to that share. A lease key lives in its engine's group slot, so the
    apply script checks it (``index.set_fencing_owner(owner, per_engine=True)``): a replica
    whose lease lapsed cannot write late. ``owns`` is decided by the local clock as in
    WriterLease: true until ``ttl_s * (1 - safety)`` after the round that renewed it was sent.
    A dead writer's engines are free after ``ttl_s`` and taken within one more interval:
    takeover within ``ttl_s * 4 / 3``. Store errors never raise (nothing is renewed)."""

    def __init__(
        self,
        index: RedisIndex,
        *,
        owner: str | None = None,
        ttl_s: float = 10.0,
        safety: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or not 0 <= safety < 1:
            raise ValueError("lease ttl_s must be > 0 and safety in [0, 1)")
        self.index = index
        self.owner = owner or uuid.uuid4().hex
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._valid_for = ttl_s * (1 - safety)
        self._clock = clock
        self._lock = threading.Lock()
        self._valid_until: dict[str, float] = {}
        self.takeovers = 0
        self.errors = 0
        self.members = 1
        self.listener: Callable[[LeaseRound, list[str]], None] | None = None  # (round, owned)

    @property
    def renew_interval_s(self) -> float:
        return self.ttl_s / 3

    def owns(self, engine: str) -> bool:
        """May this replica write ``engine``'s stream now (thread-safe)?"""
        with self._lock:
            return self._clock() < self._valid_until.get(engine, 0.0)

    def forfeit(self, engine: str) -> None:
        """The apply script refused a write (the lease lapsed): not writer any more."""
        with self._lock:
            self._valid_until.pop(engine, None)

    def owned(self) -> list[str]:
        now = self._clock()
        with self._lock:
            return sorted(e for e, until in self._valid_until.items() if now < until)

    def tick(self, engines: Sequence[str], states: Mapping[str, str]) -> LeaseRound:
        """One round: heartbeat, renew ours, rebalance, take free ones; ``states``: the sync
        state of engines we write, published for the other replicas."""
        out = LeaseRound()
        sent = self._clock()
        before = set(self.owned())
        try:
            reply = self.index._run("MEMBERS", [self.owner, self._ttl_ms, "1"])
            self.members = max(1, int(reply[1]))
            share = -(-len(engines) // self.members)
            mine = [e for e in engines if e in before]
            release = set(sorted(mine)[share:]) if len(mine) > share else set()
            budget = max(0, share - len(mine) + len(release))
            by_group: dict[int, list[str]] = {}
            for engine in engines:
                group = self.index.group_of(engine, allocate=True)
                by_group.setdefault(group or 0, []).append(engine)
            calls: list[tuple[int, list[Any]]] = []
            order: list[str] = []
            for group, names in sorted(by_group.items()):
                args: list[Any] = [self.owner, self._ttl_ms, budget]
                for engine in names:
                    if engine in release:
                        action = "R"
                    elif engine in before:
                        action = "K"
                    else:
                        action = "T"
                    args += (engine, action, states.get(engine, ""))
                    order.append(engine)
                calls.append((group, args))
            replies = self.index._run_groups("ENGINE_LEASES", calls) if calls else []
        except _ROUND_ERRORS as exc:
            self.errors += 1
            log.warning("engine leases round failed: %s", exc)
            out.members = self.members
            return out
        flat = [item for reply in replies for item in reply[1:]]
        taken = 0
        now_owned: set[str] = set()
        for i, engine in enumerate(order):
            ours, held, state, pos = flat[4 * i : 4 * i + 4]
            view = LeaseView(
                ours=bool(int(ours)),
                held=bool(int(held)),
                state=_text(state),
                position=StreamPosition.parse(_text(pos)),
            )
            if view.ours:
                if engine not in before:
                    taken += 1  # budget is per group call: never more than share in all
                    if taken > budget:
                        self._release_quietly(engine)
                        view = LeaseView(False, False, "", view.position)
                        out.views[engine] = view
                        continue
                now_owned.add(engine)
            out.views[engine] = view
        with self._lock:
            for engine in now_owned:
                self._valid_until[engine] = sent + self._valid_for
            for engine in list(self._valid_until):
                if engine not in now_owned:
                    del self._valid_until[engine]
        out.gained = sorted(now_owned - before)
        out.lost = sorted(before - now_owned)
        self.takeovers += len(out.gained)
        out.members = self.members
        for engine in out.gained:
            log.info("event=engine_lease_taken engine=%s owner=%s", engine, self.owner)
        for engine in out.lost:
            log.info("event=engine_lease_lost engine=%s owner=%s", engine, self.owner)
        if self.listener is not None:
            self.listener(out, sorted(now_owned))
        return out

    def _release_quietly(self, engine: str) -> None:
        group = self.index.group_of(engine) or 0
        with contextlib.suppress(*_ROUND_ERRORS):
            self.index._run("ENGINE_LEASES", [self.owner, self._ttl_ms, 0, engine, "R", ""], group)

    def release_all(self) -> None:
        """Step down (shutdown): leave the members and drop every lease, so the other
        replicas take over at once."""
        engines = self.owned()
        with self._lock:
            self._valid_until.clear()
        with contextlib.suppress(*_ROUND_ERRORS):
            self.index._run("MEMBERS", [self.owner, self._ttl_ms, "0"])
        for engine in engines:
            self._release_quietly(engine)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
