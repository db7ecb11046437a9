"""The GPU blocks each engine holds per its event stream (`EventApplier.residency`): stores
minus removals, cleared with the engine's cache, forgotten with the engine; replays that
re-apply batches count nothing twice. Checked against a model of the engine's block pool
over random streams."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex.engine_blocks import EngineResidency
from kvindex.index import MemoryIndex
from kvindex.ingest import EventApplier, IngestConfig
from kvindex.wire import DecodedBatch, decode_batch
from tests.events import Ev, encode_batch, removed, stored

MODEL = "m"


def _batch(*events: Ev) -> DecodedBatch:
    return decode_batch(encode_batch(events, "array", ts=0.0, width=10))


def _applier() -> EventApplier:
    return EventApplier(MemoryIndex(), IngestConfig(track_residency=True))


def test_stores_removals_clears_and_other_media() -> None:
    applier = _applier()
    res = applier.residency
    assert res.get("e:1") is None  # never heard from
    applier.apply_batch("e:1", _batch(stored([1, 2, 3], None, list(range(48)))), MODEL)
    assert res.get("e:1") == 3
    applier.apply_batch(
        "e:1",
        _batch(
            removed([2]),
            stored([9], None, list(range(16)), medium="CPU"),  # offloaded: not GPU memory
            removed([7], medium="CPU"),
        ),
        MODEL,
    )
    assert res.get("e:1") == 2
    # Blocks the index cannot key (block size 24) are still blocks the engine holds.
    applier.apply_batch("e:1", _batch(stored([4], None, list(range(24)), block_size=24)), MODEL)
    assert res.get("e:1") == 3
    applier.apply_batch(
        "e:1", _batch(stored([5], None, list(range(16))), Ev("AllBlocksCleared", {})), MODEL
    )
    assert res.get("e:1") == 0
    applier.apply_batch("e:1", _batch(stored([6], None, list(range(16)))), MODEL)
    assert res.get("e:1") == 1
    applier.forget("e:1")
    assert res.get("e:1") is None


def test_a_replay_re_applying_batches_counts_nothing_twice() -> None:
    applier = _applier()
    batch = _batch(stored([1, 2], None, list(range(32))))
    applier.apply_batch("e:1", batch, MODEL)
    applier.apply_batch("e:1", batch, MODEL, fresh=False)
    assert applier.residency.get("e:1") == 2


def test_bounded_by_engines() -> None:
    res = EngineResidency(max_engines=2)
    for i in range(5):
        res.add(f"e:{i}", 3, 0)
    assert [res.get(f"e:{i}") for i in range(5)] == [3, 3, None, None, None]
    res.add("e:0", 0, 10)  # more removals than stores seen (a stream joined late)
    assert res.get("e:0") == 0
    res.clear("e:3")  # a clear does not start tracking an engine past the bound
    assert res.get("e:3") is None


def test_off_unless_a_reader_asks() -> None:
    """Counting costs an index lookup per root event (a round trip on Redis): only the
    picker's in-process index, which reads it, turns it on."""
    applier = EventApplier(MemoryIndex())
    assert applier.residency is None
    applier.apply_batch("e:1", _batch(stored([1], None, list(range(16))), removed([1])), MODEL)


# A stream as an engine's block pool makes it: store blocks it does not hold, remove blocks it
# holds, now and then clear everything.
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("store"), st.integers(1, 4)),
        st.tuples(st.just("remove"), st.integers(1, 4)),
        st.tuples(st.just("clear"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(_ops, st.integers(1, 5))
def test_residency_equals_the_blocks_the_engine_holds(
    ops: list[tuple[str, int]], per_batch: int
) -> None:
    applier = _applier()
    held: list[int] = []
    next_hash = 1
    pending: list[Ev] = []
    for kind, n in ops:
        if kind == "store":
            hashes = list(range(next_hash, next_hash + n))
            next_hash += n
            pending.append(stored(hashes, None, list(range(16 * n))))
            held += hashes
        elif kind == "remove" and held:
            gone, held = held[:n], held[n:]
            pending.append(removed(gone))
        elif kind == "clear":
            pending.append(Ev("AllBlocksCleared", {}))
            held = []
        if len(pending) >= per_batch:
            applier.apply_batch("e:1", _batch(*pending), MODEL)
            pending = []
    if pending:
        applier.apply_batch("e:1", _batch(*pending), MODEL)
    assert (applier.residency.get("e:1") or 0) == len(held)


def test_hits_reported_again_from_the_root_are_not_new_blocks() -> None:
    """kv_cache_report_mode "full": vLLM reports a request's hits as a chain from block 0
    with no parent; the engine holds no more blocks than before. A block stored after a
    parent that was held is another physical copy (a block-aligned prompt's last block)."""
    applier = _applier()
    chain = stored([1, 2, 3], None, list(range(48)))
    applier.apply_batch("e:1", _batch(chain), MODEL)
    applier.apply_batch("e:1", _batch(chain), MODEL)  # the hits, reported again
    assert applier.residency.get("e:1") == 3
    applier.apply_batch("e:1", _batch(stored([3], 2, list(range(32, 48)))), MODEL)  # a copy
    assert applier.residency.get("e:1") == 4
