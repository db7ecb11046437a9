"""Shared helpers of the ingest tests: polling with deadlines, metric reads, probe batches."""

from __future__ import annotations

from vllm_publisher import VllmPublisher

from kvindex.index.base import BlockIndex
from kvindex.keys import chain_keys, root_key
from tests.events import stored
from tests.metrics import sample
from tests.polling import wait_until

PROBE_HASH = 0xFFFF_FFFF_FFFF_FF00  # >= 2**63: exercises uint64 hashes too
PROBE_TOKENS = list(range(1000, 1016))


# The names the kvindex tests call them by. metric(metrics, name, **labels): one sample of a
# KvindexMetrics registry, 0.0 when absent.
wait_for = wait_until
metric = sample


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
