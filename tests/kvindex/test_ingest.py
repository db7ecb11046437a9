from __future__ import annotations

from kvindex.engines import EngineId, parse_topic
from kvindex.index import MemoryIndex
from kvindex.ingest import EventApplier, IngestConfig, SeqAction, SequenceTracker
from kvindex.keys import BlockExtra, chain_keys, root_key
from kvindex.wire import DecodedBatch, decode_batch
from tests.events import RawEvent, encode_batch, stored

MODEL = "m"
T = list(range(64))


def batch(*events: RawEvent) -> DecodedBatch:
    """Array-encoded events through the real decoder, up to ``kv_cache_spec_kind``."""
    return decode_batch(encode_batch(events, "array", ts=0.0, width=10))


def prompt_keys(tokens: list[int], lora: str | None = None, salt: str | None = None) -> list[int]:
    extras = [BlockExtra(cache_salt=salt)] if salt else None
    return chain_keys(root_key(MODEL, lora), tokens, 16, extras)


def setup() -> tuple[MemoryIndex, EventApplier]:
    index = MemoryIndex()
    return index, EventApplier(index)


def test_store_chain_across_batches_and_remove() -> None:
    index, applier = setup()
    applier.apply_batch("e:1", batch(stored([1, 2], None, T[:32])), MODEL)
    applier.apply_batch("e:1", batch(stored([3], 2, T[32:48])), MODEL)
    assert index.lookup(prompt_keys(T))["e:1"].blocks == 3
    applier.apply_batch("e:1", batch(["BlockRemoved", [2], "GPU"]), MODEL)
    assert index.lookup(prompt_keys(T))["e:1"].blocks == 1


def test_engine_block_size_multiple_splits() -> None:
    index, applier = setup()
    counts = applier.apply_batch("e:1", batch(stored([1], None, T, block_size=64)), MODEL)
    assert counts.stored_blocks == 1
    assert index.lookup(prompt_keys(T))["e:1"].blocks == 4
    applier.apply_batch("e:1", batch(["BlockRemoved", [1]]), MODEL)
    assert index.lookup(prompt_keys(T)) == {}


def test_skips_are_counted() -> None:
    index, applier = setup()
    counts = applier.apply_batch(
        "e:1",
        batch(
            stored([1], None, T[:24], block_size=24),  # not a multiple of 16
            stored([2], None, T[:16], kv_cache_spec_kind="sliding_window", group_idx=1),
            stored([3], None, T[:20]),  # token count mismatch
            stored([4], None, T[:16], medium="NVME"),
        ),
        MODEL,
    )
    assert counts.skipped == {
        "block_size_not_multiple": 1,
        "group_not_indexed": 1,
        "token_count_mismatch": 1,
        "unknown_medium": 1,
    }
    assert index.engines() == []
    # Removals in a skipped group are skipped too.
    assert applier.apply_batch("e:1", batch(["BlockRemoved", [2], "GPU", 1]), MODEL).skipped == {
        "group_not_indexed": 1
    }


def test_sliding_window_indexed_when_configured() -> None:
    index = MemoryIndex()
    applier = EventApplier(
        index, IngestConfig(indexed_kinds=frozenset({"full_attention", "sliding_window"}))
    )
    applier.apply_batch(
        "e:1", batch(stored([2], None, T[:16], kv_cache_spec_kind="sliding_window")), MODEL
    )
    assert index.lookup(prompt_keys(T[:16]))["e:1"].blocks == 1


def test_partial_block_after_full_ones() -> None:
    _index, applier = setup()
    applier.apply_batch("e:1", batch(stored([1], None, T[:32], block_size=32)), MODEL)
    counts = applier.apply_batch("e:1", batch(stored([2], 1, T[32:48], block_size=16)), MODEL)
    assert counts.skipped == {"partial_block": 1}


def test_lora_and_salt_meet_request_keys() -> None:
    index, applier = setup()
    extra = [["ad", "salt1"], ["ad"]]
    applier.apply_batch(
        "e:1", batch(stored([1, 2], None, T[:32], lora_name="ad", extra_keys=extra)), MODEL
    )
    assert index.lookup(prompt_keys(T[:32], lora="ad", salt="salt1"))["e:1"].blocks == 2
    assert index.lookup(prompt_keys(T[:32], lora="ad")) == {}
    assert index.lookup(prompt_keys(T[:32], salt="salt1")) == {}
    # Salt alone (no LoRA) on the first block.
    applier.apply_batch("f:1", batch(stored([5], None, T[:16], extra_keys=[["s2"]])), MODEL)
    assert "f:1" in index.lookup(prompt_keys(T[:16], salt="s2"))


