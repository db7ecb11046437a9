"""Chat template rendering: transformers' environment and vLLM's message normalisation."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tok_fixtures import (
    CHATML_DEFAULT_TEMPLATE,
    CHATML_TOOL_TEMPLATE,
    LLAMA3_TEMPLATE,
    MISTRAL_TEMPLATE,
    PARTS_TEMPLATE,
)

from kvindex.tokenize import ChatTemplateError, TokenizationError, load_tokenizer
from kvindex.tokenize.chat_template import template_iterates_content
from kvindex.tokenize.local import LocalTokenizer

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def ours(load_cached: Any, tokenizer_dirs: dict[str, Path]) -> dict[str, LocalTokenizer]:
    return {name: load_cached(name) for name in tokenizer_dirs}


def _ref_ids(ref: Any, messages: Any, **kwargs: Any) -> list[int]:
    return list(ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def test_named_templates_select_like_transformers(
    ours: dict[str, LocalTokenizer], reference_tokenizers: dict[str, Any]
) -> None:
    chatml, ref = ours["chatml"], reference_tokenizers["chatml"]
    msgs = [{"role": "user", "content": "hi"}]
    plain = chatml.render_chat(msgs)
    with_tools = chatml.render_chat(msgs, tools=TOOLS)
    assert "# Tools" not in plain and "# Tools" in with_tools  # tool_use picked for tools
    assert chatml.apply_chat_template(msgs, tools=TOOLS) == _ref_ids(
        ref, msgs, tools=TOOLS, add_generation_prompt=True
    )
    # By name, and a literal template string, as transformers' chat_template argument.
    assert chatml.render_chat(msgs, chat_template="tool_use") == ref.apply_chat_template(
        msgs, chat_template="tool_use", tokenize=False, add_generation_prompt=True
    )
    literal = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
    assert chatml.render_chat(msgs, chat_template=literal) == "<<hi>>"
    assert CHATML_DEFAULT_TEMPLATE != CHATML_TOOL_TEMPLATE


def test_raise_exception_becomes_chat_template_error(
    ours: dict[str, LocalTokenizer], reference_tokenizers: dict[str, Any]
) -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="must alternate"):
        ours["mistral"].apply_chat_template(bad)
    with pytest.raises(Exception, match="must alternate"):
        reference_tokenizers["mistral"].apply_chat_template(bad, tokenize=True)
    assert "raise_exception" in MISTRAL_TEMPLATE


def test_missing_and_broken_templates(tmp_path: Path, tokenizer_dirs: dict[str, Path]) -> None:
    bare = load_tokenizer(tokenizer_dirs["llama3"] / "tokenizer.json")  # a bare file: no config
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        bare.render_chat([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        bare.render_chat([], chat_template="x")
    with pytest.raises(ChatTemplateError, match="role"):
        bare.render_chat([{"content": "x"}], chat_template="x")


def test_environment_features(ours: dict[str, LocalTokenizer]) -> None:
    tok = ours["llama3"]
    msgs = [{"role": "user", "content": "ü"}]
    source = (
        "{{ messages | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(sort_keys=True) }}|"
        "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}|{{ custom }}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% if loop.first %}{% continue %}{% endif %}{% endfor %}{{ ns.n }}|"
        "{% generation %}gen{% endgeneration %}|{{ dict(x=1) | tojson }}"
    )
    out = tok.render_chat(msgs, chat_template=source, custom="V")
    assert out == (
        '[{"role": "user", "content": "ü"}]|{"a": [1, 2], "b": 1}|'
        f"{datetime.now():%Y}|<|begin_of_text|>|<|eot_id|>|V|1|gen|" + '{"x": 1}'
    )
    with pytest.raises(ChatTemplateError):
        tok.render_chat(msgs, chat_template="{% set ns = namespace(_x=1) %}")
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute escapes
        tok.render_chat(msgs, chat_template="{{ messages.__class__.__mro__ }}")


def test_template_kwargs_override_special_tokens(ours: dict[str, LocalTokenizer]) -> None:
    out = ours["llama3"].render_chat(
        [{"role": "user", "content": "x"}], chat_template="{{ bos_token }}", bos_token="B"
    )
    assert out == "B"
    dated = ours["llama3"].render_chat([{"role": "user", "content": "x"}], date_string="1 Jan")
    assert "Today Date: 1 Jan" in dated and "date_string" in LLAMA3_TEMPLATE


def test_string_format_joins_text_parts_with_newline(
    ours: dict[str, LocalTokenizer], reference_tokenizers: dict[str, Any]
) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    msgs = [{"role": "user", "content": parts}]
    joined = [{"role": "user", "content": "first\nsecond"}]
    for name in ("deepseek", "llama3", "chatml", "mistral"):
        assert not template_iterates_content(ours[name].chat_template_source())
        assert ours[name].apply_chat_template(msgs) == _ref_ids(
            reference_tokenizers[name], joined, add_generation_prompt=True
        )


def test_openai_format_keeps_parts(
    ours: dict[str, LocalTokenizer], reference_tokenizers: dict[str, Any]
) -> None:
    assert template_iterates_content(PARTS_TEMPLATE)
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    msgs = [{"role": "user", "content": parts}, {"role": "assistant", "content": "plain"}]
    as_vllm = [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": [{"type": "text", "text": "plain"}]},
    ]
    expected = _ref_ids(reference_tokenizers["wordpiece"], as_vllm, add_generation_prompt=True)
    assert ours["wordpiece"].apply_chat_template(msgs) == expected
    assert "first | second" in ours["wordpiece"].render_chat(msgs)


def test_multimodal_parts_are_refused(ours: dict[str, LocalTokenizer]) -> None:
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ChatTemplateError, match="EngineTokenizer"):
        ours["chatml"].apply_chat_template(msgs)


def test_tool_call_arguments_json_string_is_parsed_like_vllm(
    ours: dict[str, LocalTokenizer], reference_tokenizers: dict[str, Any]
) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"q": "é"}}}
    as_dict = [
        {"role": "user", "content": "find"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "found"},
    ]
    as_string = copy.deepcopy(as_dict)
    as_string[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"q": "é"})
    for name in ("llama3", "chatml"):
        expected = _ref_ids(reference_tokenizers[name], as_dict, tools=TOOLS)
        assert ours[name].apply_chat_template(
            as_string, add_generation_prompt=False, tools=TOOLS
        ) == (expected)
    assert as_string[1]["tool_calls"][0]["function"]["arguments"] == json.dumps({"q": "é"})
    # Malformed or non-object arguments become {} (vLLM keeps such history usable).
    for bad_args in ("{not json", "[1, 2]", "", None):
        bad = copy.deepcopy(as_string)
        bad[1]["tool_calls"][0]["function"]["arguments"] = bad_args
        empty = copy.deepcopy(as_dict)
        empty[1]["tool_calls"][0]["function"]["arguments"] = {}
        assert ours["chatml"].apply_chat_template(bad, tools=TOOLS) == _ref_ids(
            reference_tokenizers["chatml"], empty, tools=TOOLS, add_generation_prompt=True
        )
    with pytest.raises(ChatTemplateError, match="type 'function'"):
        ours["chatml"].apply_chat_template(
            [{"role": "assistant", "content": "", "tool_calls": [{"type": "code"}]}]
        )


def test_continue_final_message(
    ours: dict[str, LocalTokenizer], reference_tokenizers: dict[str, Any]
) -> None:
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, I am"}]
    for name in ("chatml", "llama3", "deepseek"):
        expected = _ref_ids(
            reference_tokenizers[name],
            msgs,
            continue_final_message=True,
            add_generation_prompt=False,
        )
        got = ours[name].apply_chat_template(
            msgs, add_generation_prompt=False, continue_final_message=True
        )
        assert got == expected
    with pytest.raises(ChatTemplateError, match="exclusive"):
        ours["chatml"].apply_chat_template(
            msgs, add_generation_prompt=True, continue_final_message=True
        )


def test_unknown_message_fields_are_dropped_like_vllm(ours: dict[str, LocalTokenizer]) -> None:
    source = "{% for m in messages %}{{ m | tojson }}{% endfor %}"
    msgs = [
        {"role": "user", "content": "x", "name": "ann", "extra": 1},
        {"role": "assistant", "content": "y", "reasoning": "r", "tool_call_id": "z"},
        {"role": "assistant", "content": "w", "tool_calls": []},
    ]
    out = ours["chatml"].render_chat(msgs, chat_template=source)
    assert '"extra"' not in out and '"tool_call_id"' not in out and '"tool_calls"' not in out
    assert '"name": "ann"' in out and '"reasoning_content": "r"' in out and '"thinking": "r"' in out


def test_system_billing_header_and_tool_parts(ours: dict[str, LocalTokenizer]) -> None:
    source = "{% for m in messages %}{{ m.content | tojson }};{% endfor %}"
    header = "x-anthropic-billing-header: cch=123\nBe brief."
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": header}]},
        {"role": "tool", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    # A loop over content makes this an "openai"-format template: parts stay lists, except
    # a tool message's all-text parts, which vLLM joins.
    looping = "{% for m in messages %}{% for p in m.content %}{% endfor %}{% endfor %}" + source
    assert ours["chatml"].render_chat(msgs, chat_template=looping) == (
        '[{"type": "text", "text": "Be brief."}];"a\\nb";'
    )
    assert ours["chatml"].render_chat(msgs, chat_template=source) == '"Be brief.";"a\\nb";'


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_message = st.one_of(
    st.dictionaries(st.sampled_from(["role", "content", "tool_calls", "name", "x"]), _json),
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": _json}
    ),
    _json,
)


@pytest.mark.parametrize("name", ["chatml", "llama3", "wordpiece"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(messages=st.lists(_message, max_size=4), tools=st.none() | st.lists(_json, max_size=2))
def test_malformed_messages_raise_only_chat_template_errors(
    name: str, messages: list[Any], tools: Any, ours: dict[str, LocalTokenizer]
) -> None:
    try:
        ids = ours[name].apply_chat_template(messages, tools=tools)
    except ChatTemplateError:
        return
    assert all(isinstance(i, int) for i in ids)


def test_non_string_prompt_is_a_tokenization_error(ours: dict[str, LocalTokenizer]) -> None:
    with pytest.raises(TokenizationError, match="must be a string"):
        ours["chatml"].encode(b"bytes")  # type: ignore[arg-type]
