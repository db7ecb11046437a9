"""The simulator's events (written independently from vLLM's wire classes) decode with the
team's decoder and land in the index under the keys a request for the same tokens computes."""

from __future__ import annotations

import pytest

from kvindex.index import MemoryIndex
from kvindex.ingest import EventApplier
from kvindex.keys import BlockExtra, chain_keys, root_key
from kvindex.vllm_hash import block_hashes, wire_value
from kvindex.wire import BlockStored, decode_batch
from kvtools.sim.events import AllBlocksCleared, BlockRemoved, block_stored, encode_batch

TOKENS = list(range(48))


@pytest.mark.parametrize("encoding", ["map", "array"])
@pytest.mark.parametrize("hash_format", ["int", "bytes"])
def test_sim_batches_decode_and_index(encoding: str, hash_format: str) -> None:
    digests = block_hashes(TOKENS, 16, algo="sha256_cbor", seed="0")
    hashes: list[int | bytes] = list(digests)  # encode_batch converts to the wire format
    events = [
        block_stored(hashes[:2], TOKENS[:32], 16, lora_name="ad", extra_keys=[["ad", "s"], ["ad"]]),
        block_stored(
            hashes[2:],
            TOKENS[32:],
            16,
            parent_block_hash=hashes[1],
            lora_name="ad",
            extra_keys=[["ad"]],
        ),
    ]
    payload = encode_batch(1.0, events, 0, encoding=encoding, hash_format=hash_format)  # type: ignore[arg-type]
    batch = decode_batch(payload)
    assert batch.error is None and batch.unknown == 0 and batch.malformed == 0
    assert [type(e) for e in batch.events] == [BlockStored, BlockStored]
    first = batch.events[0]
    assert isinstance(first, BlockStored) and first.lora_name == "ad" and first.block_size == 16
    expected = [wire_value(d) for d in digests[:2]] if hash_format == "int" else digests[:2]
    assert first.block_hashes == expected
    index = MemoryIndex()
    EventApplier(index).apply_batch("10.0.0.1:8000", batch, "m")
    keys = chain_keys(root_key("m", "ad"), TOKENS, 16, [BlockExtra(cache_salt="s")])
    assert index.lookup(keys)["10.0.0.1:8000"].blocks == 3
    removed = [BlockRemoved(block_hashes=hashes[2:], medium="GPU")]
    removal = decode_batch(
        encode_batch(2.0, removed, 0, encoding=encoding, hash_format=hash_format)
    )  # type: ignore[arg-type]
    EventApplier(index).apply_batch("10.0.0.1:8000", removal, "m")
    assert index.lookup(keys)["10.0.0.1:8000"].blocks == 2
    cleared = decode_batch(encode_batch(3.0, [AllBlocksCleared()], 0, encoding=encoding))  # type: ignore[arg-type]
    EventApplier(index).apply_batch("10.0.0.1:8000", cleared, "m")
    assert index.lookup(keys) == {}
