# ruff: noqa: RUF001  (DeepSeek token strings use fullwidth bars)
"""The segment cache gives exactly the uncached ids, and stays within its byte bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex.keys import SharedPrefixIds
from kvindex.scoring import prompt_keys
from kvindex.tokenize import TokenizationCacheConfig, load_tokenizer
from kvindex.tokenize.local import LocalTokenizer
from kvindex.tokenize.prefix_memo import MemoPrefix, PrefixMemo

NAMES = ["deepseek", "llama3", "chatml", "mistral", "unigram", "wordpiece"]


@pytest.fixture(scope="module")
def pairs(load_cached: Any) -> dict[str, tuple[LocalTokenizer, LocalTokenizer]]:
    # One cached tokenizer per model lives across all examples, so later examples hit entries
    # that earlier ones stored (shared prefixes across requests, as in production).
    off = TokenizationCacheConfig(enabled=False)
    small = TokenizationCacheConfig(max_bytes=256 * 1024)
    return {name: (load_cached(name, small), load_cached(name, off)) for name in NAMES}


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


def test_repeated_prefix_hits_the_cache(load_cached: Any) -> None:
    tok = load_cached("deepseek", TokenizationCacheConfig(max_bytes=1 << 20))
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


@settings(max_examples=300, deadline=None)
@given(
    words=st.sets(st.text("ab<>|", min_size=1, max_size=5), min_size=1, max_size=8),
    text=st.text("ab<>|x", max_size=40),
)
def test_grouped_scanner_finds_the_single_tries_matches(words: set[str], text: str) -> None:
    from kvindex.tokenize.segments import _alternation, _TokenScanner

    scanner = _TokenScanner(words)
    single = _alternation(words)
    assert single is not None
    got = [(m.start(), m.group()) for m in scanner.finditer(text)]
    assert got == [(m.start(), m.group()) for m in single.finditer(text)]
    assert got == _brute_leftmost_longest(words, text)


def test_grouped_scanner_falls_back_to_one_trie_for_many_first_characters() -> None:
    from kvindex.tokenize.segments import _TokenScanner

    assert len(_TokenScanner(["<a>", "|b|", "<c"]).patterns) == 2
    assert len(_TokenScanner([f"{c}x" for c in "abcdefgh"]).patterns) == 1


_CUT_FRAGMENTS = [
    "\n", "\nA", "\nz", " \n", "  \nword", "\n\nHello", "x\n", ".\n", "!\n\n", "\r\n", "12\n",
    "123456", "东京\n", "e\u0301\n", "\t\n", "'s\n", "'ll", "naïve\n", " ", "  ", "abc", "(x)",
    "\u200b\n", "\nÉ", "<tool_call>\n", "<|im_start|>", "<｜User｜>\n", "<tool>", "<|eot_id|>",
]  # fmt: skip
cut_text = st.lists(
    st.one_of(st.sampled_from(_CUT_FRAGMENTS), st.text(max_size=6)), max_size=40
).map("".join)


@pytest.fixture(scope="module")
def chunking(load_cached: Any) -> dict[str, tuple[LocalTokenizer, LocalTokenizer]]:
    # Tiny chunks, so that nearly every cut point is used.
    tiny = TokenizationCacheConfig(chunk_chars=1)
    off = TokenizationCacheConfig(enabled=False)
    return {
        name: (load_cached(name, tiny), load_cached(name, off))
        for name in ("deepseek", "llama3", "chatml")
    }


@pytest.mark.parametrize("name", ["deepseek", "llama3", "chatml"])
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=cut_text, add_special_tokens=st.booleans())
def test_plain_text_cuts_are_exact(
    name: str,
    text: str,
    add_special_tokens: bool,
    chunking: dict[str, tuple[LocalTokenizer, LocalTokenizer]],
    reference_tokenizers: dict[str, Any],
) -> None:
    cached, uncached = chunking[name]
    assert cached._segments is not None and cached._segments.plain_cuts_reason is None
    expected = uncached.encode(text, add_special_tokens)
    assert cached.encode(text, add_special_tokens) == expected
    assert expected == reference_tokenizers[name].encode(
        text, add_special_tokens=add_special_tokens
    )


def test_shared_completion_prefix_hits_chunks(load_cached: Any) -> None:
    tok = load_cached("deepseek", TokenizationCacheConfig(chunk_chars=64, prefix_memo_bytes=0))
    ref = load_cached("deepseek", TokenizationCacheConfig(enabled=False))
    prefix = "".join(f"Line {i}: the router keeps a block index.\n" for i in range(100))
    assert tok.encode(prefix + "Question one?") == ref.encode(prefix + "Question one?")
    before = tok.cache_stats()
    assert tok.encode(prefix + "Question two?") == ref.encode(prefix + "Question two?")
    after = tok.cache_stats()
    assert after.hits - before.hits >= 50  # all chunks but the last came from the cache
    assert after.misses - before.misses == 1


def test_shared_completion_prefix_comes_from_the_prefix_memo(load_cached: Any) -> None:
    tok = load_cached("deepseek", TokenizationCacheConfig(chunk_chars=64))
    ref = load_cached("deepseek", TokenizationCacheConfig(enabled=False))
    prefix = "".join(f"Line {i}: the router keeps a block index.\n" for i in range(100))
    assert tok.encode(prefix + "Question one?") == ref.encode(prefix + "Question one?")
    before = tok.cache_stats()
    assert before.prefix_entries == 1 and before.prefix_bytes > len(prefix)
    ids = tok.encode(prefix + "Question two?")
    assert ids == ref.encode(prefix + "Question two?")
    after = tok.cache_stats()
    # The ids say which prefix they share; its chain keys are kept and reused, and equal
    # the keys of the plain ids.
    assert isinstance(ids, SharedPrefixIds) and ids.lead > 0
    assert prompt_keys("m", ids) == prompt_keys("m", list(ids))
    again = tok.encode(prefix + "Question three?")
    assert isinstance(again, SharedPrefixIds) and again.lead_keys is ids.lead_keys
    assert ids.lead_keys and prompt_keys("m", again) == prompt_keys("m", list(again))
    # The prefix came whole from the memo: no chunk of it was looked up, only the new line.
    assert after.prefix_hits - before.prefix_hits == 1
    assert after.hits == before.hits and after.misses - before.misses == 1
    after = tok.cache_stats()
    # The cut the prefix ends at holds only before a letter: "Line" after it, not " x".
    odd = prefix + " x"
    assert tok.encode(odd) == ref.encode(odd)
    assert tok.cache_stats().prefix_hits == after.prefix_hits
    # A text that diverges inside the prefix does not use it, and is still exact.
    other = prefix[:2000] + "X" + prefix[2001:] + "Question three?"
    assert tok.encode(other) == ref.encode(other)
    assert tok.cache_stats().prefix_hits == after.prefix_hits


def test_shared_system_prompt_before_fresh_turns_comes_from_the_prefix_memo(
    load_cached: Any,
) -> None:
    # Each text ends with a generation prompt after an added token, so the prefix stored at
    # its last segment holds its own fresh question, which no later text shares: only the
    # prefix stored where the first new segment began (the shared system prompt) serves.
    tok = load_cached("deepseek", TokenizationCacheConfig(chunk_chars=64))
    ref = load_cached("deepseek", TokenizationCacheConfig(enabled=False))
    system = "".join(f"Rule {i}: the router keeps a block index.\n" for i in range(60))

    def text(question: str) -> str:
        return system + "<｜User｜>" + question + "<｜Assistant｜>\n"

    for question in ("What is a block?", "Which engine holds it?"):
        assert tok.encode(text(question)) == ref.encode(text(question))
    before = tok.cache_stats()
    ids = tok.encode(text("Why route by prefix?"))
    assert ids == ref.encode(text("Why route by prefix?"))
    after = tok.cache_stats()
    assert after.prefix_hits - before.prefix_hits == 1
    assert isinstance(ids, SharedPrefixIds) and ids.lead >= len(ref.encode(system)) - 1
    # Only the fresh question was tokenized; the generation prompt's text came from the LRU.
    assert after.misses - before.misses == 1


def test_gpt2_regex_is_not_approved_because_the_cut_would_be_wrong() -> None:
    # With GPT-2's regex, "  \n" before a letter splits differently when the text ends there.
    from tokenizers import pre_tokenizers

    from kvindex.tokenize.plain_cuts import plain_cuts_reason

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    whole = [p for p, _ in gpt2.pre_tokenize_str("a  \nb")]
    halves = [p for p, _ in gpt2.pre_tokenize_str("a  \n")] + [
        p for p, _ in gpt2.pre_tokenize_str("b")
    ]
    assert whole != halves
    spec = {
        "model": {"type": "BPE", "dropout": None},
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    }
    assert plain_cuts_reason(spec, []) is not None


def test_single_pass_scan_when_tokens_cannot_overlap(load_cached: Any) -> None:
    # llama3-style: special and non-special tokens, all <...>: one scan finds both kinds.
    llama = load_cached("llama3")._segments
    assert llama is not None and llama._step2 is None and llama._step1 is not None
    assert llama._step1.fullmatch("<tool>") and llama._step1.fullmatch("<|eot_id|>")
    # DeepSeek has tokens like "<dsml:" that could overlap others: two passes stay.
    deepseek = load_cached("deepseek")._segments
    assert deepseek is not None and deepseek._step2 is not None
    # Its normalized tokens start with "<" or U+FF5C: scanned as two literal-led tries, with the
    # single trie's matches.
    assert deepseek._scan2 is not None and len(deepseek._scan2.patterns) == 2
    text = "a <think> b ｜DSML｜ <｜User｜>c<dsml:<｜Assistant｜>" * 3
    assert [m.span() for m in deepseek._scan2.finditer(text)] == [
        m.span() for m in deepseek._step2.finditer(text)
    ]


@pytest.fixture(scope="module")
def memo_pairs(load_cached: Any) -> dict[str, tuple[LocalTokenizer, LocalTokenizer]]:
    # Every prefix is long enough for the memo, chunks are tiny (many cut boundaries), and
    # the memo is small enough to evict.
    memo = TokenizationCacheConfig(
        chunk_chars=4, prefix_min_chars=1, max_bytes=256 * 1024, prefix_memo_bytes=32 * 1024
    )
    off = TokenizationCacheConfig(enabled=False)
    return {name: (load_cached(name, memo), load_cached(name, off)) for name in NAMES}


@st.composite
def memo_texts(draw: st.DrawFn, tokens: list[str]) -> tuple[str, list[str]]:
    """A shared base and texts that extend it, or a cut of it, or diverge from it: pieces
    of plain text, cut fragments, the tokenizer's added tokens and their beginnings (so a
    prefix could end inside a token that the next text completes)."""
    partial = [t[:k] for t in tokens for k in range(1, len(t))]
    piece = st.one_of(
        st.sampled_from(_CUT_FRAGMENTS),
        st.text(max_size=6),
        st.sampled_from(tokens),
        st.sampled_from(partial or [""]),
    )
    text = st.lists(piece, max_size=12).map("".join)
    base = draw(text)
    cut = draw(st.integers(min_value=0, max_value=len(base)))
    followers = draw(
        st.lists(
            st.one_of(
                text.map(lambda tail: base + tail),
                text.map(lambda tail: base[:cut] + tail),
                text,
            ),
            min_size=1,
            max_size=5,
        )
    )
    return base, followers


@pytest.mark.parametrize("name", NAMES)
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), add_special_tokens=st.booleans())
def test_prefix_memo_is_exact(
    name: str,
    data: st.DataObject,
    add_special_tokens: bool,
    memo_pairs: dict[str, tuple[LocalTokenizer, LocalTokenizer]],
) -> None:
    cached, uncached = memo_pairs[name]
    segments = cached._segments
    assert segments is not None
    # A sample of the added tokens (the longest first: those with the most prefixes).
    tokens = sorted(segments._ids, key=lambda t: (-len(t), t))[:12] + sorted(segments._ids)[:12]
    base, followers = data.draw(memo_texts(tokens))
    for text in [base, *followers]:
        assert cached.encode(text, add_special_tokens) == uncached.encode(
            text, add_special_tokens
        ), text


def test_prefix_memo_keeps_its_byte_bound(load_cached: Any) -> None:
    limit = 64 * 1024
    tok = load_cached(
        "chatml", TokenizationCacheConfig(prefix_memo_bytes=limit, prefix_min_chars=64)
    )
    for i in range(200):
        system = f"System prompt {i}: " + "route by the longest cached prefix.\n" * 40
        tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
        )
        assert tok.cache_stats().prefix_bytes <= limit
    stats = tok.cache_stats()
    assert 0 < stats.prefix_entries < 200


def test_cached_ids_share_one_int_object_per_token(load_cached: Any) -> None:
    # Two prompts tokenized apart: the ids they have in common are the same objects (the
    # cache hands out one int per token id; CPython shares only ints up to 256 itself).
    tok = load_cached("deepseek")
    a = tok.encode("Routing keeps the longest prefix. " * 40 + "First.")
    b = tok.encode("Other words first, then routing keeps the longest prefix. " * 3)
    first = {x: x for x in a}
    common = [x for x in b if x in first and x > 256]
    assert common and all(x is first[x] for x in common)


def test_a_prefix_many_prompts_share_survives_longer_ones() -> None:
    # One system prompt, then many conversations: each stores a longer prefix of its own.
    # The shared one is used by every prompt, so it stays while the others push in.
    memo = PrefixMemo(max_bytes=1 << 20, min_chars=8, per_head=4)
    system = "System: route by the longest cached prefix.\n"
    memo.put(MemoPrefix(system, (1, 2, 3), needs_letter=True))
    for i in range(20):
        memo.put(MemoPrefix(f"{system}User {i} said hello.\n", (1, 2, 3, 4), needs_letter=True))
        found = memo.find(f"{system}User {100 + i} asks again.")
        assert found is not None and found.text == system
    assert memo.entries <= 4 and memo.holds(system)
