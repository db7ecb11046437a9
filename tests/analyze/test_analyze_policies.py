"""Hand-made traces with known answers for every policy, and invariants of the simulation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtools.analyze.config import PickerSetup
from kvtools.analyze.model import Trace, TraceRequest
from kvtools.analyze.policies import POLICY_NAMES
from kvtools.analyze.readers import mooncake_keys
from kvtools.analyze.simulation import SimSettings, simulate

BT = 16  # tokens per block in the hand-made traces (the approximate scorer's block size)
GAP_MS = 100_000.0  # far apart: every request has finished before the next arrives


def request(arrival_ms: float, ids: list[int], output: int, input_tokens: int = 0) -> TraceRequest:
    """A Mooncake-style request over block ids (keys chained as the reader does)."""
    keys = tuple(mooncake_keys(ids))
    return TraceRequest(
        arrival_ms, input_tokens or len(ids) * BT, output, keys, tuple(ids), "mooncake"
    )


def trace_of(id_lists: list[list[int]], gap_ms: float = GAP_MS, output: int = 2) -> Trace:
    return Trace(
        "hand-made",
        "mooncake",
        BT,
        requests=[request(i * gap_ms, ids, output) for i, ids in enumerate(id_lists)],
    )


def run(trace: Trace, policy: str, **kw: object) -> list[int]:
    """Per-window hit counts are not exposed; the totals are what the tests check."""
    result = simulate(trace, policy, SimSettings(**kw))  # type: ignore[arg-type]
    return [result.hit_blocks, result.total_blocks]


X = [1, 2]  # family X prefix
Y = [11, 12]  # family Y prefix
# X, Y, X, Y, X, Y, each with a unique third block.
ALTERNATING = [[*X, 101], [*Y, 102], [*X, 103], [*Y, 104], [*X, 105], [*Y, 106]]


@pytest.mark.parametrize(
    "policy", ["round-robin", "approximate-prefix", "precise-prefix", "oracle"]
)
def test_two_families_two_engines(policy: str) -> None:
    # Round-robin keeps each family on one engine; prefix policies follow the prefix; the
    # oracle shares everything: first X and first Y miss, the other four hit 2 blocks each.
    assert run(trace_of(ALTERNATING), policy, engines=2, capacity_blocks=100) == [8, 18]


def per_engine_hits(key_lists: list[list[int]], choices: list[int]) -> int:
    """Hits with unbounded per-engine caches when request i goes to engine choices[i]."""
    caches: dict[int, set[int]] = {}
    hits = 0
    for keys, engine in zip(key_lists, choices, strict=True):
        cache = caches.setdefault(engine, set())
        for key in keys:
            if key not in cache:
                break
            hits += 1
        cache.update(keys)
    return hits


def test_random_routes_as_its_seeded_rng_says() -> None:
    rng = random.Random(7)
    choices = [rng.randrange(3) for _ in ALTERNATING]
    expected = per_engine_hits(ALTERNATING, choices)
    assert run(trace_of(ALTERNATING), "random", engines=3, capacity_blocks=100, seed=7) == [
        expected,
        18,
    ]


def test_least_loaded_on_an_idle_cluster_breaks_ties_at_random() -> None:
    rng = random.Random(3)
    choices = [rng.choice([0, 1, 2]) for _ in ALTERNATING]
    expected = per_engine_hits(ALTERNATING, choices)
    got = run(trace_of(ALTERNATING), "least-loaded", engines=3, capacity_blocks=100, seed=3)
    assert got == [expected, 18]


def test_least_loaded_avoids_the_busy_engine() -> None:
    # The first request decodes for a long time; the second arrives while it runs and must
    # go to the other engine, so it cannot reuse the shared prefix.
    trace = Trace(
        "hand-made",
        "mooncake",
        BT,
        requests=[request(0.0, [1, 2], 100_000), request(1000.0, [1, 2], 1)],
    )
    assert run(trace, "least-loaded", engines=2, capacity_blocks=100) == [0, 4]
    assert run(trace, "precise-prefix", engines=2, capacity_blocks=100, event_delay_ms=0) == [
        2,
        4,
    ]


def test_lru_evicts_the_tail_of_a_released_prompt_first() -> None:
    # One engine of 4 blocks: [1,2,3] is released tail first, so making room for [4,5]
    # (2 blocks, 1 free) evicts block 3; [1,2,3] then hits 2.
    keys = [[1, 2, 3], [4, 5], [1, 2, 3]]
    for policy in ("random", "round-robin", "least-loaded", "approximate-prefix", "precise-prefix"):
        assert run(trace_of(keys, output=0), policy, engines=1, capacity_blocks=4) == [2, 8]
    assert run(trace_of(keys, output=0), "oracle", engines=1, capacity_blocks=4) == [3, 8]
    # With room for everything the third request hits all three blocks.
    assert run(trace_of(keys, output=0), "precise-prefix", engines=1, capacity_blocks=8) == [
        3,
        8,
    ]


def test_precise_without_events_yet_cannot_see_the_prefix() -> None:
    # The follow-up arrives before the first request's store events reach the index: its
    # prefix score is 0 on both engines; with the prefix weight alone, it ties (random).
    trace = trace_of([[*X, 101], [*X, 102]], gap_ms=10_000)
    weights = PickerSetup().with_weight("queue", 0).with_weight("kv", 0).with_weight("prefix", 1)
    seen = set()
    for seed in range(12):
        hits, _ = run(
            trace,
            "precise-prefix",
            engines=2,
            capacity_blocks=100,
            seed=seed,
            event_delay_ms=1e9,
            picker=weights,
        )
        seen.add(hits)
    assert seen == {0, 2}  # sometimes lucky, sometimes not
    hits, _ = run(
        trace, "precise-prefix", engines=2, capacity_blocks=100, event_delay_ms=0, picker=weights
    )
    assert hits == 2


def test_approximate_prefix_forgets_beyond_its_lru() -> None:
    # lruCapacityPerServer is in the scorer's 16-token blocks: 8 of the trace's blocks.
    config = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters: {lruCapacityPerServer: 8}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 1}
"""
    weights = PickerSetup(config, "lru-8")
    filler = [[200 + 10 * i + j for j in range(3)] for i in range(3)]  # 9 unique blocks
    keys = [[*X, 101], *filler, [*X, 102]]
    result = simulate(
        trace_of(keys),
        "approximate-prefix",
        SimSettings(engines=1, capacity_blocks=100, picker=weights),
    )
    assert result.hit_blocks == 2  # one engine: the cache still has X, routing is moot
    # With two engines the history of X is gone by the time it returns: all ties.
    seen = set()
    for seed in range(12):
        r = simulate(
            trace_of(keys),
            "approximate-prefix",
            SimSettings(engines=2, capacity_blocks=100, picker=weights, seed=seed),
        )
        seen.add(r.hit_blocks)
    assert 0 in seen


