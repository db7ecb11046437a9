"""The ingest state machine under index faults (docs/redis.md rules 1 and 2), driven message
by message (`IngestService.handle` / `check_recovery`, what the ingest thread calls) over a
real RedisIndex on a private redis-server that is stopped and restarted between steps. The
replay answers are fed as the subscriber would deliver them, so every step is deterministic;
the full path over real sockets and processes is tests/kvindex/test_serve_redis.py."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ingest_helpers import metric, wait_for
from redis_servers import RedisServerProcess, unique_prefix

from kvindex.discovery import EngineEntry
from kvindex.index.locked import LockedIndex
from kvindex.index.redis import RedisIndex
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.keys import chain_keys, root_key
from kvindex.service.redis_backend import RedisBackend
from kvindex.subscriber import LiveMessage, ReplayMessage
from kvindex.wire import Frame
from kvtools.sim.events import encode_batch
from kvtools.sim.publisher import EventPublisher
from tests.events import sim_stored

ENGINE = "127.0.0.1:8001"
TOPIC = f"kv@{ENGINE}@m".encode()
SOURCE = "tcp://127.0.0.1:5557"


def payload(seq: int) -> bytes:
    """Batch ``seq`` stores one block of its own (tokens seq*16 ..), hash 100 + seq."""
    tokens = list(range(seq * 16, seq * 16 + 16))
    return encode_batch(time.time(), sim_stored(tokens, 100 + seq), None)


def key(seq: int) -> int:
    return chain_keys(root_key("m"), list(range(seq * 16, seq * 16 + 16)), 16)[0]


def live(seq: int) -> LiveMessage:
    return LiveMessage(SOURCE, Frame(TOPIC, seq, payload(seq)), time.time())


def replayed(seq: int | None) -> ReplayMessage:
    return ReplayMessage(ENGINE, None if seq is None else Frame(TOPIC, seq, payload(seq)))


@pytest.fixture
def redis_server() -> Iterator[RedisServerProcess]:
    server = RedisServerProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def ingest(redis_server: RedisServerProcess) -> Iterator[IngestService]:
    index = RedisIndex.from_url(redis_server.url, prefix=unique_prefix(), backoff_max_s=0.05)
    backend = RedisBackend(index)
    service = IngestService(
        IngestServiceConfig(
            accept_any_engine=True,
            replay_endpoints={ENGINE: "tcp://127.0.0.1:1"},  # requests queue; we answer
            health_check_interval_s=0.0,
            replay_timeout_s=60.0,
        ),
        LockedIndex(backend),
    )
    backend.on_reset(lambda _old, _new: service.request_full_replay())
    yield service
    service.stop()
    index.close()


def held(service: IngestService, seq: int) -> bool:
    return ENGINE in service.index.lookup([key(seq)])


def recover_when_healthy(service: IngestService) -> None:
    """Drive check_recovery until it starts the replay (the index backs off for a moment
    after its last failure)."""
    deadline = time.monotonic() + 10
    requested = metric(
        service.metrics, "kvindex_ingest_replays_total", reason="index_reset", outcome="requested"
    )
    while time.monotonic() < deadline:
        service.check_recovery(time.monotonic())
        now = metric(
            service.metrics,
            "kvindex_ingest_replays_total",
            reason="index_reset",
            outcome="requested",
        )
        if now > requested:
            return
        time.sleep(0.01)
    raise AssertionError("no replay started after the index came back")


def test_an_outage_then_a_failure_during_the_recovery_replay(
    ingest: IngestService, redis_server: RedisServerProcess
) -> None:
    for seq in range(3):
        ingest.handle(live(seq))
    assert all(held(ingest, s) for s in range(3))

    redis_server.stop()
    ingest.handle(live(3))  # refused: the engine recovers
    ingest.handle(live(4))  # deferred, not queued
    assert metric(ingest.metrics, "kvindex_ingest_index_unavailable_total") == 1
    assert metric(ingest.metrics, "kvindex_ingest_deferred_batches_total") == 1
    assert ingest.engine_activity()[0].recovering == "index_recovery"
    ingest.check_recovery(time.monotonic())  # still down: nothing requested
    assert (
        metric(
            ingest.metrics,
            "kvindex_ingest_replays_total",
            reason="index_recovery",
            outcome="requested",
        )
        == 0
    )

    redis_server.start()  # empty: the epoch changes, so the recovery becomes a full replay
    recover_when_healthy(ingest)
    ingest.handle(replayed(0))
    ingest.handle(replayed(1))
    ingest.handle(live(5))  # buffered while the replay runs

    redis_server.stop()  # dies again in the middle of the replay
    ingest.handle(replayed(2))  # refused: the replay is cancelled
    assert (
        metric(
            ingest.metrics, "kvindex_ingest_replays_total", reason="index_reset", outcome="failed"
        )
        == 1
    )
    ingest.handle(replayed(3))  # a late answer of the cancelled replay: ignored
    ingest.handle(live(6))  # deferred

    redis_server.start()
    recover_when_healthy(ingest)
    for seq in range(7):
        ingest.handle(replayed(seq))
    ingest.handle(replayed(None))
    ingest.handle(live(7))  # a later event lands
    assert all(held(ingest, s) for s in range(8))
    assert ingest.engine_activity()[0].recovering is None
    assert (
        metric(
            ingest.metrics,
            "kvindex_ingest_replays_total",
            reason="index_reset",
            outcome="succeeded",
        )
        == 1
    )
    assert metric(ingest.metrics, "kvindex_ingest_internal_errors_total") == 0


def test_a_hung_redis_that_resumes_with_its_data_gets_a_recovery_replay(
    redis_server: RedisServerProcess,
) -> None:
    """Rule 1 alone: Redis froze (SIGSTOP: calls time out) and resumed with its data (same
    epoch, no reset): only the engine whose batch was refused is replayed."""
    index = RedisIndex.from_url(
        redis_server.url, prefix=unique_prefix(), socket_timeout=0.2, backoff_max_s=0.05
    )
    service = IngestService(
        IngestServiceConfig(
            accept_any_engine=True,
            replay_endpoints={ENGINE: "tcp://127.0.0.1:1"},
            health_check_interval_s=0.0,
        ),
        LockedIndex(RedisBackend(index)),
    )
    try:
        service.handle(live(0))
        redis_server.signal(signal.SIGSTOP)
        try:
            service.handle(live(1))  # times out: refused
            service.check_recovery(time.monotonic())
        finally:
            redis_server.signal(signal.SIGCONT)
        assert metric(service.metrics, "kvindex_ingest_index_unavailable_total") == 1
        labels = {"reason": "index_recovery", "outcome": "requested"}
        deadline = time.monotonic() + 10
        while metric(service.metrics, "kvindex_ingest_replays_total", **labels) == 0:
            assert time.monotonic() < deadline, "no recovery replay"
            service.check_recovery(time.monotonic())
            time.sleep(0.01)
        for seq in (0, 1):
            service.handle(replayed(seq))
        service.handle(replayed(None))
        assert held(service, 0) and held(service, 1)
        assert index.health().resets == 0
        done = {"reason": "index_recovery", "outcome": "succeeded"}
        assert metric(service.metrics, "kvindex_ingest_replays_total", **done) == 1
    finally:
        service.stop()
        index.close()


def test_an_engine_that_leaves_while_redis_is_down_is_purged_once_it_is_back(
    tmp_path: Path,
) -> None:
    """The purge of an engine that left discovery is retried when Redis returns (here a
    Redis with AOF persistence, so its data, and the engine's blocks, come back)."""
    server = RedisServerProcess()
    server.extra_args = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path)]
    server.start()
    index = RedisIndex.from_url(server.url, prefix=unique_prefix(), backoff_max_s=0.05)
    publisher = EventPublisher("tcp://127.0.0.1:*", topic=TOPIC.decode())
    service = IngestService(
        IngestServiceConfig(accept_any_engine=True, health_check_interval_s=0.0),
        LockedIndex(RedisBackend(index)),
    )
    service.expect_discovery()
    service.start()
    try:
        service.update_engines({ENGINE: EngineEntry(ENGINE, zmq=publisher.bound_endpoint)})
        events = sim_stored(list(range(16)), 100)

        def indexed() -> bool:
            publisher.publish(events)
            return index.engines() == [ENGINE]

        wait_for(indexed, what="the engine's block in Redis")
        server.stop()
        service.update_engines({})
        wait_for(
            lambda: (
                metric(service.metrics, "kvindex_discovery_purges_total") == 1
                and metric(service.metrics, "kvindex_ingest_index_unavailable_total") >= 1
            ),
            what="the purge refused while Redis is down",
        )
        server.start()  # AOF: the engine's block is back
        wait_for(lambda: index.engines() == [], what="the purge retried")
        assert index.health().resets == 0
        assert metric(service.metrics, "kvindex_ingest_internal_errors_total") == 0
    finally:
        service.stop()
        publisher.close()
        index.close()
        server.stop()
