"""Decoding every encoding of ../shared/reference/vllm-kv-events.md."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    FrameError,
    decode_batch,
    parse_frames,
    parse_replay_frames,
)

enc = msgspec.msgpack.encode
TOKENS = list(range(32))
# Every positional field of vLLM 0.33's BlockStored, in order.
FULL_ARRAY_STORED = [
    "BlockStored",
    [1, 2],
    None,
    TOKENS,
    16,
    None,
    "GPU",
    "adapter",
    [["adapter", "salt"], None],
    0,
    "full_attention",
    None,
    "local",
    "owned",
    "session-1",
    [99],
]


@pytest.mark.parametrize("n_fields", range(5, len(FULL_ARRAY_STORED)))
def test_array_stored_any_length(n_fields: int) -> None:
    event = FULL_ARRAY_STORED[: n_fields + 1]
    batch = decode_batch(enc([1.5, [event], None]))
    assert batch.error is None and batch.malformed == 0
    (stored,) = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [1, 2] and stored.token_ids == TOKENS
    assert stored.block_size == 16 and stored.medium == "GPU"
    if n_fields >= 7:
        assert stored.lora_name == "adapter"
    if n_fields >= 8:
        assert stored.extra_keys == [["adapter", "salt"], None]


def test_array_extra_trailing_fields_ignored() -> None:
    event = [*FULL_ARRAY_STORED, "future", {"x": 1}]
    (stored,) = decode_batch(enc([0.0, [event], 2])).events
    assert isinstance(stored, BlockStored) and stored.kv_cache_spec_kind == "full_attention"


def test_map_encoding_subset_and_unknown_fields() -> None:
    events = [
        {
            "type": "BlockStored",
            "block_hashes": [7],
            "parent_block_hash": 3,
            "token_ids": TOKENS[:16],
            "block_size": 16,
            "lora_id": None,
            "medium": None,
            "lora_name": None,
            "brand_new_field": [1, 2],
        },
        {"type": "BlockRemoved", "block_hashes": [7], "medium": "CPU"},
        {"type": "AllBlocksCleared"},
    ]
    batch = decode_batch(enc([2.0, events, 1]))
    assert batch.data_parallel_rank == 1 and batch.unknown == 0 and batch.malformed == 0
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored) and stored.parent_block_hash == 3
    assert stored.medium == "GPU"
    assert isinstance(removed, BlockRemoved) and removed.medium == "CPU"
    assert isinstance(cleared, AllBlocksCleared)


def test_map_batch() -> None:
    payload = enc({"ts": 3.0, "events": [["BlockRemoved", [5], None]], "data_parallel_rank": 4})
    batch = decode_batch(payload)
    assert batch.ts == 3.0 and batch.data_parallel_rank == 4
    assert batch.events == [BlockRemoved(block_hashes=[5])]


@pytest.mark.parametrize("h", [0, 2**64 - 1, 2**63, -1, -(2**63), b"\x01" * 32, b"\x02" * 16])
def test_hash_forms(h: int | bytes) -> None:
    event = ["BlockStored", [h], h, TOKENS[:16], 16, None]
    (stored,) = decode_batch(enc([0.0, [event], None])).events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [h] and stored.parent_block_hash == h


def test_sglang_batch() -> None:
    # SGLang: array events with the 5 oldest fields (+ medium), signed int64 hashes.
    events = [["BlockStored", [-5, 9], None, TOKENS, 16, None, "GPU"], ["AllBlocksCleared"]]
    batch = decode_batch(enc([1.0, events, 0]))
    assert [type(e) for e in batch.events] == [BlockStored, AllBlocksCleared]


def test_unknown_event_skipped_and_counted() -> None:
    events: list[Any] = [
        ["BlockStored", [1], None, TOKENS[:16], 16, None],
        ["KVCacheTransferred", 1, 2],
        {"type": "SomethingNew", "x": 1},
    ]
    batch = decode_batch(enc([0.0, events, None]))
    assert batch.unknown == 2 and batch.malformed == 0 and len(batch.events) == 1


def test_malformed_event_counted_others_kept() -> None:
    events: list[Any] = [
        ["BlockStored", "not-a-list", None, TOKENS[:16], 16, None],
        ["BlockStored", [b"short"], None, TOKENS[:16], 16, None],  # 5-byte digest
        ["BlockStored", [], None, [], 16, None],  # nothing stored
        ["BlockRemoved", [4]],
        42,
    ]
    batch = decode_batch(enc([0.0, events, None]))
    assert batch.events == [BlockRemoved(block_hashes=[4])]
    assert batch.malformed == 4 and batch.unknown == 0


@pytest.mark.parametrize(
    "payload", [b"", b"\xc1", enc("text"), enc([1.0]), enc({"ts": 1}), enc([1.0, 5, None])]
)
def test_undecodable_payload(payload: bytes) -> None:
    batch = decode_batch(payload)
    assert batch.error and batch.events == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_decoder_never_raises_on_bytes(data: bytes) -> None:
    decode_batch(data)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=10)
    | st.floats(allow_nan=False)
)
_values = st.recursive(
    _scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_values, max_size=6), _values)
def test_decoder_never_raises_on_structured_garbage(events: list[Any], rank: Any) -> None:
    for tag in ("BlockStored", "BlockRemoved", None):
        shaped = [[tag, *e] if tag and isinstance(e, list) else e for e in events]
        batch = decode_batch(enc([0.0, shaped, rank]))
        assert batch.error is not None or len(
            batch.events
        ) + batch.unknown + batch.malformed == len(shaped)


def test_frames() -> None:
    frame = parse_frames([b"kv@1.2.3.4:8000@m", (7).to_bytes(8, "big"), b"p"])
    assert (frame.topic, frame.seq, frame.payload) == (b"kv@1.2.3.4:8000@m", 7, b"p")
    with pytest.raises(FrameError):
        parse_frames([b"t", b"\x00", b"p"])
    with pytest.raises(FrameError):
        parse_frames([b"only"])


def test_replay_frames_both_forms_and_end_marker() -> None:
    seq = (5).to_bytes(8, "big")
    new = parse_replay_frames([b"", b"topic", seq, b"p"])
    old = parse_replay_frames([b"", seq, b"p"])
    assert new is not None and new.topic == b"topic" and new.seq == 5
    assert old is not None and old.topic == b"" and old.seq == 5
    end = (-1).to_bytes(8, "big", signed=True)
    assert parse_replay_frames([b"", b"", end, b""]) is None
    assert parse_replay_frames([b"", end, b""]) is None
