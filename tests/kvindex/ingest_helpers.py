"""Shared helpers of the ingest tests: polling with deadlines, metric reads, free ports."""

from __future__ import annotations

import time
from collections.abc import Callable

from vllm_publisher import VllmPublisher, stored

from kvindex.index.base import BlockIndex
from kvindex.keys import chain_keys, root_key
from kvindex.metrics import KvindexMetrics

PROBE_HASH = 0xFFFF_FFFF_FFFF_FF00  # >= 2**63: exercises uint64 hashes too
PROBE_TOKENS = list(range(1000, 1016))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


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
