"""Request parsing: OpenAI completions/chat, Anthropic messages, pass-through, LoRA
resolution, priority from the InferenceObjective header, and a never-raises property."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.requests import ModelRegistry, ParseError, RequestParser


def parse(path: str, body: object | bytes, **headers: str):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RequestParser(
        ModelRegistry({"sql-lora": "llama"}), objective_priorities={"batch": -1, "chat": 5}
    ).parse({":path": path, **headers}, raw)


def test_completions_prompt_forms() -> None:
    r = parse("/v1/completions", {"model": "llama", "prompt": "hi", "max_tokens": 7, "x": 1})
    assert (r.prompt, r.token_ids, r.max_tokens, r.lora, r.base_model) == (
        "hi",
        None,
        7,
        None,
        "llama",
    )
    assert parse("/v1/completions", {"model": "m", "prompt": ["a", "b"]}).prompt == "a"
    assert parse("/v1/completions", {"model": "m", "prompt": [1, 2, 3]}).token_ids == [1, 2, 3]
    assert parse("/v1/completions", {"model": "m", "prompt": [[4, 5], [6]]}).token_ids == [4, 5]
    with pytest.raises(ParseError, match="prompt"):
        parse("/v1/completions", {"model": "m", "prompt": 3})
    with pytest.raises(ParseError, match="prompt"):
        parse("/v1/completions", {"model": "m", "prompt": []})


def test_chat_completions_fields() -> None:
    body = {
        "model": "sql-lora",
        "messages": [{"role": "user", "content": "q"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "stream": True,
        "max_tokens": 3,
        "max_completion_tokens": 9,
        "cache_salt": "tenant-a",
    }
    r = parse("/v1/chat/completions?x=1", body, **{"x-request-id": "abc"})
    assert r.request_id == "abc" and r.model == "sql-lora"
    assert (r.base_model, r.lora) == ("llama", "sql-lora")
    assert r.messages == body["messages"] and r.tools == body["tools"]
    assert r.stream and r.max_tokens == 9 and r.cache_salt == "tenant-a"
    assert r.body == body and r.raw_body == json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"messages": []}, "model"),
        ({"model": "", "messages": []}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": ["x"]}, "messages"),
        ({"model": "m", "messages": [], "stream": "yes"}, "stream"),
        ({"model": "m", "messages": [], "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "messages": [], "max_tokens": True}, "max_tokens"),
        ({"model": "m", "messages": [], "tools": {}}, "tools"),
        ({"model": "m", "messages": [], "cache_salt": 3}, "cache_salt"),
        ([1, 2], "JSON object"),
    ],
)
def test_chat_errors_say_what_is_wrong(body: object, complaint: str) -> None:
    with pytest.raises(ParseError, match=complaint):
        parse("/v1/chat/completions", body)


def test_anthropic_messages_system_becomes_first_message() -> None:
    body = {
        "model": "claude-ish",
        "system": "be brief",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
        "stream": True,
    }
    r = parse("/v1/messages", body)
    assert r.messages == [{"role": "system", "content": "be brief"}, *body["messages"]]
    assert r.max_tokens == 100 and r.stream
    with pytest.raises(ParseError, match="system"):
        parse("/v1/messages", {**body, "system": 5})


def test_pass_through_paths_and_missing_body() -> None:
    r = parse("/v1/models", b"")
    assert r.model == "" and r.body is None
    assert parse("/metrics", b"\xff garbage").model == ""
    with pytest.raises(ParseError, match="needs a JSON request body"):
        parse("/v1/chat/completions", b"")
    with pytest.raises(ParseError, match="not valid JSON"):
        parse("/v1/chat/completions", b"{")
    headers_only = RequestParser().parse({":path": "/v1/completions"}, b"", body_available=False)
    assert headers_only.model == ""


def test_priority_from_inference_objective_header() -> None:
    body = {"model": "m", "messages": []}
    assert parse("/v1/chat/completions", body).priority == 0
    batch = parse("/v1/chat/completions", body, **{"x-gateway-inference-objective": "batch"})
    assert batch.priority == -1
    chat = parse("/v1/chat/completions", body, **{"x-gateway-inference-objective": "chat"})
    assert chat.priority == 5
    parser = RequestParser()
    r = parser.parse({":path": "/v1/models", "x-gateway-inference-objective": "nope"}, b"", None)
    assert r.priority == 0 and parser.unknown_objectives == 1


def test_registry_learns_adapters_from_engines() -> None:
    registry = ModelRegistry({"a": "base-1"})
    registry.learn("b", "base-2")
    registry.learn("base-2", "base-2")  # a base model is not its own adapter
    assert registry.resolve("a") == ("base-1", "a")
    assert registry.resolve("b") == ("base-2", "b")
    assert registry.resolve("base-2") == ("base-2", None)
    assert registry.adapters() == {"a": "base-1", "b": "base-2"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/messages", "/x"]),
    raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_parser_raises_only_parse_error(path: str, raw: bytes) -> None:
    with contextlib.suppress(ParseError):
        RequestParser().parse({":path": path}, raw)


@settings(max_examples=200, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(
            [
                "model",
                "prompt",
                "messages",
                "tools",
                "stream",
                "max_tokens",
                "system",
                "max_completion_tokens",
                "cache_salt",
            ]
        ),
        json_values,
    ),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/messages"]),
)
def test_known_fields_with_any_values_raise_only_parse_error(fields: dict, path: str) -> None:
    with contextlib.suppress(ParseError):
        RequestParser().parse({":path": path}, json.dumps(fields).encode())


def test_deep_nesting_is_a_parse_error_not_a_crash() -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ParseError):
        RequestParser().parse({":path": "/v1/completions"}, raw)
