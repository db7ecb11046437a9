"""Usage extraction from response bodies: OpenAI JSON and SSE, Anthropic SSE; any chunking
gives the same answer; garbage never raises."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.responses import UsageCollector

OPENAI_SSE = (
    b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":4,'
    b'"prompt_tokens_details":{"cached_tokens":16}}}\n\n'
    b"data: [DONE]\n\n"
)
ANTHROPIC_SSE = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
    b'{"input_tokens":11,"output_tokens":1,"cache_read_input_tokens":4}}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n'
)


def collect(body: bytes, streamed: bool, cuts: list[int]) -> tuple | None:
    collector = UsageCollector(streamed=streamed)
    last = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        collector.feed(body[last:cut])
        last = max(last, cut)
    collector.feed(body[last:])
    usage = collector.finish()
    return (
        None
        if usage is None
        else (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    )


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_any_chunking_gives_the_same_usage(cuts: list[int]) -> None:
    assert collect(OPENAI_SSE, True, cuts) == (30, 4, 16)
    assert collect(ANTHROPIC_SSE, True, cuts) == (11, 9, 4)
    body = json.dumps({"usage": {"prompt_tokens": 2, "completion_tokens": 3}}).encode()
    assert collect(body, False, cuts) == (2, 3, None)


def test_no_usage_and_oversized_bodies() -> None:
    assert collect(b'{"choices": []}', False, []) is None
    collector = UsageCollector(streamed=False, max_bytes=10)
    collector.feed(b'{"usage": {"prompt_tokens": 1}}')
    assert collector.finish() is None and collector.skipped == 1


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=500), streamed=st.booleans())
def test_garbage_never_raises(body: bytes, streamed: bool) -> None:
    collector = UsageCollector(streamed=streamed)
    collector.feed(body)
    collector.feed(b'data: {"usage": [1]}\n' + body)
    collector.finish()
