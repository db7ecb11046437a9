"""Redis going away mid-stream: a private, non-persistent redis-server is killed and
restarted on the same port. Nothing may raise except apply's IndexUnavailable; reads are
empty while degraded; health says why; after the restart the epoch change is reported
(the data is gone) and later writes land."""

from __future__ import annotations

import signal
import threading
import time

from redis_servers import RedisServerProcess

from kvindex.index import IndexStats, MemoryIndex, PrefixMatch, Store, StoredBlock
from kvindex.index import Tier as T
from kvindex.index.redis import IndexUnavailable, RedisIndex


def batch(engine_hash: int) -> list[Store]:
    return [Store(T.GPU, [StoredBlock(engine_hash, (1000 + engine_hash,))])]


def connect(server: RedisServerProcess) -> RedisIndex:
    return RedisIndex.from_url(
        server.url, prefix="fault", socket_timeout=0.5, connect_timeout=0.5, backoff_max_s=0.1
    )


def wait_healthy(index: RedisIndex, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not index.health().ok:
        assert time.monotonic() < deadline, index.health()
        time.sleep(0.01)


def test_restart_without_persistence(private_redis: RedisServerProcess) -> None:
    writer, reader = connect(private_redis), connect(private_redis)
    resets: list[tuple[str | None, str]] = []
    writer.on_reset(lambda old, new: resets.append((old, new)))
    for h in range(10):
        writer.apply("e:1", batch(h))
    keys = [1000 + h for h in range(10)]
    assert reader.lookup(keys) == {"e:1": PrefixMatch(10, [10, 0, 0])}
    before = writer.generation()
    assert before is not None and reader.generation() == before

    private_redis.stop()
    failed = 0
    for h in range(10, 30):  # the stream goes on while Redis is down
        try:
            writer.apply("e:1", batch(h))
        except IndexUnavailable:
            failed += 1
    assert failed == 20
    assert reader.lookup(keys) == {}
    assert reader.resolve("e:1", 3) is None and reader.engines() == []
    assert reader.stats() == IndexStats(0, 0, 0, 0, 0)
    health = writer.health()
    assert not health.ok and health.reason and health.failed_applies == 20
    assert health.degraded_for_s is not None

    private_redis.start()  # same port, empty: it kept nothing
    wait_healthy(writer)
    wait_healthy(reader)
    assert resets == [(before, writer.generation())]
    assert reader.generation() == writer.generation() != before
    assert reader.health().resets == 1
    assert reader.lookup(keys) == {}  # the subscriber must now replay every engine
    for h in range(10):  # the replay
        writer.apply("e:1", batch(h))
    assert reader.lookup(keys) == {"e:1": PrefixMatch(10, [10, 0, 0])}
    assert writer.health().ok and writer.health().reason is None


def test_down_at_start_then_up(private_redis: RedisServerProcess) -> None:
    private_redis.stop()
    index = connect(private_redis)  # constructing never touches Redis
    assert index.lookup([1]) == {} and not index.health().ok and index.generation() is None
    private_redis.start()
    wait_healthy(index)
    index.apply("e:1", batch(1))
    assert index.lookup([1001]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
    assert index.health().resets == 0  # first contact is not a reset


def test_lookups_from_threads_while_ingesting(private_redis: RedisServerProcess) -> None:
    index, reference = connect(private_redis), MemoryIndex()
    keys = [1000 + h for h in range(50)]
    errors: list[BaseException] = []
    done = threading.Event()

    def look() -> None:
        try:
            while not done.is_set():
                match = index.lookup(keys).get("e:1")
                # atomic batches: a reader sees a prefix of whole batches, never a torn one
                assert match is None or match.blocks % 5 == 0
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=look) for _ in range(4)]
    for thread in threads:
        thread.start()
    for start in range(0, 50, 5):
        ops = [Store(T.GPU, [StoredBlock(h, (1000 + h,)) for h in range(start, start + 5)])]
        index.apply("e:1", ops)
        reference.apply("e:1", ops)
    done.set()
    for thread in threads:
        thread.join()
    assert not errors
    assert index.lookup(keys) == reference.lookup(keys)


def test_hung_server_times_out_then_resumes(private_redis: RedisServerProcess) -> None:
    """SIGSTOP: calls time out (bounded by socket_timeout) instead of hanging the caller;
    after SIGCONT the same data is back (no reset) and a replay is harmless."""
    index = RedisIndex.from_url(
        private_redis.url, prefix="hang", socket_timeout=0.2, connect_timeout=0.2,
        backoff_max_s=0.05,
    )  # fmt: skip
    index.apply("e:1", batch(1))
    private_redis.signal(signal.SIGSTOP)
    try:
        assert index.lookup([1001]) == {}
        try:
            index.apply("e:1", batch(2))  # may still be applied once the server resumes
        except IndexUnavailable as exc:
            assert "Timeout" in exc.reason or "degraded" in exc.reason
        else:
            raise AssertionError("apply to a hung server must raise IndexUnavailable")
        assert not index.health().ok
    finally:
        private_redis.signal(signal.SIGCONT)
    wait_healthy(index)
    assert index.health().resets == 0
    index.apply("e:1", batch(2))  # the replay rule 1 asks for: idempotent
    assert index.lookup([1001, 1002]) == {"e:1": PrefixMatch(2, [2, 0, 0])}
