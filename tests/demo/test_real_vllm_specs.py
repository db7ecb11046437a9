"""kvtools.real_vllm.central_specs: the one layout of central-mode real engines (the demo's
--engine vllm, benchmarks/routing_vllm.py and the real-engine tests). No engine starts here."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from kvtools.real_vllm.engines import (
    DEFAULT_ENGINE_BLOCK_SIZE,
    DEFAULT_KV_CACHE_BYTES,
    central_specs,
)


def test_engines_share_one_events_port_and_own_the_rest() -> None:
    ports = itertools.count(9000)
    events, specs = central_specs(
        2, model="m", model_dir=Path("/m"), port=lambda: next(ports), block_sizes=(32, 64)
    )
    assert events == 9000
    assert [s.name for s in specs] == ["vllm-0", "vllm-1"]
    assert [s.block_size for s in specs] == [32, 64]
    assert all(s.events_port == events and s.events_connect for s in specs)
    assert all(s.kv_cache_bytes == DEFAULT_KV_CACHE_BYTES for s in specs)
    assert len({p for s in specs for p in (s.http_port, s.replay_port)}) == 4
    _, default = central_specs(1, model="m", model_dir=Path("/m"), port=lambda: next(ports))
    assert default[0].block_size == DEFAULT_ENGINE_BLOCK_SIZE


def test_one_block_size_per_engine() -> None:
    with pytest.raises(ValueError, match="1 sizes for 2 engines"):
        central_specs(2, model="m", model_dir=Path("/m"), port=lambda: 1, block_sizes=(32,))
