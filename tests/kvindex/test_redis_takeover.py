"""A takeover checks the engine still holds the batch the previous writer recorded (issue 20,
docs/redis.md "Writer model"): two `kvindex serve` replicas share the index on the local
Redis (a private prefix) with one writer per engine stream; the writer is killed; the engine
restarts meanwhile and its new stream passes the old position with other batches. The new
writer finds another batch under the recorded seq (its digest differs), clears the engine
and replays it from 0: the index holds what the restarted engine holds, not the old claims.
Real processes on loopback; deadline polling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve_process import ServeProcess, wait_for

from kvtools.sim.publisher import EventPublisher
from tests.events import sim_stored

MODEL = "m"
ENGINE = "127.0.0.1:8301"


def tokens(seed: int) -> list[int]:
    return [seed * 1000 + t for t in range(4 * 16)]


def body(seed: int) -> dict[str, Any]:
    return {"model": MODEL, "token_ids": [*tokens(seed), 7]}


def blocks(server: ServeProcess, seed: int) -> int:
    return server.score(body(seed)).get(ENGINE, 0)


def test_takeover_finds_the_engine_restarted_behind_the_recorded_position(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    # A restart re-binds the ports first bound, as a restarted vLLM binds its configured ones.
    pub = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic=f"kv@{ENGINE}@{MODEL}")
    pub_at, replay_at = pub.bound_endpoint, pub.bound_replay_endpoint
    config = tmp_path / "kvindex.yaml"
    config.write_text(
        f"backend: redis\nredis_url: {redis_url}\nredis_prefix: {redis_prefix}\n"
        "redis_writers: leased\nredis_lease_ttl_s: 1.0\nblock_size: 16\n"
    )
    args = ["--config", str(config), "--zmq-connect", pub_at, "--replay-endpoint",
            f"{ENGINE}={replay_at}"]  # fmt: skip
    servers = [ServeProcess(args, grpc=False) for _ in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        # The old process: prompts 1..4 stored; batches are published until both replicas
        # heard one (a subscriber connecting misses the first ones: ZMQ's slow joiner; the
        # first batch heard starts a replay from 0, which brings the rest).
        for seed in range(1, 5):
            pub.publish(sim_stored(tokens(seed), 100 * seed))

        def heard() -> bool:
            pub.publish(sim_stored(tokens(4), 400))  # re-announced: idempotent
            assert pub.flush()
            return all(blocks(s, seed) == 4 for s in servers for seed in range(1, 5))

        wait_for(heard, timeout=20, what="both replicas see the old stream")
        writer = next(s for s in servers if s.metric("kvindex_redis_writer", engine=ENGINE))
        survivor = next(s for s in servers if s is not writer)
        writer.kill()  # no lease release: the survivor takes over after the lease's TTL
        # The engine restarts (empty cache, seq from 0, empty replay buffer) and publishes
        # more batches of other prompts than the old stream had: its stream passes the
        # recorded position with batches the old writer never saw.
        old_seq = pub.next_seq
        pub.restart()
        for k in range(old_seq + 3):
            seed = 11 + k % 6
            pub.publish(sim_stored(tokens(seed), 100 * seed))
        assert pub.flush()
        wait_for(
            lambda: survivor.metric("kvindex_redis_lease_takeovers_total") >= 1,
            timeout=20,
            what="the survivor takes the engine's stream over",
        )
        wait_for(
            lambda: (
                all(blocks(survivor, seed) == 4 for seed in range(11, 17))
                and all(blocks(survivor, seed) == 0 for seed in range(1, 5))
            ),
            timeout=20,
            what="the index holds the restarted engine's blocks and none of the old ones",
        )
        assert survivor.metric("kvindex_ingest_replays_total", reason="restart",
                               outcome="requested") >= 1  # fmt: skip
    finally:
        for server in servers:
            server.kill()
        pub.close()
