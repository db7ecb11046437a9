"""Request parsing never fails with anything but BadRequest, whatever JSON arrives."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtools.sim.api import BadRequest, parse_generation, parse_tokenize
from kvtools.sim.tokenizer import ByteTokenizer, render_chat

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "cache_salt",
        "tools",
        "role",
        "content",
    ]
)
bodies = json_values | st.dictionaries(keys, json_values, max_size=6)


@settings(max_examples=300)
@given(body=bodies, chat=st.booleans())
def test_parsers_raise_only_bad_request(body: Any, chat: bool) -> None:
    for parse in (
        lambda: parse_generation(
            body, chat=chat, base_model="m", loras={"sql": "/p"}, tokenizer=ByteTokenizer()
        ),
        lambda: parse_tokenize(body, "m", {"sql": "/p"}, ByteTokenizer()),
    ):
        try:
            parse()
        except BadRequest as exc:
            assert exc.status in (400, 404) and exc.reason


def test_chat_rendering_is_documented_format() -> None:
    text = render_chat(
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    )
    assert text == "<|system|>\ns\n<|user|>\nhi\n<|assistant|>\n"
    assert render_chat([{"role": "user", "content": "x"}], add_generation_prompt=False) == (
        "<|user|>\nx\n"
    )
    with pytest.raises(ValueError, match="role"):
        render_chat([{"content": "x"}])


def test_parse_generation_fields() -> None:
    parsed = parse_generation(
        {
            "model": "sql",
            "messages": [{"role": "user", "content": "ab"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 3,
            "cache_salt": "s",
        },
        chat=True,
        base_model="m",
        loras={"sql": "/p"},
        tokenizer=ByteTokenizer(),
    )
    assert (parsed.model, parsed.lora_name, parsed.max_tokens) == ("sql", "sql", 3)
    assert parsed.stream and parsed.include_usage and parsed.cache_salt == "s"
    assert parsed.prompt_token_ids == list(b"<|user|>\nab\n<|assistant|>\n")
