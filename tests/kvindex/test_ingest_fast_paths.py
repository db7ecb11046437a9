"""EventApplier's hot-path shortcuts (medium table, cached chain roots, per-type counts,
the direct C chain_keys call) keep the rules of the general code."""

from __future__ import annotations

from typing import Any

import pytest

from kvindex import ingest as ingest_module
from kvindex import keys as keys_module
from kvindex.index import MemoryIndex, Tier
from kvindex.ingest import EventApplier
from kvindex.keys import chain_keys, root_key
from kvindex.wire import DecodedBatch, decode_batch
from tests.events import RawEvent, encode_batch, stored

T = list(range(32))


def batch(*events: RawEvent) -> DecodedBatch:
    """Array-encoded events through the real decoder."""
    return decode_batch(encode_batch(events, "array", ts=0.0))


@pytest.mark.parametrize(
    ("medium", "tier"),
    [("GPU", Tier.GPU), ("cpu", Tier.CPU), ("Storage", Tier.STORAGE), (None, Tier.GPU)],
)
def test_media_of_any_case_map_to_their_tier(medium: str | None, tier: Tier) -> None:
    index = MemoryIndex()
    counts = EventApplier(index).apply_batch(
        "e:1", batch(stored([1], None, T[:16], medium=medium)), "m"
    )
    assert counts.skipped == {} and counts.stored_blocks == 1
    match = index.lookup(chain_keys(root_key("m"), T[:16]))["e:1"]
    assert match.blocks == 1 and match.by_tier[tier] == 1


def test_unknown_medium_skipped_and_counted_on_store_and_remove() -> None:
    counts = EventApplier(MemoryIndex()).apply_batch(
        "e:1", batch(stored([1], None, T[:16], medium="NVME"), ["BlockRemoved", [1], "tape"]), "m"
    )
    assert counts.skipped == {"unknown_medium": 2}
    assert counts.events == {"BlockStored": 1, "BlockRemoved": 1}


def test_event_counts_by_type() -> None:
    counts = EventApplier(MemoryIndex()).apply_batch(
        "e:1",
        batch(
            stored([1], None, T[:16]),
            stored([2], 1, T[:16]),
            ["BlockRemoved", [2]],
            ["AllBlocksCleared"],
        ),
        "m",
    )
    assert counts.events == {"BlockStored": 2, "BlockRemoved": 1, "AllBlocksCleared": 1}
    assert EventApplier(MemoryIndex()).apply_batch("e:1", batch(), "m").events == {}


def test_chain_roots_stay_right_past_the_cache_bound() -> None:
    index = MemoryIndex()
    applier = EventApplier(index)
    models = [f"model-{i}" for i in range(ingest_module._MAX_CACHED_ROOTS + 10)]
    for i, model in enumerate(models):
        lora = "adapter" if i % 2 else None
        applier.apply_batch(f"e:{i}", batch(stored([i], None, T[:16], lora_name=lora)), model)
    assert len(applier._roots) <= ingest_module._MAX_CACHED_ROOTS
    for i, model in enumerate(models[-20:] + models[:5]):
        lora = "adapter" if models.index(model) % 2 else None
        keys = chain_keys(root_key(model, lora), T[:16])
        assert set(index.lookup(keys)) == {f"e:{models.index(model)}"}, (i, model)


@pytest.mark.parametrize("native_keys", [True, False])
def test_keys_with_and_without_the_c_chain_keys_agree(
    native_keys: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not native_keys:
        monkeypatch.setattr(keys_module, "_native_chain_keys", None)
    index = MemoryIndex()
    applier = EventApplier(index)
    applier.apply_batch("e:1", batch(stored([1], None, T[:16]), stored([2], 1, T[:16])), "m")
    keys = chain_keys(root_key("m"), T[:16])
    keys += chain_keys(keys[-1], T[:16])
    assert index.lookup(keys)["e:1"].blocks == 2


def test_token_out_of_range_still_skipped() -> None:
    event = ["BlockStored", [1], None, [2**33] * 16, 16, None, "GPU"]
    counts = EventApplier(MemoryIndex()).apply_batch("e:1", batch(event), "m")
    assert counts.skipped == {"token_id_out_of_range": 1} and counts.stored_blocks == 0


def test_pending_gauge_follows_held_events_batch_by_batch() -> None:
    # IngestService sets the gauge only when the count changes: it must still track it.
    from kvindex.index import MemoryIndexConfig
    from kvindex.index.locked import LockedIndex
    from kvindex.ingest_service import IngestService, IngestServiceConfig
    from kvindex.metrics import KvindexMetrics
    from kvindex.subscriber import LiveMessage
    from kvindex.wire import Frame

    metrics = KvindexMetrics()
    service = IngestService(
        IngestServiceConfig(accept_any_engine=True),
        LockedIndex(MemoryIndex(MemoryIndexConfig())),
        metrics=metrics,
    )
    topic = b"kv@10.0.0.1:8000@m"

    def send(seq: int, *events: Any) -> float | None:
        payload = encode_batch(events, "array", ts=float(seq + 1))
        service.handle(LiveMessage("test", Frame(topic, seq, payload), 0.0))
        return metrics.registry.get_sample_value(
            "kvindex_ingest_pending_events", {"engine": "10.0.0.1:8000"}
        )

    assert send(0, stored([1], None, T[:16])) == 0
    assert send(1, stored([3], 2, T[:16])) == 1  # parent 2 unknown: held
    assert send(2, ["BlockRemoved", [99]]) == 1
    assert send(3, stored([2], 1, T[:16])) == 0  # 2 arrives: 3 resolves
    assert send(4, stored([4], 3, T[:16])) == 0
    assert metrics.registry.get_sample_value("kvindex_ingest_batches_total") == 5
    service.subscriber.close()
