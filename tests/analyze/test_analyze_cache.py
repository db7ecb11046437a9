"""EngineKV invariants under random admit/commit/release sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtools.analyze.cache import EngineKV

ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 5), st.integers(0, 2)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(ops, st.integers(1, 12))
def test_pinned_blocks_are_never_evicted_and_capacity_holds(
    steps: list[tuple[bool, int, int, int]], capacity: int
) -> None:
    kv = EngineKV(capacity)
    running: list[tuple[tuple[int, ...], int]] = []
    for start, family, depth, extra in steps:
        if start or not running:
            keys = tuple(family * 10 + d for d in range(depth))
            hits = kv.cached_prefix(keys)
            if running and not kv.fits(keys, hits, extra):
                continue
            oversized = not running and not kv.fits(keys, hits, extra)
            evicted = kv.admit(keys, hits, extra)
            assert not set(evicted) & set(keys[:hits])  # the prefix was pinned first
            stored = kv.commit(keys, hits)
            assert all(hits <= p < len(keys) for p in stored)
            assert kv.cached_prefix(keys) == len(keys)
            running.append((keys, extra))
            if not oversized:
                assert kv.used() <= capacity
        else:
            keys, extra = running.pop(0)
            kv.release(keys, extra)
        pinned = {k for keys, _ in running for k in keys}
        for keys, _ in running:
            assert kv.cached_prefix(keys) == len(keys)  # running requests keep their blocks
        assert kv.cached_blocks >= len(pinned)
        if not running:
            assert kv.reserved == 0
            assert kv.used() <= capacity
            assert kv.usage() == 0.0
