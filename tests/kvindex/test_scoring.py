from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from score_fixtures import store_prompt

from kvindex.engine_blocks import EngineBlockSizes, reusable_blocks
from kvindex.index import MemoryIndex, Remove, Tier
from kvindex.scoring import (
    EngineScore,
    InvalidPromptError,
    PromptTooLongError,
    Scorer,
    ScoringConfig,
    TierWeights,
    prompt_keys,
)
from kvindex.speculative import SpeculativeConfig, SpeculativeIndex

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT = list(range(1000, 1000 + 160))  # 10 blocks
# PROMPT and one token more: vLLM recomputes the block of a prompt's last token, so a query
# must go past PROMPT's blocks for all 10 to count (test_last_token_block_is_left_out).
QUERY = [*PROMPT, 7]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_prefix_match_per_engine_sorted_best_first() -> None:
    index = MemoryIndex()
    store_prompt(index, "10.0.0.1:8000", MODEL, PROMPT[:64])  # 4 blocks
    store_prompt(index, "10.0.0.2:8000", MODEL, PROMPT)  # 10 blocks
    store_prompt(index, "10.0.0.3:8000", MODEL, [7] * 64)  # another prompt
    result = Scorer(index).score_tokens(MODEL, [*PROMPT, 1, 2, 3])  # trailing partial block
    assert result.total_blocks == 10
    assert result.block_size == 16
    assert [(s.engine, s.matched_blocks) for s in result.scores] == [
        ("10.0.0.2:8000", 10),
        ("10.0.0.1:8000", 4),
    ]
    assert result.scores[0].score == 1.0
    assert result.scores[1].score == pytest.approx(0.4)
    assert result.best() is result.scores[0]


def test_candidates_listed_with_zero_and_deterministic_ties() -> None:
    index = MemoryIndex()
    for engine in ("b:1", "a:1"):
        store_prompt(index, engine, MODEL, PROMPT[:32])
    result = Scorer(index).score_tokens(MODEL, PROMPT, engines=["z:1", "b:1", "a:1", "c:1"])
    assert [(s.engine, s.matched_blocks) for s in result.scores] == [
        ("a:1", 2),
        ("b:1", 2),
        ("c:1", 0),
        ("z:1", 0),
    ]
    assert result.scores[-1].score == 0.0


def test_tier_weights() -> None:
    index = MemoryIndex()
    store_prompt(index, "gpu:1", MODEL, PROMPT)
    store_prompt(index, "cpu:1", MODEL, PROMPT, medium="CPU")
    store_prompt(index, "disk:1", MODEL, PROMPT, medium="STORAGE")
    scorer = Scorer(index, ScoringConfig(weights=TierWeights(gpu=1.0, cpu=0.8, storage=0.25)))
    by_engine = {s.engine: s for s in scorer.score_tokens(MODEL, QUERY).scores}
    assert by_engine["gpu:1"].score == 1.0
    assert by_engine["cpu:1"].score == pytest.approx(0.8)
    assert by_engine["disk:1"].score == pytest.approx(0.25)
    assert by_engine["cpu:1"].by_tier == (0, 10, 0)
    assert all(s.matched_blocks == 10 for s in by_engine.values())


def test_lora_and_salt_root_the_chain() -> None:
    index = MemoryIndex()
    store_prompt(index, "lora:1", MODEL, PROMPT, lora="sql-adapter")
    store_prompt(index, "salt:1", MODEL, PROMPT, salt="tenant-a")
    store_prompt(index, "both:1", MODEL, PROMPT, lora="sql-adapter", salt="tenant-a")
    scorer = Scorer(index)

    def engines(**kw: str) -> list[str]:
        return [s.engine for s in scorer.score_tokens(MODEL, PROMPT, **kw).scores]

    assert engines() == []
    assert engines(lora="sql-adapter") == ["lora:1"]
    assert engines(cache_salt="tenant-a") == ["salt:1"]
    assert engines(cache_salt="tenant-b") == []
    assert engines(lora="sql-adapter", cache_salt="tenant-a") == ["both:1"]


def test_removed_block_cuts_the_match() -> None:
    index = MemoryIndex()
    hashes = store_prompt(index, "e:1", MODEL, PROMPT)
    index.apply("e:1", [Remove(Tier.GPU, [hashes[3]])])
    assert Scorer(index).score_tokens(MODEL, PROMPT).scores[0].matched_blocks == 3


def test_empty_and_short_prompts() -> None:
    index = MemoryIndex()
    store_prompt(index, "e:1", MODEL, PROMPT)
    scorer = Scorer(index)
    assert scorer.score_tokens(MODEL, []).scores == ()
    result = scorer.score_tokens(MODEL, PROMPT[:15], engines=["e:1"])
    assert result.total_blocks == 0
    assert [(s.engine, s.score) for s in result.scores] == [("e:1", 0.0)]


