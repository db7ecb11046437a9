"""decode_batch's whole-batch fast paths (int hashes, encoding picked from the first event)
must give exactly what decoding event by event gives: same events, same counts."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex import wire
from kvindex.wire import BlockRemoved, BlockStored, DecodedBatch, decode_batch

enc = msgspec.msgpack.encode


def event_by_event(payload: bytes) -> DecodedBatch:
    """The reference: the per-event slow path of decode_batch, for any payload."""
    raw: Any
    try:
        raw = wire._decode_raw_array_batch(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raw = wire._decode_raw_map_batch(payload)
    events: list[wire.Event] = []
    unknown = malformed = 0
    for item in raw.events:
        result = wire._decode_one(item)
        if result == "unknown":
            unknown += 1
        elif result == "malformed":
            malformed += 1
        else:
            assert not isinstance(result, str)
            events.append(result)
    return wire._finish(raw.ts, events, raw.data_parallel_rank, unknown, malformed)


_hash = (
    st.integers(-(2**63), 2**64 - 1)
    | st.binary(min_size=8, max_size=8)
    | st.binary(min_size=16, max_size=16)
    | st.binary(min_size=32, max_size=32)
    | st.binary(max_size=40)  # mostly bad digest lengths
)
_int_hash = st.integers(-(2**63), 2**64 - 1)


@st.composite
def _event(draw: st.DrawFn, as_map: bool, ints_only: bool) -> Any:
    h = _int_hash if ints_only else _hash
    kind = draw(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared"]))
    hashes = draw(st.lists(h, max_size=4))
    medium = draw(st.sampled_from([None, "GPU", "CPU", "", "cpu"]))
    group = draw(st.sampled_from([None, 0, 1]))
    if kind == "BlockStored":
        size = draw(st.sampled_from([0, 16, -1, 32]))
        parent = draw(st.none() | h)
        tokens = draw(st.lists(st.integers(0, 2**32), max_size=4))
        fields = {
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": tokens,
            "block_size": size,
            "lora_id": draw(st.none() | st.integers(0, 9)),
            "medium": medium,
            "lora_name": draw(st.none() | st.just("lora")),
            "extra_keys": draw(st.none() | st.just([["salt"]])),
            "group_idx": group,
            "kv_cache_spec_kind": draw(st.none() | st.just("full_attention")),
            "kv_cache_spec_sliding_window": draw(st.none() | st.integers(1, 9)),
        }
    elif kind == "BlockRemoved":
        fields = {"block_hashes": hashes, "medium": medium, "group_idx": group}
    else:
        fields = {}
    n = draw(st.integers(0, len(fields)))  # the older, shorter forms (and absent map fields)
    kept = dict(list(fields.items())[: max(n, 4 if kind == "BlockStored" else 1)])
    if kind == "AllBlocksCleared":
        kept = {}
    if as_map:
        return {"type": kind, **kept}
    return [kind, *kept.values()]


@st.composite
def _payload(draw: st.DrawFn) -> bytes:
    as_map = draw(st.booleans())
    ints_only = draw(st.booleans())
    mixed = draw(st.integers(0, 9)) == 0  # now and then one event of the other encoding
    n = draw(st.sampled_from([0, 1, 3, 15, 16, 17]))  # 16+: a 3-byte array header
    events = [draw(_event(as_map, ints_only)) for _ in range(n)]
    if mixed and events:
        events[draw(st.integers(0, n - 1))] = draw(_event(not as_map, ints_only))
    ts = draw(st.sampled_from([0.0, 1.5, 1_700_000_000.25]))
    rank = draw(st.none() | st.integers(0, 7))
    return enc([ts, events, rank])


@settings(max_examples=400, deadline=None)
@given(_payload())
def test_fast_paths_equal_event_by_event_decoding(payload: bytes) -> None:
    assert decode_batch(payload) == event_by_event(payload)


def test_int_fast_path_still_rejects_empty_and_sizeless_stores() -> None:
    events = [
        {"type": "BlockStored", "block_hashes": [], "token_ids": [], "block_size": 16},
        {"type": "BlockStored", "block_hashes": [1], "token_ids": [1] * 16, "block_size": 0},
        {"type": "BlockStored", "block_hashes": [1], "token_ids": [1] * 16},  # no size
        {"type": "BlockRemoved", "block_hashes": [2**64 - 1]},
    ]
    batch = decode_batch(enc([1.0, events, None]))
    assert batch.events == [BlockRemoved(block_hashes=[2**64 - 1])]
    assert batch.malformed == 3 and batch.unknown == 0


def test_digest_hashes_after_int_ones_take_the_general_path() -> None:
    tokens = list(range(16))
    events = [
        ["BlockStored", [1], None, tokens, 16, None, "GPU"],
        ["BlockStored", [b"\x07" * 32], 1, tokens, 16, None, "CPU"],
        ["BlockStored", [b"\x07" * 12], None, tokens, 16, None],  # bad digest length
    ]
    batch = decode_batch(enc([1.0, events, None]))
    assert batch.malformed == 1
    assert [e.block_hashes for e in batch.events if isinstance(e, BlockStored)] == [
        [1],
        [b"\x07" * 32],
    ]


def test_first_event_sniff_reads_every_array_header_form() -> None:
    one = enc([1.0, [{"type": "AllBlocksCleared"}], None])
    sixteen = enc([1.0, [["AllBlocksCleared"]] * 16, None])
    assert wire._first_event_is_map(one) is True
    assert wire._first_event_is_map(sixteen) is False
    assert wire._first_event_is_map(enc([1.0, [], None])) is None
    assert wire._first_event_is_map(enc([1, [["AllBlocksCleared"]], None])) is None  # int ts
    assert wire._first_event_is_map(enc({"ts": 1.0, "events": []})) is None
