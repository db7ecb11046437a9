"""`kvindex serve --backend redis` end to end: real subprocesses on a real Redis, engines
simulated by `kvtools.sim` publishers (ZMQ PUB + ROUTER replay buffers).

* replicas: two services on one Redis (unique prefix, cleaned up) both ingest the stream
  (every replica writes, docs/redis.md) and score identically; a third started later
  scores correctly at once, from Redis alone;
* faults: a private `redis-server --save "" --appendonly no` is killed mid-stream and
  restarted empty: the service stays up, /readyz and /metrics report degraded, scores are
  empty meanwhile; after Redis returns the index is rebuilt by replay from the engine's
  replay buffer (the epoch changed) and later events land.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_servers import RedisServerProcess, delete_prefix, shared_redis_url, unique_prefix
from serve_process import ServeProcess, wait_for

from kvtools.sim.events import BlockRemoved
from kvtools.sim.publisher import EventPublisher
from tests.events import sim_stored

MODEL = "m"
ENGINE = "127.0.0.1:8001"
BS = 16


def prompt(seed: int, blocks: int = 4) -> list[int]:
    return [seed * 1000 + i for i in range(blocks * BS)]


def settle(server: ServeProcess, publisher: EventPublisher) -> None:
    """Wait until the service applied every batch published so far (none still in flight)."""
    assert publisher.flush()
    last = publisher.next_seq - 1
    wait_for(
        lambda: server.metric("kvindex_ingest_last_seq", engine=ENGINE) == last,
        what=f"batch {last} applied",
    )


def index_first_prompt(server: ServeProcess, publisher: EventPublisher) -> list[int]:
    """Publish prompt(1)'s blocks until the server scores all 4 on ENGINE; returns the prompt."""
    tokens = prompt(1)

    def landed() -> bool:
        publisher.publish(sim_stored(tokens, 100))
        return server.score(body(tokens)).get(ENGINE) == 4

    wait_for(landed, what="blocks indexed in Redis")
    return tokens


def grpc_status(server: ServeProcess) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kvindex.v1.KVIndex"), timeout=5
        )
    return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def body(tokens: list[int]) -> dict[str, Any]:
    """A score request for a prompt that starts with ``tokens`` and goes on (a next turn), so
    every stored block of ``tokens`` is reusable (vLLM recomputes a prompt's last block)."""
    return {"model": MODEL, "token_ids": [*tokens, 7]}


@pytest.fixture
def publisher() -> Iterator[EventPublisher]:
    pub = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic=f"kv@{ENGINE}@{MODEL}")
    yield pub
    pub.close()


def serve_args(pub: EventPublisher, config: Path) -> list[str]:
    return [
        "--config",
        str(config),
        "--zmq-connect",
        pub.bound_endpoint,
        "--replay-endpoint",
        f"{ENGINE}={pub.bound_replay_endpoint}",
    ]


def write_config(path: Path, url: str, prefix: str) -> Path:
    path.write_text(
        f"backend: redis\nredis_url: {url}\nredis_prefix: {prefix}\nredis-ttl-s: 600\n"
        "redis_backoff_max_s: 0.5\nblock_size: 16\n"
    )
    return path


