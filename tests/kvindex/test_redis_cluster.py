"""Redis Cluster specifics on a real 3-node local cluster (conftest.RedisClusterProcess):
every key of one index sits in its tag's slot on one node, and indexes with different
prefixes spread over the nodes. (The behaviour suite runs on the cluster as well.)"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot
from redis_servers import RedisClusterProcess, shared_cluster, unique_prefix

from kvindex.index import PrefixMatch, Store, StoredBlock
from kvindex.index import Tier as T
from kvindex.index.redis import RedisIndex, redis_client_from_url
from kvindex.index.redis_lease import redis_writer_lease


@pytest.fixture
def cluster() -> Iterator[RedisClusterProcess]:
    yield shared_cluster()


def test_indexes_spread_over_nodes_each_in_one_slot(cluster: RedisClusterProcess) -> None:
    client = redis_client_from_url(cluster.url)
    assert isinstance(client, redis.RedisCluster)
    nodes = set()
    prefixes = [unique_prefix() for _ in range(12)]
    try:
        for prefix in prefixes:
            index = RedisIndex.from_url(cluster.url, prefix=prefix)
            index.apply("e:1", [Store(T.GPU, [StoredBlock(1, (11,)), StoredBlock(2, (12,))])])
            index.apply("e:2", [Store(T.CPU, [StoredBlock(1, (11,))])])
            redis_writer_lease(index).try_acquire()
            other = RedisIndex.from_url(cluster.url, prefix=prefix)  # a second replica
            assert other.lookup([11, 12]) == {
                "e:1": PrefixMatch(2, [2, 0, 0]),
                "e:2": PrefixMatch(1, [0, 1, 0]),
            }
            node = client.get_node_from_key(index.schema.epoch)
            nodes.add(node.name)
            keys = list(client.scan_iter(match=index.schema.all_patterns, target_nodes=node))
            assert len(keys) >= 9
            assert {key_slot(k) for k in keys} == {index.schema.hash_slot()}
            index.close()
            other.close()
        assert len(nodes) >= 2  # 12 random tags on 3 nodes: all on one is ~(1/3)^11
    finally:
        for prefix in prefixes:
            node = client.get_node_from_key("{" + prefix + "}:epoch")
            keys = list(client.scan_iter(match="{" + prefix + "}:*", target_nodes=node))
            if keys:
                client.delete(*keys)
        client.close()


def test_cluster_down_at_start_up_then_up() -> None:
    """RedisCluster connects in its constructor; the index must still come up degraded and
    connect once the cluster exists."""
    cluster = RedisClusterProcess()  # ports chosen, nothing running yet
    index = RedisIndex.from_url(cluster.url, prefix="late", connect_timeout=0.2)
    lease = redis_writer_lease(index, ttl_s=5)
    try:
        assert index.lookup([11]) == {}
        health = index.health()
        # Behaviour, not redis-py's class names (they change between releases): degraded,
        # with the client's reason kept for /readyz and the logs.
        assert not health.ok and health.reason
        assert not lease.tick() and lease.errors == 1
        cluster.start()
        deadline = time.monotonic() + 10
        while not index.health().ok:
            assert time.monotonic() < deadline, index.health()
            time.sleep(0.02)
        assert lease.tick()
        index.set_fencing_owner(lease.owner)
        index.apply("e:1", [Store(T.GPU, [StoredBlock(1, (11,))])])
        assert index.lookup([11]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
    finally:
        index.close()
        cluster.stop()
