"""Event encodings: exact msgpack layout, both encodings, both hash formats."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from kvindex.vllm_hash import block_hashes, wire_value
from kvtools.sim.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_map_batch,
    encode_batch,
)


# Independent mirror of vLLM 0.33's map-encoded classes (tag field "type", defaults omitted).
class MirrorStored(msgspec.Struct, tag="BlockStored", omit_defaults=True):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[list[Any] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class MirrorRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class MirrorCleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True):
    pass


class MirrorBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[MirrorStored | MirrorRemoved | MirrorCleared]
    data_parallel_rank: int | None


DIGESTS = block_hashes(list(range(32)), 16, "sha256_cbor", "0")


def stored(**kw: Any) -> BlockStored:
    fields: dict[str, Any] = {
        "block_hashes": list(DIGESTS),
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    fields.update(kw)
    return BlockStored(**fields)


def test_map_encoding_raw_layout() -> None:
    payload = encode_batch(
        12.5, [stored(), BlockRemoved([DIGESTS[1]], "GPU"), AllBlocksCleared()], 3
    )
    raw = msgspec.msgpack.decode(payload)
    assert raw[0] == 12.5 and raw[2] == 3 and len(raw) == 3
    ev = raw[1][0]
    assert list(ev) == [
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "group_idx",
        "kv_cache_spec_kind",
    ]
    assert ev["type"] == "BlockStored"
    assert ev["block_hashes"] == [wire_value(d) for d in DIGESTS]
    assert ev["block_hashes"][0] == 12687895063098490012
    assert ev["parent_block_hash"] is None and ev["lora_id"] is None
    assert raw[1][1] == {
        "type": "BlockRemoved",
        "block_hashes": [wire_value(DIGESTS[1])],
        "medium": "GPU",
    }
    assert raw[1][2] == {"type": "AllBlocksCleared"}


def test_map_encoding_decodes_with_independent_mirror() -> None:
    payload = encode_batch(1.0, [stored(extra_keys=[("sql",), None], lora_name="sql")], 0)
    batch = msgspec.msgpack.decode(payload, type=MirrorBatch)
    ev = batch.events[0]
    assert isinstance(ev, MirrorStored)
    assert ev.lora_name == "sql" and ev.extra_keys == [["sql"], None]
    assert ev.kv_cache_spec_kind == "full_attention"


def test_array_encoding_every_field_positional() -> None:
    payload = encode_batch(
        2.0, [stored(), BlockRemoved([5], "CPU"), AllBlocksCleared()], None, "array"
    )
    raw = msgspec.msgpack.decode(payload)
    assert raw[2] is None
    ev = raw[1][0]
    assert ev[0] == "BlockStored"
    assert ev[1] == [wire_value(d) for d in DIGESTS]
    assert ev[2:8] == [None, list(range(32)), 16, None, "GPU", None]
    assert len(ev) == 16  # tag + 15 fields, trailing Nones included
    assert raw[1][1] == ["BlockRemoved", [5], "CPU", None, None, None]
    assert raw[1][2] == ["AllBlocksCleared"]


def test_bytes_hash_format_sends_raw_digests() -> None:
    payload = encode_batch(
        0.0,
        [stored(parent_block_hash=DIGESTS[0], block_hashes=[DIGESTS[1]])],
        0,
        hash_format="bytes",
    )
    ev = msgspec.msgpack.decode(payload)[1][0]
    assert ev["block_hashes"] == [DIGESTS[1]] and ev["parent_block_hash"] == DIGESTS[0]
    assert len(ev["block_hashes"][0]) == 32


@given(
    hashes=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=5),
    tokens=st.lists(st.integers(0, 2**31), max_size=50),
    ts=st.floats(allow_nan=False, allow_infinity=False),
    rank=st.none() | st.integers(0, 64),
    lora=st.none() | st.text(max_size=10),
)
def test_roundtrip_map(
    hashes: list[bytes], tokens: list[int], ts: float, rank: int | None, lora: str | None
) -> None:
    ev = stored(block_hashes=list(hashes), token_ids=tokens, lora_name=lora)
    batch = decode_map_batch(encode_batch(ts, [ev], rank))
    assert batch.ts == ts and batch.data_parallel_rank == rank
    out = batch.events[0]
    assert isinstance(out, BlockStored)
    assert out.block_hashes == [wire_value(h) for h in hashes]
    assert out.token_ids == tokens and out.lora_name == lora


def test_block_stored_helper_matches_engine_defaults() -> None:
    from kvtools.sim.events import block_stored

    assert block_stored(list(DIGESTS), list(range(32)), 16) == stored()


# What an array-era (vLLM <= ~0.25) consumer decodes with: tagged array_like structs that
# know only the first 7 BlockStored fields; msgspec ignores the newer trailing fields.
class OldStored(msgspec.Struct, tag="BlockStored", array_like=True):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class OldRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True):
    block_hashes: list[int]
    medium: str | None


class OldCleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True):
    pass


class OldBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[OldStored | OldRemoved | OldCleared]
    data_parallel_rank: int | None


def test_array_encoding_decodes_with_array_era_mirror() -> None:
    payload = encode_batch(
        3.0,
        [
            stored(parent_block_hash=DIGESTS[0], block_hashes=[DIGESTS[1]]),
            BlockRemoved([DIGESTS[1]], "GPU"),
            AllBlocksCleared(),
        ],
        1,
        "array",
    )
    batch = msgspec.msgpack.decode(payload, type=OldBatch)
    first, removed, cleared = batch.events
    assert isinstance(first, OldStored) and first.parent_block_hash == wire_value(DIGESTS[0])
    assert first.block_hashes == [wire_value(DIGESTS[1])] and first.medium == "GPU"
    assert isinstance(removed, OldRemoved) and removed.block_hashes == [wire_value(DIGESTS[1])]
    assert isinstance(cleared, OldCleared) and batch.data_parallel_rank == 1