def test_replicas_share_one_redis(tmp_path: Path, publisher: EventPublisher) -> None:
    url, prefix = shared_redis_url(), unique_prefix()
    config = write_config(tmp_path / "kvindex.yaml", url, prefix)
    servers = [ServeProcess(serve_args(publisher, config), grpc=False) for _ in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        tokens = prompt(1)

        def both_hold_it() -> bool:
            publisher.publish(sim_stored(tokens, 100))
            return all(s.score(body(tokens)).get(ENGINE) == 4 for s in servers)

        wait_for(both_hold_it, what="both replicas index the stream")
        publisher.publish([BlockRemoved(block_hashes=[102], medium="GPU")])
        wait_for(
            lambda: all(s.score(body(tokens)).get(ENGINE) == 2 for s in servers),
            what="the remove seen by both replicas",
        )
        answers = [s.post("/v1/score", body(tokens)) for s in servers]
        assert answers[0] == answers[1] and answers[0][0] == 200

        late = ServeProcess(serve_args(publisher, config), grpc=False)
        servers.append(late)
        late.wait_ready()
        assert late.post("/v1/score", body(tokens)) == answers[0]  # at once: from Redis
    finally:
        codes = [s.stop() for s in servers]
        delete_prefix(redis.Redis.from_url(url), prefix)
    assert codes == [0] * len(servers)


@pytest.fixture
def private_redis() -> Iterator[RedisServerProcess]:
    server = RedisServerProcess()
    server.start()
    yield server
    server.stop()


def test_redis_restart_mid_stream_is_recovered_by_replay(
    tmp_path: Path, publisher: EventPublisher, private_redis: RedisServerProcess
) -> None:
    config = write_config(tmp_path / "kvindex.yaml", private_redis.url, unique_prefix())
    server = ServeProcess(serve_args(publisher, config))
    try:
        server.wait_ready()
        before = index_first_prompt(server, publisher)

        private_redis.stop()
        wait_for(lambda: server.get("/readyz")[0] == 503, what="/readyz degraded")
        _, ready = server.get("/readyz")
        assert "redis degraded" in ready["failing"]["index"]
        assert server.metric("kvindex_index_degraded") == 1.0
        assert server.score(body(before)) == {}  # scores fall back to empty
        wait_for(lambda: grpc_status(server) == NOT_SERVING, what="gRPC health NOT_SERVING")

        during = prompt(2)
        publisher.publish(sim_stored(during, 200))  # refused by the index: replayed later
        wait_for(
            lambda: server.metric("kvindex_ingest_index_unavailable_total") >= 1,
            what="the batch refused while Redis is down",
        )
        assert server.proc.poll() is None

        private_redis.start()  # same port, empty: the epoch changes
        wait_for(lambda: server.get("/readyz")[0] == 200, what="/readyz ready again")
        wait_for(lambda: grpc_status(server) == SERVING, what="gRPC health SERVING again")
        wait_for(
            lambda: (
                server.score(body(before)).get(ENGINE) == 4
                and server.score(body(during)).get(ENGINE) == 4
            ),
            what="the index rebuilt by replay",
        )
        assert server.metric("kvindex_index_resets_total") >= 1
        assert server.metric("kvindex_index_degraded") == 0.0
        replayed = {"reason": "index_reset", "outcome": "succeeded"}
        wait_for(
            lambda: server.metric("kvindex_ingest_replays_total", **replayed) >= 1,
            what="the full replay counted",
        )

        after = prompt(3)
        publisher.publish(sim_stored(after, 300))  # once: a live event after recovery lands
        wait_for(lambda: server.score(body(after)).get(ENGINE) == 4, what="a later event")
    finally:
        code = server.stop()
    assert code == 0, server.logs()


def test_without_a_replay_endpoint_the_outage_is_counted_as_lost(
    tmp_path: Path, publisher: EventPublisher, private_redis: RedisServerProcess
) -> None:
    config = write_config(tmp_path / "kvindex.yaml", private_redis.url, unique_prefix())
    server = ServeProcess(["--config", str(config), "--zmq-connect", publisher.bound_endpoint])
    try:
        server.wait_ready()
        before = index_first_prompt(server, publisher)
        settle(server, publisher)
        private_redis.stop()
        wait_for(lambda: server.get("/readyz")[0] == 503, what="/readyz degraded")
        publisher.publish(sim_stored(prompt(2), 200))
        publisher.publish(sim_stored(prompt(3), 300))
        wait_for(
            lambda: (
                server.metric("kvindex_ingest_index_unavailable_total") == 1
                and server.metric("kvindex_ingest_deferred_batches_total") == 1
            ),
            what="one batch refused, the next deferred (no queue)",
        )
        private_redis.start()
        wait_for(lambda: server.get("/readyz")[0] == 200, what="/readyz ready again")
        wait_for(
            lambda: server.metric("kvindex_ingest_lost_batches_total") == 2,
            what="the refused and the deferred batch counted as lost",
        )
        after = prompt(4)
        publisher.publish(sim_stored(after, 400))
        wait_for(lambda: server.score(body(after)).get(ENGINE) == 4, what="a later event")
        assert ENGINE not in server.score(body(before))  # lost with Redis's data
        assert "no replay endpoint" in server.logs()
    finally:
        code = server.stop()
    assert code == 0, server.logs()


def test_redis_losing_its_data_without_an_outage_triggers_a_full_replay(
    tmp_path: Path, publisher: EventPublisher, private_redis: RedisServerProcess
) -> None:
    """FLUSHALL (or eviction of the epoch, or a failover to an empty replica): no error at
    all, only the epoch changes; the next call notices and every engine is replayed."""
    config = write_config(tmp_path / "kvindex.yaml", private_redis.url, unique_prefix())
    server = ServeProcess(serve_args(publisher, config), grpc=False)
    try:
        server.wait_ready()
        tokens = prompt(5)

        def landed() -> bool:
            publisher.publish(sim_stored(tokens, 500))
            return server.score(body(tokens)).get(ENGINE) == 4

        wait_for(landed, what="blocks indexed in Redis")
        redis.Redis.from_url(private_redis.url).flushall()
        # Scoring itself notices the new epoch; the replay brings the blocks back.
        wait_for(
            lambda: (
                server.score(body(tokens)).get(ENGINE) == 4
                and server.metric("kvindex_index_resets_total") == 1
            ),
            what="rebuilt by replay",
        )
        replayed = {"reason": "index_reset", "outcome": "succeeded"}
        wait_for(
            lambda: server.metric("kvindex_ingest_replays_total", **replayed) == 1,
            what="one full replay",
        )
        assert server.metric("kvindex_ingest_index_unavailable_total") == 0
    finally:
        code = server.stop()
    assert code == 0, server.logs()