def test_errors() -> None:
    scorer = Scorer(MemoryIndex(), ScoringConfig(max_prompt_tokens=100))
    with pytest.raises(PromptTooLongError, match="101 tokens"):
        scorer.score_tokens(MODEL, [1] * 101)
    with pytest.raises(InvalidPromptError):
        scorer.score_tokens(MODEL, [-1] * 16)
    with pytest.raises(InvalidPromptError):
        scorer.score_tokens(MODEL, [1 << 32] * 16)
    with pytest.raises(ValueError, match="tier weight"):
        TierWeights(cpu=2.0)


def test_speculative_extends_real_match_and_expires() -> None:
    index = MemoryIndex()
    clock = FakeClock()
    spec = SpeculativeIndex(SpeculativeConfig(ttl_s=2.0, weight=0.5), clock)
    scorer = Scorer(index, speculative=spec)
    store_prompt(index, "real:1", MODEL, PROMPT[:48])  # 3 real blocks
    # Recorded past the real match only: a twin of a held block would outlive its eviction.
    assert scorer.record_speculative("real:1", MODEL, PROMPT) == 7
    assert scorer.record_speculative("new:1", MODEL, PROMPT[:80]) == 5
    by_engine = {s.engine: s for s in scorer.score_tokens(MODEL, QUERY).scores}
    assert by_engine["real:1"].matched_blocks == 10
    assert by_engine["real:1"].speculative_blocks == 7
    assert by_engine["real:1"].weighted == pytest.approx(3 + 7 * 0.5)
    assert by_engine["new:1"].matched_blocks == 5
    assert by_engine["new:1"].by_tier == (0, 0, 0)
    assert len(spec) == 7 + 5
    clock.now += 2.0
    by_engine = {s.engine: s for s in scorer.score_tokens(MODEL, QUERY).scores}
    assert set(by_engine) == {"real:1"}
    assert by_engine["real:1"].matched_blocks == 3


def test_speculative_respects_candidates() -> None:
    spec = SpeculativeIndex(clock=FakeClock())
    scorer = Scorer(MemoryIndex(), speculative=spec)
    scorer.record_speculative("a:1", MODEL, PROMPT)
    result = scorer.score_tokens(MODEL, PROMPT, engines=["b:1"])
    assert [(s.engine, s.matched_blocks) for s in result.scores] == [("b:1", 0)]


def test_record_without_speculative_index_is_zero() -> None:
    assert Scorer(MemoryIndex()).record_speculative("a:1", MODEL, PROMPT) == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 12), min_size=1, max_size=6),
    st.integers(0, 200),
)
def test_scores_bounded_and_prefix_consistent(stored_blocks: list[int], extra: int) -> None:
    """Each engine stores a prefix of the prompt; its match is exactly that prefix (capped at
    the prompt) and scores stay in [0, 1], sorted."""
    index = MemoryIndex()
    tokens = list(range(12 * 16 + extra))
    for i, n in enumerate(stored_blocks):
        if n:
            store_prompt(index, f"10.0.0.{i}:80", MODEL, tokens[: n * 16])
    result = Scorer(index).score_tokens(MODEL, tokens)
    total = len(tokens) // 16
    assert result.total_blocks == total
    got = {s.engine: s.matched_blocks for s in result.scores}
    reusable = (len(tokens) - 1) // 16  # never the block of the last token
    want = {f"10.0.0.{i}:80": min(n, reusable) for i, n in enumerate(stored_blocks) if n}
    want = {engine: n for engine, n in want.items() if n}
    assert got == want
    assert all(0.0 <= s.score <= 1.0 for s in result.scores)
    assert [s.score for s in result.scores] == sorted(
        (s.score for s in result.scores), reverse=True
    )


def test_prompt_keys_match_chain_from_events() -> None:
    index = MemoryIndex()
    store_prompt(index, "e:1", MODEL, PROMPT, salt="s")
    keys = prompt_keys(MODEL, PROMPT, cache_salt="s")
    assert index.lookup(keys)["e:1"].blocks == 10


def test_scoring_over_every_backend(index_factory: Any) -> None:
    """The scorer needs only the BlockIndex contract: same answers on every backend."""
    index = index_factory()
    store_prompt(index, "10.0.0.1:8000", MODEL, PROMPT[:64], medium="CPU")
    store_prompt(index, "10.0.0.2:8000", MODEL, PROMPT, lora="sql-adapter", salt="s")
    store_prompt(index, "10.0.0.3:8000", MODEL, PROMPT)
    scorer = Scorer(index)
    result = scorer.score_tokens(MODEL, QUERY, engines=["10.0.0.1:8000", "10.0.0.3:8000"])
    assert [(s.engine, s.matched_blocks, s.by_tier) for s in result.scores] == [
        ("10.0.0.3:8000", 10, (10, 0, 0)),
        ("10.0.0.1:8000", 4, (0, 4, 0)),
    ]
    salted = scorer.score_tokens(MODEL, QUERY, lora="sql-adapter", cache_salt="s")
    assert [(s.engine, s.matched_blocks) for s in salted.scores] == [("10.0.0.2:8000", 10)]


