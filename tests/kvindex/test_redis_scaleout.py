"""The shared index scaled out (issue 20, docs/redis.md "Sharding" and "Writer model"), on
real processes over loopback: a private 3-shard Redis Cluster, three `kvindex serve`
replicas (`--redis-groups 3 --redis-writers leased`), six simulated engines (kvtools.sim
publishers with replay buffers). Checked: keys land on every shard within 10% of even; each
engine stream has exactly one writer (the lease keys in Redis, and each replica's
`kvindex_redis_writer` series); killing a writer hands its streams over (takeover resyncs by
replay from the recorded position) and the index equals the truth afterwards; every replica
scores identically. Deadline polling throughout; about 20 s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from redis_servers import RedisClusterProcess, unique_prefix
from serve_process import ServeProcess, wait_for

from kvindex.index.redis_schema import RedisKeySchema
from kvtools.sim.events import BlockRemoved
from kvtools.sim.publisher import EventPublisher
from tests.events import sim_stored

MODEL = "m"
BS = 16
ENGINES = [f"127.0.0.1:{8101 + i}" for i in range(6)]
PROMPTS = 12  # per engine, 4 blocks each


def tokens_of(engine: int, j: int) -> list[int]:
    return [1_000_000 * (engine + 1) + 1000 * j + t for t in range(4 * BS)]


def body(tokens: list[int]) -> dict[str, Any]:
    return {"model": MODEL, "token_ids": [*tokens, 7]}


def first_hash(engine: int, j: int) -> int:
    return 10_000 * (engine + 1) + 10 * j


def scores(server: ServeProcess, tokens: list[int]) -> dict[str, int]:
    return {e: n for e, n in server.score(body(tokens)).items() if n}


def lease_holders(nodes: list[redis.Redis], schema: RedisKeySchema) -> dict[str, list[str]]:
    """engine -> owners of its lease key (across every shard: at most one may exist)."""
    out: dict[str, list[str]] = {}
    for node in nodes:
        for keys in schema.group_keys:
            for key in node.scan_iter(match=keys.base + "lease:*", count=1000):
                owner = node.get(key)
                if owner is not None:
                    out.setdefault(key.decode().split("lease:", 1)[1], []).append(owner.decode())
    return out


def test_three_shards_three_replicas_one_writer_per_stream(tmp_path: Path) -> None:
    cluster = RedisClusterProcess()
    publishers: list[EventPublisher] = []
    servers: list[ServeProcess] = []
    nodes: list[redis.Redis] = []
    try:
        cluster.start()
        nodes = [redis.Redis(port=p) for p in cluster.ports]
        prefix = unique_prefix()
        schema = RedisKeySchema(prefix, 3)
        config = tmp_path / "kvindex.yaml"
        config.write_text(
            f"backend: redis\nredis_url: {cluster.url}\nredis_prefix: {prefix}\n"
            "redis_groups: 3\nredis_writers: leased\nredis_lease_ttl_s: 1.5\n"
            "redis_backoff_max_s: 0.5\nredis_write_queue: 1024\nblock_size: 16\n"
        )
        args = ["--config", str(config)]
        for engine in ENGINES:
            pub = EventPublisher(
                "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", topic=f"kv@{engine}@{MODEL}"
            )
            publishers.append(pub)
            args += ["--zmq-connect", pub.bound_endpoint]
            args += ["--replay-endpoint", f"{engine}={pub.bound_replay_endpoint}"]
        servers = [ServeProcess(args, grpc=False) for _ in range(3)]
        for server in servers:
            server.wait_ready()

        # Truth: engine i holds its own prompts; the odd ones lost their last block.
        truth: dict[tuple[int, int], int] = {}

        def publish_round(round_: int) -> None:
            for i, pub in enumerate(publishers):
                for j in range(round_ * PROMPTS // 2, (round_ + 1) * PROMPTS // 2):
                    pub.publish(sim_stored(tokens_of(i, j), first_hash(i, j)))
                    truth[(i, j)] = 4
                    if j % 2:
                        pub.publish(
                            [BlockRemoved(block_hashes=[first_hash(i, j) + 3], medium="GPU")]
                        )
                        truth[(i, j)] = 3
                assert pub.flush()

        def all_agree_with_truth(replicas: list[ServeProcess]) -> bool:
            for (i, j), blocks in truth.items():
                expected = {ENGINES[i]: blocks}
                if any(scores(s, tokens_of(i, j)) != expected for s in replicas):
                    return False
            return True

        def one_writer_each(replicas: list[ServeProcess]) -> bool:
            holders = lease_holders(nodes, schema)
            assert all(len(owners) == 1 for owners in holders.values()), holders
            per_replica = [
                sum(s.metric("kvindex_redis_writer", engine=e) for e in ENGINES) for s in replicas
            ]
            written = [
                sum(s.metric("kvindex_redis_writer", engine=e) for s in replicas) for e in ENGINES
            ]
            fair = -(-len(ENGINES) // len(replicas))
            return (
                sorted(holders) == sorted(ENGINES)
                and written == [1.0] * len(ENGINES)
                and max(per_replica) <= fair
            )

        publish_round(0)  # streams become known to ingest with their first batches
        wait_for(lambda: one_writer_each(servers), timeout=20, what="one writer per stream")
        wait_for(
            lambda: all_agree_with_truth(servers), timeout=20, what="every replica scores the truth"
        )

        # Keys on every shard within 10% of even (this index's holder keys only).
        per_shard = [
            sum(
                1
                for keys in schema.group_keys
                for _ in node.scan_iter(match=keys.base + "h:*", count=1000)
            )
            for node in nodes
        ]
        mean = sum(per_shard) / len(per_shard)
        assert mean > 0 and all(abs(n - mean) <= 0.1 * mean for n in per_shard), per_shard

        # Kill the writer of ENGINES[0] (SIGKILL: no lease release): its streams move.
        victim = next(s for s in servers if s.metric("kvindex_redis_writer", engine=ENGINES[0]))
        victim.kill()
        survivors = [s for s in servers if s is not victim]
        publish_round(1)  # published while its streams have no writer
        wait_for(lambda: one_writer_each(survivors), timeout=20, what="streams handed over")
        wait_for(
            lambda: all_agree_with_truth(survivors),
            timeout=20,
            what="the index equals the truth again",
        )
        assert sum(s.metric("kvindex_redis_lease_takeovers_total") for s in survivors) >= 3
        answers = [s.post("/v1/score", body(tokens_of(0, 1))) for s in survivors]
        assert answers[0] == answers[1] and answers[0][0] == 200
    finally:
        for server in servers:
            server.kill()
        for pub in publishers:
            pub.close()
        for node in nodes:
            node.close()
        cluster.stop()
