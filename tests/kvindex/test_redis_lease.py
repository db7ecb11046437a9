"""The writer lease: handover between replicas on a real Redis, and the local-deadline
logic with a stub store and a manual clock (the part no real Redis can make deterministic:
the store raising or answering late)."""

from __future__ import annotations

import time

import pytest
import redis

from kvindex.index import Store, StoredBlock
from kvindex.index import Tier as T
from kvindex.index.redis import NotWriter, RedisIndex
from kvindex.index.redis_lease import WriterLease, redis_writer_lease


def test_handover_when_the_writer_stops_renewing(redis_url: str, redis_prefix: str) -> None:
    a = RedisIndex.from_url(redis_url, prefix=redis_prefix)
    b = RedisIndex.from_url(redis_url, prefix=redis_prefix)
    lease_a = redis_writer_lease(a, owner="a", ttl_s=0.3)
    lease_b = redis_writer_lease(b, owner="b", ttl_s=0.3)
    a.set_fencing_owner("a")
    b.set_fencing_owner("b")
    assert lease_a.tick() and lease_a.is_writer
    assert not lease_b.tick() and not lease_b.is_writer
    a.apply("e:1", [Store(T.GPU, [StoredBlock(1, (11,))])])
    # a stalls (no renewals); b polls as its loop would until the lease lapses.
    deadline = time.monotonic() + 5
    while not lease_b.tick():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert lease_b.takeovers == 1 and lease_b.store.holder() == "b"
    assert not lease_a.is_writer and not lease_a.renew()  # a finds out on its next renew
    with pytest.raises(NotWriter):  # and even had it not, the script fences it out
        a.apply("e:1", [Store(T.GPU, [StoredBlock(2, (12,))])])
    b.apply("e:1", [Store(T.GPU, [StoredBlock(2, (12,))])])
    assert a.lookup([11, 12])["e:1"].blocks == 2  # readers score the same either way
    lease_b.release()
    assert lease_a.tick() and lease_a.takeovers == 2  # released: taken at once
    a.close()
    b.close()


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class StubStore:
    """Answers like Redis would, or raises as a dead Redis does."""

    def __init__(self) -> None:
        self.owner: str | None = None
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise redis.ConnectionError("down")

    def acquire(self, owner: str, ttl_ms: int) -> bool:
        self._check()
        if self.owner in (None, owner):
            self.owner = owner
            return True
        return False

    def renew(self, owner: str, ttl_ms: int) -> bool:
        self._check()
        return self.owner == owner

    def release(self, owner: str) -> bool:
        self._check()
        if self.owner == owner:
            self.owner = None
            return True
        return False

    def holder(self) -> str | None:
        return self.owner


def test_writer_steps_down_before_the_server_could_expire_it() -> None:
    clock, store = ManualClock(), StubStore()
    lease = WriterLease(store, owner="me", ttl_s=10, safety=0.2, clock=clock)
    assert lease.try_acquire()
    store.down = True
    clock.now += 5
    assert lease.tick()  # renew failed, but the lease we hold is still good
    clock.now += 2.9
    assert lease.is_writer
    clock.now += 0.1  # 8 s = ttl * (1 - safety) after the acquire was sent
    assert not lease.is_writer and not lease.tick()
    assert lease.errors == 2
    store.down = False
    assert lease.tick() and lease.takeovers == 2  # still ours in the store: taken back


def test_renew_refused_means_lost() -> None:
    clock, store = ManualClock(), StubStore()
    lease = WriterLease(store, owner="me", ttl_s=10, clock=clock)
    assert lease.try_acquire()
    store.owner = "other"  # expired on the server and taken meanwhile
    assert not lease.renew() and not lease.is_writer
    assert not lease.renew()  # not holding: no call needed


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="ttl"):
        WriterLease(StubStore(), ttl_s=0)
    assert WriterLease(StubStore(), ttl_s=9).renew_interval_s == 3
