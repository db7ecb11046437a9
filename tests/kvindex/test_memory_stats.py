"""MemoryIndex.stats() keeps its entry count incrementally (it is read at every metrics scrape
under the service's index lock); it must equal a brute-force count after any operations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex.index import Clear, MemoryIndex, MemoryIndexConfig, Remove, Store, StoredBlock, Tier

ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "remove", "clear", "purge"]),
        st.integers(0, 3),  # engine
        st.sampled_from(list(Tier)),
        st.lists(st.integers(0, 12), min_size=1, max_size=4),  # engine hashes
        st.integers(0, 5),  # key offset
    ),
    max_size=40,
)


def brute_entries(index: MemoryIndex) -> int:
    return sum(m.bit_count() for holders in index._holders for m in holders.values())


def brute_keys(index: MemoryIndex) -> int:
    keys: set[int] = set()
    for holders in index._holders:
        keys.update(holders)
    return len(keys)


@settings(max_examples=300)
@given(ops, st.integers(5, 60))
def test_incremental_stats_match_brute_force(plan: list, max_keys: int) -> None:  # type: ignore[type-arg]
    index = MemoryIndex(MemoryIndexConfig(max_keys=max_keys))
    for kind, engine, tier, hashes, offset in plan:
        name = f"e{engine}"
        if kind == "store":
            blocks = [StoredBlock(h, (h + offset, h + offset + 100)[: 1 + h % 2]) for h in hashes]
            index.apply(name, [Store(tier, blocks)])
        elif kind == "remove":
            index.apply(name, [Remove(tier, hashes)])
        elif kind == "clear":
            index.apply(name, [Clear(tier if offset % 2 else None)])
        else:
            index.purge(name)
        stats = index.stats()
        assert stats.entries == brute_entries(index)
        assert stats.keys == brute_keys(index)
