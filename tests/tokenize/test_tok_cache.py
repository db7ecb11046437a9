"""The segment cache gives exactly the uncached ids, and stays within its byte bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex.tokenize import TokenizationCacheConfig, load_tokenizer
from kvindex.tokenize.local import LocalTokenizer

NAMES = ["deepseek", "llama3", "chatml", "mistral", "unigram", "wordpiece"]


@pytest.fixture(scope="module")
def pairs(tokenizer_dirs: dict[str, Path]) -> dict[str, tuple[LocalTokenizer, LocalTokenizer]]:
    # One cached tokenizer per model lives across all examples, so later examples hit entries
    # that earlier ones stored (shared prefixes across requests, as in production).
    off = TokenizationCacheConfig(enabled=False)
    small = TokenizationCacheConfig(max_bytes=256 * 1024)
    return {
        name: (load_tokenizer(d, cache=small), load_tokenizer(d, cache=off))
        for name, d in tokenizer_dirs.items()
    }


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_content = st.one_of(
    _text,
    st.sampled_from(
        ["", " ", "\n", "Hello world", "It's 12345 东京 🙂", "<|im_start|>x", "[INST]"]
    ),
)
SHARED_SYSTEMS = [
    "You are a helpful assistant. " * 20,
    "Système: réponds en français, s'il te plaît.\n\n" * 5,
    "",
]


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = draw(st.sampled_from(SHARED_SYSTEMS))
    if system:
        messages.append({"role": "system", "content": system})
    turns = draw(st.integers(min_value=1, max_value=4))
    for i in range(turns):
        messages.append({"role": "user", "content": draw(_content)})
        if i < turns - 1:
            messages.append({"role": "assistant", "content": draw(_content)})
    return messages


@pytest.mark.parametrize("name", NAMES)
@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(conversation=conversations(), add_generation_prompt=st.booleans(), grow=st.booleans())
def test_cached_equals_uncached_for_shared_prefix_conversations(
    name: str,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool,
    grow: bool,
    pairs: dict[str, tuple[LocalTokenizer, LocalTokenizer]],
) -> None:
    cached, uncached = pairs[name]
    convs = [conversation]
    if grow:  # the same conversation one turn later: everything before is a shared prefix
        convs.append([*conversation, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "next"}])  # fmt: skip
    for conv in convs:
        try:
            expected = uncached.apply_chat_template(conv, add_generation_prompt)
        except Exception as exc:  # e.g. Mistral's role alternation check
            with pytest.raises(type(exc)):
                cached.apply_chat_template(conv, add_generation_prompt)
            continue
        assert cached.apply_chat_template(conv, add_generation_prompt) == expected
        text = uncached.render_chat(conv, add_generation_prompt)
        for add_special in (True, False):
            assert cached.encode(text, add_special) == uncached.encode(text, add_special)


def test_repeated_prefix_hits_the_cache(tokenizer_dirs: dict[str, Path]) -> None:
    tok = load_tokenizer(tokenizer_dirs["deepseek"])
    system = {"role": "system", "content": "Long shared system prompt. " * 200}
    first = tok.apply_chat_template([system, {"role": "user", "content": "one"}])
    before = tok.cache_stats()
    second = tok.apply_chat_template([system, {"role": "user", "content": "two"}])
    after = tok.cache_stats()
    assert after.hits > before.hits and after.entries >= before.entries
    assert first[: len(first) - 8] == second[: len(first) - 8]  # the shared prefix's ids
    assert tok.cache_exact and after.uncached_calls == 0


def test_metaspace_first_falls_back_and_counts(tokenizer_dirs: dict[str, Path]) -> None:
    tok = load_tokenizer(tokenizer_dirs["mistral"])
    assert not tok.cache_exact
    assert "Metaspace" in str(tok.cache_fallback_reason)
    # Why: with prepend_scheme="first" a gap gets "▁" only at offset 0, so a gap encoded
    # alone differs from the same gap inside the whole text.
    backend = tok.backend
    inst = backend.token_to_id("[INST]")
    whole = backend.encode("a[INST]b", add_special_tokens=False).ids
    naive = [
        *backend.encode("a", add_special_tokens=False).ids,
        inst,
        *backend.encode("b", add_special_tokens=False).ids,
    ]
    assert whole != naive
    assert tok.encode("a[INST]b", add_special_tokens=False) == whole
    assert tok.cache_stats().uncached_calls == 1


def test_lru_is_bounded_by_bytes(tokenizer_dirs: dict[str, Path]) -> None:
    limit = 4096
    tok = load_tokenizer(tokenizer_dirs["llama3"], cache=TokenizationCacheConfig(max_bytes=limit))
    ref = load_tokenizer(tokenizer_dirs["llama3"], cache=TokenizationCacheConfig(enabled=False))
    for i in range(200):
        text = f"<|start_header_id|>user<|end_header_id|>segment number {i} " * 3
        assert tok.encode(text) == ref.encode(text)
        assert tok.cache_stats().bytes <= limit
    stats = tok.cache_stats()
    assert stats.evictions > 0 and stats.entries > 0
    huge = "x" * (limit * 2)  # larger than the whole cache: tokenized, never stored
    assert tok.encode(huge) == ref.encode(huge)
    assert tok.cache_stats().bytes <= limit


def test_disabled_cache_reports_itself(tokenizer_dirs: dict[str, Path]) -> None:
    tok = load_tokenizer(tokenizer_dirs["chatml"], cache=TokenizationCacheConfig(enabled=False))
    assert not tok.cache_exact and tok.cache_fallback_reason == "cache disabled"
    with pytest.raises(ValueError, match="max_bytes"):
        TokenizationCacheConfig(max_bytes=0)


def _brute_leftmost_longest(words: set[str], text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pos = 0
    while pos < len(text):
        hits = [w for w in words if text.startswith(w, pos)]
        if hits:
            best = max(hits, key=len)
            out.append((pos, best))
            pos += len(best)
        else:
            pos += 1
    return out


@settings(max_examples=300, deadline=None)
@given(
    words=st.sets(st.text("ab<>|", min_size=1, max_size=5), min_size=1, max_size=8),
    text=st.text("ab<>|x", max_size=40),
)
def test_trie_matcher_is_leftmost_longest(words: set[str], text: str) -> None:
    from kvindex.tokenize.segments import _alternation

    pattern = _alternation(words)
    assert pattern is not None
    got = [(m.start(), m.group()) for m in pattern.finditer(text)]
    assert got == _brute_leftmost_longest(words, text)