def test_ttft_and_queueing_follow_the_cost_model() -> None:
    # One engine, two requests at t=0: the second waits for the first prefill.
    trace = Trace(
        "hand-made",
        "mooncake",
        BT,
        requests=[request(0.0, [1, 2], 0), request(0.0, [3, 4], 0)],
    )
    result = simulate(trace, "round-robin", SimSettings(engines=1, capacity_blocks=100))
    prefill = 15.0 + 2 * BT * 0.05
    assert result.ttft_samples == pytest.approx([prefill, 2 * prefill])
    assert result.queue_ms.mean == pytest.approx(prefill / 2)


requests_strategy = st.lists(
    st.tuples(
        st.integers(0, 5_000),  # arrival gap ms
        st.integers(0, 3),  # family
        st.integers(0, 6),  # prefix length taken from the family
        st.integers(0, 3),  # unique tail blocks
        st.integers(0, 400),  # output tokens
    ),
    min_size=1,
    max_size=40,
)


def generated_trace(rows: list[tuple[int, int, int, int, int]]) -> Trace:
    """A trace from requests_strategy rows (gap, family, depth, tail, output): `depth` blocks
    of the family's shared prefix, then `tail` blocks no other request has."""
    t = 0.0
    reqs = []
    unique = 10_000
    for gap, family, depth, tail, output in rows:
        t += gap
        ids = [family * 100 + d for d in range(depth)] + list(range(unique, unique + tail))
        unique += tail
        reqs.append(request(t, ids, output))
    return Trace("generated", "mooncake", BT, requests=reqs)


