# ruff: noqa: RUF001  (DeepSeek token strings use fullwidth bars)
"""Our ids equal transformers' own (AutoTokenizer on the same files) for prompts and chats."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex.tokenize import ChatTemplateError, TokenizationCacheConfig
from kvindex.tokenize.local import LocalTokenizer

NAMES = ["deepseek", "llama3", "chatml", "mistral", "unigram", "wordpiece"]

PROMPTS = [
    "",
    " ",
    "Hello world",
    "It's a test. We'll see; they're here!",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\nthree\r\nfour\t\ttabs",
    "numbers 1 12 123 1234 12345 3.14159 -42",
    "café naïve résumé über straße",
    "中文字符 日本語 ひらがな カタカナ 한국어",
    "emoji 🙂🚀 and combining e\u0301 and zero\u200bwidth",
    "<｜begin▁of▁sentence｜>special<｜User｜>tokens<｜Assistant｜>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>x</tool_call>",
    "<s>[INST] hi [/INST] ok</s>",
    "[CLS] a [SEP] [MASK] b",
    "<think>\nreasoning\n</think>\n\nanswer",
    "x" * 500,
    "word " * 200,
]

SYSTEM = "You are a careful assistant. Answer briefly; cite sources when unsure."
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Tell me about Paris."},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And London?"},
    ],
    [
        {"role": "user", "content": "Übersetze: 東京は大きい 🙂"},
        {"role": "assistant", "content": "Tokyo is big."},
        {"role": "user", "content": "ok\n\n  spaced  "},
    ],
    [{"role": "user", "content": ""}],
    [
        {"role": "user", "content": "empty reply next"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "again"},
    ],
    [{"role": "user", "content": "<|im_start|> and <｜User｜> typed by a user"}],
]


def _reference_chat(ref: Any, messages: Any, **kwargs: Any) -> list[int] | str:
    try:
        return list(ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))
    except Exception as exc:  # the reference raises jinja/value errors; we raise ours
        return f"error: {type(exc).__name__}"


def _our_chat(ours: LocalTokenizer, messages: Any, **kwargs: Any) -> list[int] | str:
    try:
        return ours.apply_chat_template(messages, **kwargs)
    except ChatTemplateError:
        return "error"


@pytest.fixture(scope="module")
def ours_uncached(load_cached: Any) -> dict[str, LocalTokenizer]:
    return {name: load_cached(name, TokenizationCacheConfig(enabled=False)) for name in NAMES}


@pytest.fixture(scope="module")
def ours_cached(load_cached: Any) -> dict[str, LocalTokenizer]:
    return {name: load_cached(name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(
    name: str,
    add_special_tokens: bool,
    reference_tokenizers: dict[str, Any],
    ours_uncached: dict[str, LocalTokenizer],
    ours_cached: dict[str, LocalTokenizer],
) -> None:
    ref = reference_tokenizers[name]
    for prompt in PROMPTS:
        expected = ref.encode(prompt, add_special_tokens=add_special_tokens)
        assert ours_uncached[name].encode(prompt, add_special_tokens) == expected, prompt
        assert ours_cached[name].encode(prompt, add_special_tokens) == expected, prompt


def test_completion_bos_follows_post_processor(
    ours_uncached: dict[str, LocalTokenizer], reference_tokenizers: dict[str, Any]
) -> None:
    # BOS comes from tokenizer.json's post-processor (Llama-3 style has one; DeepSeek's does
    # not, and transformers 5 ignores add_bos_token in tokenizer_config when tokenizer.json exists).
    llama = ours_uncached["llama3"]
    bos = llama.backend.token_to_id("<|begin_of_text|>")
    assert llama.encode("hi")[0] == bos
    assert bos not in llama.encode("hi", add_special_tokens=False)
    assert ours_uncached["unigram"].encode("hi")[-1] == ours_uncached[
        "unigram"
    ].backend.token_to_id("</s>")
    deepseek = ours_uncached["deepseek"]
    assert deepseek.encode("hi") == reference_tokenizers["deepseek"].encode("hi")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_transformers(
    name: str,
    add_generation_prompt: bool,
    reference_tokenizers: dict[str, Any],
    ours_uncached: dict[str, LocalTokenizer],
    ours_cached: dict[str, LocalTokenizer],
) -> None:
    ref = reference_tokenizers[name]
    outcomes = []
    for messages in CONVERSATIONS:
        expected = _reference_chat(ref, messages, add_generation_prompt=add_generation_prompt)
        for ours in (ours_uncached[name], ours_cached[name]):
            got = _our_chat(ours, messages, add_generation_prompt=add_generation_prompt)
            if isinstance(expected, str):
                assert got == "error", (messages, expected)
            else:
                assert got == expected, messages
        outcomes.append(isinstance(expected, list))
    assert any(outcomes), "every conversation errored: the comparison would be empty"


def test_chat_with_add_special_tokens_like_vllm(
    reference_tokenizers: dict[str, Any], ours_cached: dict[str, LocalTokenizer]
) -> None:
    # vLLM's chat request may set add_special_tokens: the rendered text is then encoded with
    # the post-processor too (a second BOS for Llama-3-style templates).
    for name in ("llama3", "unigram", "deepseek"):
        ref = reference_tokenizers[name]
        text = ref.apply_chat_template(CONVERSATIONS[2], tokenize=False, add_generation_prompt=True)
        expected = ref.encode(text, add_special_tokens=True)
        assert ours_cached[name].apply_chat_template(CONVERSATIONS[2], add_special_tokens=True) == (
            expected
        )
    llama = ours_cached["llama3"].apply_chat_template(CONVERSATIONS[2], add_special_tokens=True)
    assert llama[0] == llama[1]  # BOS from the post-processor, then the template's own


def test_rendered_text_matches_transformers(
    reference_tokenizers: dict[str, Any], ours_uncached: dict[str, LocalTokenizer]
) -> None:
    for name in ("deepseek", "llama3", "chatml"):
        for messages in CONVERSATIONS:
            expected = reference_tokenizers[name].apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            assert ours_uncached[name].render_chat(messages) == expected


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city — température, 天气",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'},
]


@pytest.mark.parametrize("name", ["llama3", "chatml"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tools_match_transformers(
    name: str,
    add_generation_prompt: bool,
    reference_tokenizers: dict[str, Any],
    ours_cached: dict[str, LocalTokenizer],
) -> None:
    ref = reference_tokenizers[name]
    expected = ref.apply_chat_template(
        TOOL_CONVERSATION,
        tools=TOOLS,
        tokenize=True,
        return_dict=False,
        add_generation_prompt=add_generation_prompt,
    )
    got = ours_cached[name].apply_chat_template(
        TOOL_CONVERSATION, add_generation_prompt=add_generation_prompt, tools=TOOLS
    )
    assert got == list(expected)
    text = ours_cached[name].render_chat(TOOL_CONVERSATION, tools=TOOLS)
    assert "get_weather" in text and "température" in text  # tojson keeps non-ASCII


_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))
_FRAGMENTS = [
    "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<think>", "</think>",
    "<|im_start|>", "<|im_end|>", "<tool_call>", "<|eot_id|>", "<|start_header_id|>",
    "<s>", "</s>", "[INST]", "[/INST]", "[CLS]", "[SEP]", "<|user|>", "<tool>", "</tool>x",
    "'s", "'ll", " ", "  ", "\n", "\n\n", "\r\n", "\t", "123", "4567", "é", "東京", "🙂",
    "Hello", " world", "!!", "...", "e\u0301",
]  # fmt: skip
random_text = st.lists(
    st.one_of(st.text(_ALPHABET, max_size=12), st.sampled_from(_FRAGMENTS)), max_size=24
).map("".join)


@pytest.mark.parametrize("name", NAMES)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=random_text, add_special_tokens=st.booleans())
def test_random_text_encode_matches_transformers(
    name: str,
    text: str,
    add_special_tokens: bool,
    reference_tokenizers: dict[str, Any],
    ours_uncached: dict[str, LocalTokenizer],
    ours_cached: dict[str, LocalTokenizer],
) -> None:
    expected = reference_tokenizers[name].encode(text, add_special_tokens=add_special_tokens)
    assert ours_uncached[name].encode(text, add_special_tokens) == expected
    assert ours_cached[name].encode(text, add_special_tokens) == expected
