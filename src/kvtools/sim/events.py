"""KV-cache event wire types, mirroring vLLM 0.33's `vllm/distributed/kv_events.py`.

Written independently of the team's decoder (`kvindex.wire`) so tests can cross-check the two.
Events hold hashes as raw digests (`bytes`) or already-converted ints; the publisher turns
digests into the configured wire form (`hash_format`).

Two encodings (`encode_batch`):
* ``"map"`` (vLLM since mid-2026, 0.33): ``{"type": "BlockStored", field: value, ...}``;
  fields equal to their default are omitted, required fields always present (maybe None).
* ``"array"`` (vLLM <= ~0.25, SGLang): ``["BlockStored", f1, f2, ...]``, every field present.
The batch is always the positional array ``[ts, events, data_parallel_rank]``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

import msgspec

from kvindex.vllm_hash import wire_value

BlockHash: TypeAlias = bytes | int
EventEncoding: TypeAlias = Literal["map", "array"]
HashFormat: TypeAlias = Literal["int", "bytes"]

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    """Blocks became cached. Field order is vLLM's positional order."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: Any = None
    ownership: Any = None
    session_id: str | None = None
    lookahead_token_ids: list[int] | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    """Blocks were evicted from `medium`."""

    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: Any = None
    ownership: Any = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True):
    """The engine reset its prefix cache."""


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared

_encoder = msgspec.msgpack.Encoder()


def _wire_hash(value: BlockHash, hash_format: HashFormat) -> BlockHash:
    if isinstance(value, bytes) and hash_format == "int":
        return wire_value(value)
    return value


def with_hash_format(event: KVEvent, hash_format: HashFormat) -> KVEvent:
    """A copy of `event` whose digests are in `hash_format` (ints pass through unchanged)."""
    if isinstance(event, BlockStored):
        parent = event.parent_block_hash
        return msgspec.structs.replace(
            event,
            block_hashes=[_wire_hash(h, hash_format) for h in event.block_hashes],
            parent_block_hash=None if parent is None else _wire_hash(parent, hash_format),
        )
    if isinstance(event, BlockRemoved):
        return msgspec.structs.replace(
            event, block_hashes=[_wire_hash(h, hash_format) for h in event.block_hashes]
        )
    return event


def _array_form(event: KVEvent) -> list[Any]:
    # Tag first, then every field in declaration order, defaults included.
    return [type(event).__name__, *msgspec.structs.astuple(event)]


def encode_batch(
    ts: float,
    events: list[KVEvent],
    data_parallel_rank: int | None,
    encoding: EventEncoding = "map",
    hash_format: HashFormat = "int",
) -> bytes:
    """The msgpack payload frame of one batch."""
    converted = [with_hash_format(e, hash_format) for e in events]
    wire_events: list[Any] = converted if encoding == "map" else [_array_form(e) for e in converted]
    return _encoder.encode([ts, wire_events, data_parallel_rank])


class EventBatch(msgspec.Struct, array_like=True):
    """Decoding side of a map-encoded batch (used by tests and tools)."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


def decode_map_batch(payload: bytes) -> EventBatch:
    return msgspec.msgpack.decode(payload, type=EventBatch)


def block_stored(
    block_hashes: list[BlockHash],
    token_ids: list[int],
    block_size: int,
    parent_block_hash: BlockHash | None = None,
    *,
    medium: str | None = MEDIUM_GPU,
    lora_name: str | None = None,
    extra_keys: list[tuple[Any, ...] | None] | None = None,
    group_idx: int | None = 0,
    kv_cache_spec_kind: str | None = "full_attention",
    kv_cache_spec_sliding_window: int | None = None,
) -> BlockStored:
    """BlockStored with the defaults a single-group vLLM 0.33 engine sends."""
    return BlockStored(
        block_hashes=block_hashes,
        parent_block_hash=parent_block_hash,
        token_ids=token_ids,
        block_size=block_size,
        lora_id=None,
        medium=medium,
        lora_name=lora_name,
        extra_keys=extra_keys,
        group_idx=group_idx,
        kv_cache_spec_kind=kv_cache_spec_kind,
        kv_cache_spec_sliding_window=kv_cache_spec_sliding_window,
    )