@settings(max_examples=40, deadline=None)
@given(requests_strategy, st.integers(1, 4), st.integers(2, 30), st.integers(0, 3))
def test_no_policy_beats_the_oracle_per_trace(
    rows: list[tuple[int, int, int, int, int]], engines: int, capacity: int, seed: int
) -> None:
    trace = generated_trace(rows)
    base = SimSettings(engines=engines, capacity_blocks=capacity, seed=seed)
    oracle = simulate(trace, "oracle", base)
    for policy in POLICY_NAMES:
        result = simulate(trace, policy, base)
        assert result.hit_blocks <= oracle.hit_blocks
        assert sum(e.requests for e in result.engines) == len(rows)
        assert len(result.ttft_samples) == len(rows)
        assert all(x >= 0 for x in result.ttft_samples)


@settings(max_examples=25, deadline=None)
@given(requests_strategy, st.integers(1, 4), st.integers(2, 30), st.sampled_from([0.0, 30.0]))
def test_wire_ingest_decides_exactly_like_direct_ops(
    rows: list[tuple[int, int, int, int, int]], engines: int, capacity: int, delay: float
) -> None:
    # vLLM-encoded events through decode_batch + EventApplier must leave the index exactly
    # as Store/Remove ops would: same routing, same hits, nothing skipped.
    trace = generated_trace(rows)
    results = [
        simulate(
            trace,
            "precise-prefix",
            SimSettings(
                engines=engines, capacity_blocks=capacity, event_delay_ms=delay, precise_ingest=mode
            ),
        )
        for mode in ("wire", "ops")
    ]
    wire, ops = results
    assert wire.hit_blocks == ops.hit_blocks
    assert [e.requests for e in wire.engines] == [e.requests for e in ops.engines]
    assert wire.ttft_samples == ops.ttft_samples
    assert wire.index_keys == ops.index_keys
    assert wire.ingest_skipped == {}


@settings(max_examples=15, deadline=None)
@given(requests_strategy, st.integers(2, 4), st.integers(0, 3))
def test_approximate_scorer_at_trace_block_size_decides_as_at_its_own(
    rows: list[tuple[int, int, int, int, int]], engines: int, seed: int
) -> None:
    # The analysis runs the approximate scorer at the trace's block size (64 tokens here,
    # 4x its own 16) with its LRU scaled to the same tokens: the same routing as hashing
    # every 16-token block.
    from kvtools.analyze import config as analyze_config

    trace = generated_trace(rows)
    trace = Trace(
        trace.source,
        trace.format,
        64,
        requests=[
            TraceRequest(r.arrival_ms, len(r.keys) * 64, r.output_tokens, r.keys, r.tokens, r.model)
            for r in trace.requests
        ],
    )
    base = SimSettings(engines=engines, capacity_blocks=50, seed=seed)
    coarse = simulate(trace, "approximate-prefix", base)
    original = analyze_config._coarsen_approximate
    analyze_config._coarsen_approximate = lambda *args: None  # type: ignore[assignment]
    try:
        fine = simulate(trace, "approximate-prefix", base)
    finally:
        analyze_config._coarsen_approximate = original
    assert [e.requests for e in coarse.engines] == [e.requests for e in fine.engines]
    assert coarse.hit_blocks == fine.hit_blocks
    assert coarse.ttft_samples == fine.ttft_samples
