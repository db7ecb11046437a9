"""Shared helpers for the read-path tests: vLLM 0.33 style (map-encoded) KV-event batches,
applied to a real index through the real EventApplier."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import msgspec

from kvindex.index import BlockIndex
from kvindex.ingest import EventApplier, IngestConfig
from kvindex.wire import decode_batch

_hashes = itertools.count(1_000_000_007, 7919)


def stored_event(
    tokens: Sequence[int],
    parent: int | None = None,
    *,
    block_size: int = 16,
    lora: str | None = None,
    salt: str | None = None,
    medium: str | None = None,
) -> tuple[dict[str, Any], list[int]]:
    """A BlockStored event as vLLM 0.33 sends it (map encoding, defaulted fields omitted), with
    fresh engine hashes; returns (event, hashes)."""
    n = len(tokens) // block_size
    hashes = [next(_hashes) % (1 << 64) for _ in range(n)]
    event: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": list(tokens[: n * block_size]),
        "block_size": block_size,
        "lora_name": lora,
        "kv_cache_spec_kind": "full_attention",
    }
    if medium is not None:
        event["medium"] = medium
    if parent is None and (salt is not None or lora is not None):
        first: list[Any] = [s for s in (lora, salt) if s is not None]
        event["extra_keys"] = [first] + [None] * (n - 1)
    return event, hashes


def payload(*events: dict[str, Any], dp_rank: int | None = None) -> bytes:
    return msgspec.msgpack.encode([1767225600.0, list(events), dp_rank])


def store_prompt(
    index: BlockIndex,
    engine: str,
    model: str,
    tokens: Sequence[int],
    *,
    lora: str | None = None,
    salt: str | None = None,
    medium: str | None = None,
    block_size: int = 16,
) -> list[int]:
    """Apply one BlockStored covering the full blocks of ``tokens`` for ``engine``."""
    event, hashes = stored_event(tokens, block_size=block_size, lora=lora, salt=salt, medium=medium)
    applier = EventApplier(index, IngestConfig(block_size=16))
    counts = applier.apply_batch(engine, decode_batch(payload(event)), model)
    assert not counts.skipped, counts.skipped
    return hashes
