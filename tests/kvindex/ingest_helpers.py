"""Shared helpers of the ingest tests: polling with deadlines, metric reads, free ports."""

from __future__ import annotations

from vllm_publisher import VllmPublisher, stored

from kvindex.index.base import BlockIndex
from kvindex.keys import chain_keys, root_key
from kvindex.metrics import KvindexMetrics
from tests.polling import wait_until

PROBE_HASH = 0xFFFF_FFFF_FFFF_FF00  # >= 2**63: exercises uint64 hashes too
PROBE_TOKENS = list(range(1000, 1016))


# The name the kvindex tests call it by.
wait_for = wait_until


def metric(metrics: KvindexMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def keys_for(tokens: list[int], model: str = "m") -> list[int]:
    return chain_keys(root_key(model), tokens, 16)


def probe(
    publisher: VllmPublisher, index: BlockIndex, engine: str, probe_hash: int = PROBE_HASH
) -> None:
    """Publish a probe batch until the index holds it (PUB/SUB slow joiner)."""
    publisher.publish_until(
        lambda: index.resolve(engine, probe_hash) is not None,
        stored([probe_hash], None, PROBE_TOKENS),
    )
