"""NativeIndex (the C core) against MemoryIndex (the pure-Python reference): the same results
for every operation sequence, including eviction, plus the C core's input checking and a
leak check. The shared behaviour suite also runs over it (conftest.BACKENDS["native"], built by
make_index)."""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex.index import (
    Clear,
    IndexOp,
    MemoryIndex,
    MemoryIndexConfig,
    PrefixMatch,
    Remove,
    Store,
    StoredBlock,
    Tier,
)
from kvindex.index import memory as memory_module
from kvindex.index.factory import IndexConfig, make_index
from kvindex.index.native import NATIVE_AVAILABLE, NativeIndex

pytestmark = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="kvindex._native not built")

# 130 engines: holder masks wider than two 64-bit words.
ENGINES = [f"10.0.{i // 256}.{i % 256}:8000" for i in range(130)]

engine_hashes = st.one_of(
    st.integers(0, 12),
    st.integers(-4, -1),  # negative ints (Python hash()-style)
    st.integers(2**64 - 3, 2**64 - 1),  # same low bits as the negatives, as uint64
    st.sampled_from([2**64, 2**70 + 5, -(2**63) - 1]),  # outside 64 bits: digested
    st.binary(max_size=3),
    st.sampled_from([bytes(32), b"\x01" * 32]),  # sha256-sized digests
)
content_keys = st.one_of(st.integers(0, 14), st.just(2**64 - 1))
tiers = st.sampled_from(list(Tier))
engine_names = st.one_of(st.sampled_from(ENGINES[:4]), st.sampled_from(ENGINES))
stored_block = st.builds(
    StoredBlock, engine_hashes, st.lists(content_keys, min_size=1, max_size=4).map(tuple)
)
index_op = st.one_of(
    st.builds(Store, tiers, st.lists(stored_block, max_size=5), st.none() | st.integers(0, 5)),
    st.builds(Remove, tiers, st.lists(engine_hashes, max_size=5)),
    st.builds(Clear, st.one_of(st.none(), tiers)),
)
step = st.one_of(
    st.tuples(st.just("apply"), engine_names, st.lists(index_op, max_size=3)),
    st.tuples(st.just("purge"), engine_names, st.none()),
    st.tuples(st.just("age"), st.none(), st.none()),
    st.tuples(
        st.just("lookup"),
        st.lists(content_keys, max_size=10),
        st.one_of(st.none(), st.lists(engine_names, max_size=6)),
    ),
)


def assert_same(native: NativeIndex, memory: MemoryIndex, probe_hashes: list[Any]) -> None:
    n, m = native.stats(), memory.stats()
    assert (n.keys, n.entries, n.engines, n.evictions) == (
        m.keys,
        m.entries,
        m.engines,
        m.evictions,
    )
    assert native.engines() == memory.engines()
    for engine in memory.engines()[:8]:
        for h in probe_hashes:
            assert native.resolve(engine, h) == memory.resolve(engine, h)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(step, max_size=30),
    st.one_of(st.none(), st.integers(1, 12)),
    st.one_of(st.none(), st.integers(1, 20)),
    st.integers(1, 6),
)
def test_native_matches_memory_index(
    steps: list[tuple[str, Any, Any]],
    max_keys: int | None,
    max_entries: int | None,
    orphan_sweep: int,
) -> None:
    """Same answers op by op, including copy counts (Store.copies), the entry bound and the
    orphan sweeps after evictions (made to run often here)."""
    config = MemoryIndexConfig(max_keys=max_keys or 100_000_000, max_entries=max_entries)
    with mock.patch.object(memory_module, "_MIN_ORPHAN_SWEEP", orphan_sweep):
        native, memory = NativeIndex(config), MemoryIndex(config)
        _run_side_by_side(native, memory, steps)


def _run_side_by_side(
    native: NativeIndex, memory: MemoryIndex, steps: list[tuple[str, Any, Any]]
) -> None:
    seen_hashes: list[Any] = [0, -1, 2**64 - 1, b""]
    for kind, a, b in steps:
        if kind == "apply":
            ops: list[IndexOp] = b
            native.apply(a, ops)
            memory.apply(a, ops)
            for op in ops:
                if isinstance(op, Store):
                    seen_hashes.extend(block.engine_hash for block in op.blocks)
        elif kind == "purge":
            native.purge(a)
            memory.purge(a)
        elif kind == "age":
            native.age_copies()
            memory.age_copies()
        else:
            assert native.lookup(a, b) == memory.lookup(a, b)
        assert_same(native, memory, seen_hashes[-12:])
    # A full-prefix lookup over every key, all engines.
    everything = list(range(15))
    assert native.lookup(everything) == memory.lookup(everything)


