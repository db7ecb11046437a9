"""One behaviour suite for every index backend (see conftest.BACKENDS)."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex.index import BlockIndex, Clear, PrefixMatch, Remove, Store, StoredBlock, Tier

IndexFactory = Callable[[], BlockIndex]

GPU, CPU, STORAGE = Tier.GPU, Tier.CPU, Tier.STORAGE


def blocks(*pairs: tuple[int, int]) -> list[StoredBlock]:
    return [StoredBlock(h, (k,)) for h, k in pairs]


def test_store_lookup_remove(index_factory: IndexFactory) -> None:
    index = index_factory()
    index.apply("e1:80", [Store(GPU, blocks((1, 100), (2, 101), (3, 102)))])
    index.apply("e2:80", [Store(GPU, blocks((9, 100)))])
    assert index.lookup([100, 101, 102, 103]) == {
        "e1:80": PrefixMatch(3, [3, 0, 0]),
        "e2:80": PrefixMatch(1, [1, 0, 0]),
    }
    index.apply("e1:80", [Remove(GPU, [2])])
    assert index.lookup([100, 101, 102])["e1:80"].blocks == 1
    assert index.resolve("e1:80", 3) == 102 and index.resolve("e1:80", 2) is None
    assert index.engines() == ["e1:80", "e2:80"]


def test_prefix_must_start_at_first_block(index_factory: IndexFactory) -> None:
    index = index_factory()
    index.apply("e:1", [Store(GPU, blocks((2, 101), (3, 102)))])
    assert index.lookup([100, 101, 102]) == {}
    assert index.lookup([]) == {}


def test_idempotent_stores_and_removes(index_factory: IndexFactory) -> None:
    index = index_factory()
    for _ in range(3):  # vLLM re-announces hits
        index.apply("e:1", [Store(GPU, blocks((1, 100), (2, 101)))])
    index.apply("e:1", [Remove(GPU, [2]), Remove(GPU, [2]), Remove(GPU, [77])])
    assert index.lookup([100, 101]) == {"e:1": PrefixMatch(1, [1, 0, 0])}
    assert index.stats().entries == 1


def test_tiers_count_at_best(index_factory: IndexFactory) -> None:
    index = index_factory()
    index.apply("e:1", [Store(GPU, blocks((1, 100))), Store(CPU, blocks((1, 100), (2, 101)))])
    index.apply("e:1", [Store(STORAGE, blocks((3, 102)))])
    match = index.lookup([100, 101, 102])["e:1"]
    assert match == PrefixMatch(3, [1, 1, 1])
    assert match.weighted([1.0, 0.8, 0.5]) == 2.3
    index.apply("e:1", [Remove(CPU, [2])])  # removal is per tier
    assert index.lookup([100, 101, 102])["e:1"].blocks == 1


def test_candidates_filter(index_factory: IndexFactory) -> None:
    index = index_factory()
    for e in ("a:1", "b:1", "c:1"):
        index.apply(e, [Store(GPU, blocks((1, 100)))])
    assert set(index.lookup([100], ["a:1", "c:1", "zz:1"])) == {"a:1", "c:1"}
    assert index.lookup([100], []) == {}


def test_clear_and_purge(index_factory: IndexFactory) -> None:
    index = index_factory()
    index.apply("a:1", [Store(GPU, blocks((1, 100))), Store(CPU, blocks((2, 101)))])
    index.apply("b:1", [Store(GPU, blocks((1, 100)))])
    index.apply("a:1", [Clear(CPU)])
    assert index.resolve("a:1", 2) is None and index.resolve("a:1", 1) == 100
    index.apply("a:1", [Clear()])
    assert set(index.lookup([100])) == {"b:1"}
    index.purge("b:1")
    assert index.lookup([100]) == {} and index.engines() == []
    index.apply("c:1", [Store(GPU, blocks((1, 100)))])  # a freed slot is reused cleanly
    assert set(index.lookup([100])) == {"c:1"}


def test_multi_key_engine_blocks(index_factory: IndexFactory) -> None:
    index = index_factory()
    index.apply("e:1", [Store(GPU, [StoredBlock(1, (100, 101)), StoredBlock(2, (102, 103))])])
    assert index.lookup([100, 101, 102, 103])["e:1"].blocks == 4
    assert index.resolve("e:1", 1) == 101
    index.apply("e:1", [Remove(GPU, [2])])
    assert index.lookup([100, 101, 102, 103])["e:1"].blocks == 2


# -- against a reference model -------------------------------------------------------------

ENGINES = ["a:1", "b:1", "c:1"]
_op = st.one_of(
    st.tuples(
        st.just("store"),
        st.sampled_from(ENGINES),
        st.sampled_from(list(Tier)),
        st.lists(st.integers(0, 12), min_size=1, max_size=5),
    ),
    st.tuples(
        st.just("remove"),
        st.sampled_from(ENGINES),
        st.sampled_from(list(Tier)),
        st.lists(st.integers(0, 12), max_size=5),
    ),
    st.tuples(
        st.just("clear"), st.sampled_from(ENGINES), st.sampled_from([*Tier, None]), st.just([])
    ),
    st.tuples(st.just("purge"), st.sampled_from(ENGINES), st.none(), st.just([])),
)


def _key(engine_hash: int) -> int:
    # Engine hash h always denotes content key 1000 + h // 2 (two hashes share one key).
    return 1000 + engine_hash // 2


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_op, max_size=40), st.lists(st.integers(0, 6), max_size=6))
def test_matches_reference_model(
    index_factory: IndexFactory,
    ops: list[tuple[str, str, Tier | None, list[int]]],
    probe: list[int],
) -> None:
    index = index_factory()
    # Reference: per (engine, tier) the hash -> key map and the set of keys held. Removing a
    # hash drops its key for that engine and tier (set semantics, even if another hash of the
    # same engine names the same key).
    maps: dict[tuple[str, Tier], dict[int, int]] = {}
    held: dict[tuple[str, Tier], set[int]] = {}
    for kind, engine, tier, hashes in ops:
        tiers = list(Tier) if tier is None else [tier]
        if kind == "store":
            assert tier is not None
            index.apply(engine, [Store(tier, blocks(*[(h, _key(h)) for h in hashes]))])
            for h in hashes:
                maps.setdefault((engine, tier), {})[h] = _key(h)
                held.setdefault((engine, tier), set()).add(_key(h))
        elif kind == "remove":
            assert tier is not None
            index.apply(engine, [Remove(tier, hashes)])
            for h in hashes:
                k = maps.get((engine, tier), {}).pop(h, None)
                if k is not None:
                    held[(engine, tier)].discard(k)
        else:
            if kind == "clear":
                index.apply(engine, [Clear(tier)])
            else:
                index.purge(engine)
            for t in tiers:
                maps.pop((engine, t), None)
                held.pop((engine, t), None)
    keys = [1000 + p for p in probe]
    expected: dict[str, PrefixMatch] = {}
    for engine in ENGINES:
        by_tier = [0, 0, 0]
        for k in keys:
            in_tiers = [t for t in Tier if k in held.get((engine, t), set())]
            if not in_tiers:
                break
            by_tier[min(in_tiers)] += 1
        if sum(by_tier):
            expected[engine] = PrefixMatch(sum(by_tier), by_tier)
    assert index.lookup(keys) == expected
    for engine in ENGINES:
        for h in range(13):
            in_any = any(h in maps.get((engine, t), {}) for t in Tier)
            assert (index.resolve(engine, h) is not None) == in_any
    assert index.engines() == sorted({e for (e, _), m in maps.items() if m})


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.integers(0, 69), st.sampled_from(list(Tier)), st.integers(0, 9)),
        max_size=300,
    )
)
def test_tier_counts_over_many_engines(
    index_factory: IndexFactory, holdings: list[tuple[int, Tier, int]]
) -> None:
    # Engine e holds key 2000 + k in tier t; counts per best tier must match brute force
    # with many engines at once (wide masks, counts up to 10 per tier).
    index = index_factory()
    held: dict[int, dict[int, set[Tier]]] = {}
    for engine, tier, k in holdings:
        index.apply(f"e{engine}:1", [Store(tier, blocks((k, 2000 + k)))])
        held.setdefault(engine, {}).setdefault(k, set()).add(tier)
    keys = [2000 + k for k in range(10)]
    expected: dict[str, PrefixMatch] = {}
    for engine, by_key in held.items():
        by_tier = [0, 0, 0]
        for k in range(10):
            if k not in by_key:
                break
            by_tier[min(by_key[k])] += 1
        if sum(by_tier):
            expected[f"e{engine}:1"] = PrefixMatch(sum(by_tier), by_tier)
    assert index.lookup(keys) == expected