@settings(max_examples=80, deadline=None)
@given(
    stored=st.lists(
        st.tuples(st.integers(0, 6), st.sampled_from(["GPU", "CPU", "STORAGE"])), max_size=6
    ),
    speculative=st.lists(st.integers(0, 6), max_size=6),
    candidates=st.one_of(st.none(), st.sets(st.integers(0, 9), max_size=10)),
)
def test_scores_ordered_and_complete_over_candidates(
    stored: list[tuple[int, str]], speculative: list[int], candidates: set[int] | None
) -> None:
    """Every engine with a match, and every candidate, appears exactly once, sorted by score,
    then matched blocks (both descending), then name; candidates without a match score 0."""
    index = MemoryIndex()
    spec = SpeculativeIndex(SpeculativeConfig(ttl_s=60.0, weight=0.5), FakeClock())
    scorer = Scorer(index, speculative=spec)
    tokens = list(range(6 * 16))
    for i, (n, medium) in enumerate(stored):
        if n:
            store_prompt(index, f"e{i}:1", MODEL, tokens[: n * 16], medium=medium)
    for i, n in enumerate(speculative):
        if n:
            scorer.record_speculative(f"e{i}:1", MODEL, tokens[: n * 16])
    engines = None if candidates is None else [f"e{i}:1" for i in sorted(candidates)]
    for _ in range(2):  # the second call reuses the cached zero scores
        scores = scorer.score_tokens(MODEL, tokens, engines=engines).scores
        names = [s.engine for s in scores]
        assert len(names) == len(set(names))
        if engines is not None:
            assert set(names) == set(engines)
        assert list(scores) == sorted(scores, key=lambda s: (-s.score, -s.matched_blocks, s.engine))
        for s in scores:
            if not s.matched_blocks:
                assert s == EngineScore(s.engine, 0, 0.0, 0.0)


def test_last_token_block_is_left_out() -> None:
    """vLLM computes at least the prompt's last token, so the block holding it is never
    reused: a prompt of exactly k cached blocks scores k - 1."""
    index = MemoryIndex()
    store_prompt(index, "e:1", MODEL, PROMPT)
    scorer = Scorer(index)
    (aligned,) = scorer.score_tokens(MODEL, PROMPT).scores
    assert (aligned.matched_blocks, aligned.by_tier) == (9, (9, 0, 0))
    assert aligned.score == pytest.approx(0.9)
    assert scorer.score_tokens(MODEL, QUERY).scores[0].matched_blocks == 10
    every_block = Scorer(index, ScoringConfig(last_token_recomputed=False))
    assert every_block.score_tokens(MODEL, PROMPT).scores[0].matched_blocks == 10


def test_matches_round_down_to_each_engines_block_size() -> None:
    """Engines reuse whole blocks of their own size: with 16-token keys, an engine of 64-token
    blocks holding 10 keys' worth (2.5 of its blocks) reuses 2 of them (8 keys)."""
    index = MemoryIndex()
    sizes = EngineBlockSizes(16)
    for engine, size in (("b16:1", 16), ("b32:1", 32), ("b64:1", 64)):
        store_prompt(index, engine, MODEL, PROMPT)
        sizes.learn(engine, size)
    scorer = Scorer(index, block_sizes=sizes)
    got = {s.engine: s.matched_blocks for s in scorer.score_tokens(MODEL, QUERY).scores}
    assert got == {"b16:1": 10, "b32:1": 10, "b64:1": 8}
    # Both rules together: 161 tokens; the block of the last token is the 11th of 16, the
    # 6th of 32 and the 3rd of 64.
    aligned = {s.engine: s.matched_blocks for s in scorer.score_tokens(MODEL, PROMPT).scores}
    assert aligned == {"b16:1": 9, "b32:1": 8, "b64:1": 8}


@settings(max_examples=200, deadline=None)
@given(
    matched=st.integers(0, 64),
    ratio=st.sampled_from([1, 2, 4]),
    prompt_tokens=st.one_of(st.none(), st.integers(0, 2048)),
)
def test_reusable_blocks_are_whole_engine_blocks_before_the_last_token(
    matched: int, ratio: int, prompt_tokens: int | None
) -> None:
    canonical = 16
    engine_block = canonical * ratio
    got = reusable_blocks(matched, canonical, engine_block, prompt_tokens)
    assert 0 <= got <= matched
    assert got % ratio == 0
    if prompt_tokens is not None:
        assert got * canonical <= max(prompt_tokens - 1, 0)
    # The largest such count: one more engine block would break a rule.
    more = got + ratio
    assert more > matched or (
        prompt_tokens is not None and more * canonical > max(prompt_tokens - 1, 0)
    )


def test_block_sizes_the_canonical_size_cannot_divide_are_listed() -> None:
    sizes = EngineBlockSizes(48)
    assert sizes.learn("a:1", 32) is True  # first time: the caller reports it
    assert sizes.learn("a:1", 32) is False
    assert sizes.learn("b:1", 96) is False
    assert sizes.incompatible() == {"a:1": 32}
    assert sizes.get("b:1") == 96
    sizes.forget("a:1")
    assert sizes.incompatible() == {}
