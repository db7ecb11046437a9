"""The index against real vLLM engines: for every kind of request and cache event, what the
index predicts an engine reuses equals what vLLM's own prefix-cache counter says it reused.

The router runs at its default 16-token blocks against engines at 32 and 64 (the CPU backend
takes only multiples of 32): the index learns each engine's block size from its events and
rounds scores down to whole engine blocks, and to vLLM's rule that the block holding the
prompt's last token is always recomputed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtools.real_vllm.engines import VLLMEngine
from tests.kvindex.serve_process import ServeProcess, wait_for
from tests.real_vllm.vllm_index_harness import (
    check,
    predicted_tokens,
    random_tokens,
    reused_tokens,
    start_index,
    sync,
)


@pytest.fixture()
def index(engines: list[VLLMEngine], model_dir: Path) -> Iterator[ServeProcess]:
    served = start_index(engines, model_dir)
    yield served
    served.stop()


@pytest.mark.parametrize("which", [0, 1], ids=["block32", "block64"])
def test_token_prompts_inside_and_on_block_boundaries(
    engines: list[VLLMEngine], index: ServeProcess, which: int
) -> None:
    engine = engines[which]
    size = engine.spec.block_size
    first = random_tokens(5 * size + 7, seed=100 + which)
    assert check(index, engine, {"token_ids": first}) == (0, 0)
    # A prompt sharing 3 blocks and 20 tokens of the next: the index's 16-token keys match
    # one more block's worth than vLLM can reuse, unless rounded to the engine's blocks.
    shared = [*first[: 3 * size + 20], *random_tokens(40, seed=200 + which)]
    assert check(index, engine, {"token_ids": shared}) == (3 * size, 3 * size)
    # Exactly 4 engine blocks, all cached: vLLM recomputes the block of the last token.
    aligned = first[: 4 * size]
    assert check(index, engine, {"token_ids": aligned}) == (3 * size, 3 * size)
    assert check(index, engine, {"token_ids": first}) == (5 * size, 5 * size)


def test_text_prompts_and_chats_tokenized_as_vllm_does(
    engines: list[VLLMEngine], index: ServeProcess
) -> None:
    engine = engines[0]
    story = " ".join(f"The lighthouse keeper counted ship number {i} at dawn." for i in range(30))
    assert engine.tokenize(story)[:5] == engine.tokenize(story)[:5]
    assert check(index, engine, {"prompt": story})[1] == 0
    longer = story + " Then the fog came in and nobody counted anything."
    predicted, reused = check(index, engine, {"prompt": longer})
    assert predicted == reused > 0

    turn1 = [
        {"role": "system", "content": "You answer about lighthouses. " * 20},
        {"role": "user", "content": "How many ships passed on the first morning?"},
    ]
    assert check(index, engine, {"messages": turn1})[1] == 0
    reply = engine.chat(turn1, max_tokens=8)["choices"][0]["message"]["content"]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And on the second morning?"},
    ]
    predicted, reused = check(index, engine, {"messages": turn2})
    assert predicted == reused > 0


def test_shared_prefix_across_engines(engines: list[VLLMEngine], index: ServeProcess) -> None:
    system = random_tokens(200, seed=300)
    a, b = engines
    check(index, a, {"token_ids": [*system, *random_tokens(150, seed=301)]})
    check(index, b, {"token_ids": [*system[:140], *random_tokens(150, seed=302)]})
    question = [*system, *random_tokens(60, seed=303)]
    for engine in engines:
        predicted, reused = check(index, engine, {"token_ids": question})
        assert predicted == reused
    # 200 shared tokens: 6 blocks of 32 on a; 140 shared: 2 blocks of 64 on b.
    assert predicted_tokens(index, a, {"token_ids": question}) >= 192


def test_eviction_under_a_small_cache(engines: list[VLLMEngine], index: ServeProcess) -> None:
    engine = engines[1]  # 8,192 tokens = 128 blocks of 64
    first = random_tokens(10 * 64 + 5, seed=400)
    check(index, engine, {"token_ids": first})
    for i in range(8):  # 8 x 20 blocks: more than the cache holds
        engine.complete(random_tokens(20 * 64 + 3, seed=410 + i))
    sync(index, engine)
    predicted, reused = check(index, engine, {"token_ids": first})
    assert predicted == reused
    assert reused < 10 * 64  # something was evicted


def test_reset_prefix_cache(engines: list[VLLMEngine], index: ServeProcess) -> None:
    engine = engines[0]
    prompt = random_tokens(6 * 32 + 1, seed=500)
    check(index, engine, {"token_ids": prompt})
    assert predicted_tokens(index, engine, {"token_ids": prompt}) == 6 * 32
    engine.reset_prefix_cache()
    sync(index, engine)  # vLLM sends AllBlocksCleared with the step after the reset
    assert check(index, engine, {"token_ids": prompt}) == (0, 0)


def test_index_started_after_the_engines_replays_what_they_hold(
    engines: list[VLLMEngine], model_dir: Path
) -> None:
    engine = engines[0]
    prompt = random_tokens(7 * 32 + 9, seed=600)
    engine.complete(prompt)
    late = start_index(engines, model_dir)
    try:
        # The engine is idle: what it published before the late index was up may never
        # reach it (ZMQ's slow joiner; seen once in `.ci/run`). The first batch the index does
        # hear (a marker, re-sent until heard) has a seq > 0: a replay from 0 brings the
        # earlier prompt's blocks.
        sync(late, engine)
        body = {"token_ids": prompt}
        assert predicted_tokens(late, engine, body) == reused_tokens(engine, body) == 7 * 32
        replays = late.metric(
            "kvindex_ingest_replays_total", reason="first_contact", outcome="succeeded"
        )
        assert replays >= 1
    finally:
        late.stop()


def test_engine_restart_drops_its_blocks(engines: list[VLLMEngine], index: ServeProcess) -> None:
    engine = engines[1]
    before = random_tokens(4 * 64 + 9, seed=700)
    check(index, engine, {"token_ids": before})
    assert predicted_tokens(index, engine, {"token_ids": before}) == 4 * 64
    engine.restart()
    after = random_tokens(3 * 64 + 9, seed=701)
    engine.complete(after)
    wait_for(
        lambda: predicted_tokens(index, engine, {"token_ids": after}) == 3 * 64,
        60,
        "the index to follow the restarted engine",
    )
    assert check(index, engine, {"token_ids": before}) == (0, 0)