def test_unknown_parent_is_held_then_resolved() -> None:
    index, applier = setup()
    counts = applier.apply_batch("e:1", batch(stored([3], 2, T[32:48])), MODEL)
    assert counts.pending == 1 and counts.skipped == {"unknown_parent_held": 1}
    assert index.lookup(prompt_keys(T)) == {}
    counts = applier.apply_batch("e:1", batch(stored([1, 2], None, T[:32])), MODEL)
    assert counts.resolved_pending == 1 and counts.pending == 0
    assert index.lookup(prompt_keys(T))["e:1"].blocks == 3


def test_reannounced_hits_are_idempotent() -> None:
    index, applier = setup()
    for _ in range(3):
        applier.apply_batch("e:1", batch(stored([1, 2], None, T[:32])), MODEL)
    assert index.stats().entries == 2


def test_clear_drops_engine_and_pending() -> None:
    index, applier = setup()
    applier.apply_batch("e:1", batch(stored([1], None, T[:16]), stored([9], 8, T[16:32])), MODEL)
    counts = applier.apply_batch("e:1", batch(["AllBlocksCleared"]), MODEL)
    assert counts.pending == 0 and index.engines() == []


def test_models_do_not_mix() -> None:
    index, applier = setup()
    applier.apply_batch("e:1", batch(stored([1], None, T[:16])), "other-model")
    assert index.lookup(prompt_keys(T[:16])) == {}


def test_sequence_tracker() -> None:
    tracker = SequenceTracker()
    assert tracker.observe("e", 5) is SeqAction.APPLY
    assert tracker.observe("e", 6) is SeqAction.APPLY
    assert tracker.observe("e", 6) is SeqAction.DUPLICATE
    assert tracker.observe("e", 9) is SeqAction.GAP and tracker.last("e") == 9
    assert tracker.observe("e", 0) is SeqAction.RESET
    assert tracker.observe("e", 1) is SeqAction.APPLY


def test_topic_parsing() -> None:
    engine = parse_topic(b"kv@10.0.0.5:8000@meta/llama-3@v2")
    assert engine == EngineId("10.0.0.5", 8000, "meta/llama-3@v2")
    assert engine.endpoint() == "10.0.0.5:8000"
    assert engine.endpoint(dp_rank=2) == "10.0.0.5:8002"
    assert engine.endpoint(dp_rank=2, dp_port_stride=0) == "10.0.0.5:8000"
    assert parse_topic("kv@[fd00::1]:9000@m").endpoint() == "[fd00::1]:9000"
    no_port = parse_topic("kv@10.0.0.5@m", default_model="x")
    assert no_port.port is None and no_port.endpoint() == "10.0.0.5"
    assert parse_topic("kv@1.2.3.4:1", default_model="dflt").model == "dflt"
    for bad in ("", "foo", "kv@", "kv@1.2.3.4:0@m", "kv@1.2.3.4:x@m"):
        try:
            parse_topic(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_a_held_event_whose_block_is_evicted_never_applies() -> None:
    """Held for an unknown parent, then evicted by the engine: when the parent arrives the
    block must not be claimed (the engine no longer holds it: a false hit). A held event
    after it in the chain stays held (its parent will never be applied)."""
    index, applier = setup()
    applier.apply_batch("e:1", batch(stored([3], 2, T[32:48]), stored([4], 3, T[48:64])), MODEL)
    counts = applier.apply_batch("e:1", batch(["BlockRemoved", [3], "GPU"]), MODEL)
    assert counts.skipped == {"unknown_parent_evicted": 1} and counts.pending == 1
    applier.apply_batch("e:1", batch(stored([1, 2], None, T[:32])), MODEL)
    assert index.lookup(prompt_keys(T))["e:1"].blocks == 2
    # An unrelated removal leaves held events alone.
    applier.apply_batch("e:1", batch(stored([7], 6, T[16:32])), MODEL)
    counts = applier.apply_batch("e:1", batch(["BlockRemoved", [1], "GPU"]), MODEL)
    assert "unknown_parent_evicted" not in counts.skipped and counts.pending == 2