def test_wide_masks_and_lower_tiers() -> None:
    """520 engines (nine mask words), each holding a prefix of its own length, some in CPU
    and storage: per-tier counts come from the bit-sliced counters."""
    native, memory = NativeIndex(), MemoryIndex()
    keys = list(range(1, 301))
    for i in range(520):
        engine = f"e{i}:1"
        length = 1 + i % 300
        tier = Tier(i % 3)
        for index in (native, memory):
            index.apply(
                engine, [Store(Tier.GPU, [StoredBlock(k, (k,)) for k in keys[: length // 2]])]
            )
            index.apply(engine, [Store(tier, [StoredBlock(-k, (k,)) for k in keys[:length]])])
    got = native.lookup(keys)
    assert got == memory.lookup(keys)
    assert got["e299:1"] == PrefixMatch(300, [150, 0, 150])  # 299 % 3 == 2: storage
    assert got["e4:1"] == PrefixMatch(5, [2, 3, 0])
    subset = [f"e{i}:1" for i in range(0, 520, 7)] + ["nobody:1"]
    assert native.lookup(keys, subset) == memory.lookup(keys, subset)


def test_eviction_bound_and_order() -> None:
    config = MemoryIndexConfig(max_keys=100, evict_fraction=0.1)
    native, memory = NativeIndex(config), MemoryIndex(config)
    for n in range(0, 1000, 10):
        blocks = [StoredBlock(h, (h,)) for h in range(n, n + 10)]
        for index in (native, memory):
            index.apply("e:1", [Store(Tier.GPU, blocks)])
            index.apply("e:1", [Store(Tier.GPU, [StoredBlock(0, (0,))])])  # keep key 0 young
    assert native.stats().keys <= 100
    assert native.stats().evictions == memory.stats().evictions > 0
    probe = [0, *range(900, 1000)]
    assert native.lookup([0]) == memory.lookup([0]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
    assert native.lookup(probe[1:]) == memory.lookup(probe[1:])


def test_memory_budget_caps_keys() -> None:
    index = NativeIndex(MemoryIndexConfig(memory_budget_bytes=60 * 1000))
    assert index.max_keys == 1000
    index.apply("e:1", [Store(Tier.GPU, [StoredBlock(h, (h,)) for h in range(5000)])])
    stats = index.stats()
    assert stats.keys <= 1000 and stats.evictions >= 4000
    assert stats.approx_bytes > 0


@pytest.mark.parametrize(
    ("op", "error"),
    [
        (Store(Tier.GPU, [StoredBlock(1, (-1,))]), OverflowError),
        (Store(Tier.GPU, [StoredBlock(1, (2**64,))]), OverflowError),
        (Store(Tier.GPU, [StoredBlock(1, ("k",))]), TypeError),  # type: ignore[arg-type]
        (Store(Tier.GPU, [StoredBlock("h", (1,))]), TypeError),  # type: ignore[arg-type]
        (Store(Tier.GPU, [StoredBlock(1, ())]), ValueError),
        (Store(Tier.GPU, [object()]), AttributeError),  # type: ignore[list-item]
        (Store(Tier.GPU, 5), TypeError),  # type: ignore[arg-type]
        (Remove(Tier.GPU, [1.5]), TypeError),  # type: ignore[list-item]
        (Remove(Tier.GPU, None), TypeError),  # type: ignore[arg-type]
    ],
)
def test_bad_input_raises_cleanly_and_changes_nothing(op: IndexOp, error: type) -> None:
    index = NativeIndex()
    good = StoredBlock(7, (70,))
    index.apply("e:1", [Store(Tier.GPU, [good])])
    with pytest.raises(error):
        if isinstance(op, Store) and isinstance(op.blocks, list):
            # the good block first: the whole op is rejected before anything is written
            index.apply("e:1", [Store(op.tier, [StoredBlock(8, (80,)), *op.blocks])])
        else:
            index.apply("e:1", [op])
    assert index.resolve("e:1", 8) is None
    assert index.lookup([70]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
    with pytest.raises(TypeError):
        index.lookup(["x"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        index.resolve("e:1", 1.0)  # type: ignore[arg-type]
    # keys outside uint64 cannot be held: the prefix stops there
    assert index.lookup([70, -1, 70]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
    assert index.lookup([2**64, 70]) == {}


def test_no_leak_over_repeated_churn() -> None:
    """Store, re-store, remove, clear and purge in a loop: C allocations (reported by
    stats().approx_bytes) and Python allocations (tracemalloc) stay flat."""
    index = NativeIndex(MemoryIndexConfig(max_keys=5000))

    def churn(round_: int) -> None:
        for e in range(20):
            engine = f"e{e}:1"
            blocks = [
                StoredBlock(b"%d-%d" % (e, h), (h, h + 1) if h % 3 else (h,)) for h in range(300)
            ]
            index.apply(engine, [Store(Tier(e % 3), blocks)])
            index.apply(engine, [Remove(Tier(e % 3), [b.engine_hash for b in blocks[::2]])])
            index.lookup(list(range(50)))
            if (e + round_) % 4 == 0:
                index.apply(engine, [Clear()])
            if (e + round_) % 5 == 0:
                index.purge(engine)

    for r in range(3):
        churn(r)
    gc.collect()
    tracemalloc.start()
    before_py = tracemalloc.get_traced_memory()[0]
    before_c = index.stats().approx_bytes
    for r in range(3, 13):
        churn(r)
    gc.collect()
    after_py = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after_py - before_py < 200_000
    assert index.stats().approx_bytes <= before_c * 1.5 + 100_000


def test_the_memory_backend_is_native() -> None:
    assert isinstance(make_index(IndexConfig(backend="memory")).inner, NativeIndex)


def test_without_the_extension_python_serves(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An install without a compiler has no kvindex._native: the factory falls back."""
    import kvindex.index.native as native_module

    monkeypatch.setattr(native_module, "_native", None)
    monkeypatch.setattr(native_module, "NATIVE_AVAILABLE", False)
    with caplog.at_level("WARNING", logger="kvindex.index"):
        index = make_index(IndexConfig(backend="native", max_keys=10)).inner
    assert type(index) is MemoryIndex
    assert "not built" in caplog.text
    with pytest.raises(RuntimeError, match="not built"):
        NativeIndex()


def test_block_like_objects_and_subclasses_read_correctly() -> None:
    """Store reads engine_hash/keys through cached slot offsets only for exactly the cached
    class; subclasses overriding a field, and duck-typed blocks, take attribute lookup."""

    class Shifted(StoredBlock):
        __slots__ = ("_given",)

        @property  # type: ignore[misc]
        def keys(self) -> tuple[int, ...]:
            return (999,)

        @keys.setter
        def keys(self, value: tuple[int, ...]) -> None:
            object.__setattr__(self, "_given", value)

    class Duck:
        def __init__(self, engine_hash: int, keys: tuple[int, ...]) -> None:
            self.engine_hash, self.keys = engine_hash, keys

    native, memory = NativeIndex(), MemoryIndex()
    ops: list[IndexOp] = [
        Store(Tier.GPU, [StoredBlock(1, (100,))]),  # warms the cache for StoredBlock
        Store(Tier.GPU, [Shifted(2, (200,))]),
        Store(Tier.GPU, [Duck(3, (300,)), StoredBlock(4, (400,))]),  # type: ignore[list-item]
    ]
    for index in (native, memory):
        index.apply("e:1", ops)
    for h in (1, 2, 3, 4):
        assert native.resolve("e:1", h) == memory.resolve("e:1", h)
    assert native.resolve("e:1", 2) == 999


_junk = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.just(object()),
    st.lists(st.one_of(st.none(), st.integers(-3, 2**64 + 1), st.binary(max_size=2)), max_size=4),
    st.lists(
        st.builds(
            StoredBlock,
            st.one_of(st.integers(-3, 3), st.binary(max_size=2), st.none()),
            st.one_of(
                st.lists(st.integers(-1, 2**64), max_size=3).map(tuple), st.none(), st.just(7)
            ),
        ),
        max_size=3,
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["store", "remove", "clear", "resolve", "lookup"]), st.lists(_junk, max_size=4)
)
def test_core_survives_any_arguments(method: str, args: list[Any]) -> None:
    """Direct calls into the C core with arbitrary arguments raise ordinary exceptions (or
    succeed); the index stays usable and consistent afterwards."""
    from kvindex import _native

    core = _native.Core(100, 90)
    core.store(0, 0, [StoredBlock(1, (10,)), StoredBlock(2, (11, 12))])
    core.store(3, 1, [StoredBlock(b"x", (10,))])

    def state() -> tuple[object, ...]:
        return (
            core.stats(),
            core.lookup([10, 11, 12], None),
            core.resolve(0, 1),
            core.resolve(0, 2),
            core.resolve(3, b"x"),
            core.slots_with_blocks(),
        )

    before = state()
    try:
        getattr(core, method)(*args)
    except (TypeError, ValueError, OverflowError, AttributeError):
        assert state() == before  # a rejected call changes nothing
    for slot, blocks, gpu, cpu, storage in core.lookup([10, 11, 12], None):
        assert blocks == gpu + cpu + storage >= 1 and slot >= 0
    for fn, fargs in (
        (_native.chain_keys, args[:3]),
        (_native.stored_blocks, [StoredBlock, *args[:4]]),
        (_native.xxh3_64, args[:2]),
    ):
        with contextlib.suppress(TypeError, ValueError, OverflowError, AttributeError):
            fn(*fargs)
