"""The shipped Mooncake traces: the oracle reaches the reuse ceiling computed here from the
raw file, random routing stays far below it, precise routing gets close to it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from analyze_helpers import by_policy

from kvtools.analyze.traces import SHIPPED_TRACES, resolve_trace

LIMIT = 2000


def raw_ceiling(name: str, limit: int) -> float:
    """Prefix hits / all blocks with one unbounded cache, straight from the JSON lines (no
    kvindex code): an id is a hit while every id before it in the request was seen."""
    seen: set[int] = set()
    hits = total = 0
    with resolve_trace(name).open() as f:
        for _, line in zip(range(limit), f, strict=False):
            ids = json.loads(line)["hash_ids"]
            total += len(ids)
            for block_id in ids:
                if block_id not in seen:
                    break
                hits += 1
            seen.update(ids)
    return hits / total


@pytest.mark.parametrize("name", sorted(SHIPPED_TRACES))
def test_oracle_random_precise_against_reuse_ceiling(
    name: str, run_analyze: Callable[..., dict[str, Any]]
) -> None:
    ceiling = raw_ceiling(name, LIMIT)
    assert ceiling > 0.2  # the traces do share prefixes
    # Capacity large enough that eviction does not hide what routing can win.
    doc = run_analyze("--trace", name, "--limit", str(LIMIT), "--capacity", "100000")
    assert doc["input"]["requests"] == LIMIT
    assert doc["reuse_ceiling"]["hit_rate_blocks"] == pytest.approx(ceiling)
    policies = by_policy(doc["points"][0])
    assert policies["oracle"]["hit_rate_blocks"] == pytest.approx(ceiling)
    assert policies["random"]["hit_rate_blocks"] < 0.5 * ceiling
    assert policies["precise-prefix"]["hit_rate_blocks"] > 0.95 * ceiling
    # History-based routing sits in between (its LRU forgets; it never sees evictions).
    approx = policies["approximate-prefix"]["hit_rate_blocks"]
    assert (
        policies["random"]["hit_rate_blocks"]
        < approx
        <= policies["precise-prefix"]["hit_rate_blocks"]
    )
    for p in policies.values():
        assert p["hit_rate_blocks"] <= policies["oracle"]["hit_rate_blocks"] + 1e-12


def test_default_capacity_limits_every_policy(run_analyze: Callable[..., dict[str, Any]]) -> None:
    doc = run_analyze(
        "--trace",
        "mooncake-conversation",
        "--limit",
        str(LIMIT),
        "--policies",
        "precise-prefix,oracle",
        "--capacity",
        "100",
    )
    policies = by_policy(doc["points"][0])
    # 100 blocks per engine cannot hold what the unbounded oracle reuses.
    assert policies["precise-prefix"]["hit_rate_blocks"] < policies["oracle"]["hit_rate_blocks"]
    evicted = sum(e["evicted_blocks"] for e in policies["precise-prefix"]["load"]["engines"])
    assert evicted > 0
