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

import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import redis

from kvindex.index import redis_scripts
from kvindex.index.redis import REDIS_ERRORS, ClientSource, RedisIndex

__all__ = ["LeaseStore", "RedisLeaseStore", "WriterLease", "redis_writer_lease"]

log = logging.getLogger(__name__)


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
