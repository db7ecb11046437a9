"""The response path by Envoy's response body mode: NONE (the stream's end is the response's
end), a mode_override asking for no body when no plugin reads it (only where Envoy honours
one), and which framework configs need response bodies at all. The state machine is driven
directly; Envoy itself is in test_envoy_e2e.py."""

from __future__ import annotations

import asyncio
import json

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc_client import (
    LeastWaitingScheduler,
    endpoints,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

from epp.extproc import PickerContext, RequestStream
from epp.framework import build_scheduler, load_config
from epp.metrics import EppMetrics
from epp.plugins import default_registry
from epp.requests import RequestParser
from epp.responses import UsageCollector
from epp.server import response_body_needed

Mode = processing_mode_pb2.ProcessingMode
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def context(needed: bool) -> tuple[PickerContext, LeastWaitingScheduler]:
    scheduler = LeastWaitingScheduler()
    ctx = PickerContext(
        scheduler=scheduler,
        endpoints=lambda: endpoints(("10.0.0.1", 8000, 0)),
        parser=RequestParser(),
        metrics=EppMetrics(),
        response_body_needed=needed,
    )
    return ctx, scheduler


def headers_with_modes(request_mode: int, response_mode: int) -> pb.ProcessingRequest:
    message = request_headers()
    message.protocol_config.request_body_mode = request_mode  # type: ignore[assignment]
    message.protocol_config.response_body_mode = response_mode  # type: ignore[assignment]
    return message


async def decide(stream: RequestStream, request_mode: int, response_mode: int) -> None:
    await stream.handle(headers_with_modes(request_mode, response_mode))
    out = await stream.handle(request_body(CHAT, True))
    assert out and not stream.done


def run(coro):
    return asyncio.run(coro)


async def _none_mode() -> None:
    ctx, scheduler = context(needed=False)
    stream = RequestStream(ctx)
    await decide(stream, Mode.FULL_DUPLEX_STREAMED, Mode.NONE)
    (answer,) = await stream.handle(response_headers(content_type="text/event-stream"))
    assert not answer.HasField("mode_override")  # nothing to ask: Envoy sends no body
    assert not scheduler.completed
    stream.close()  # Envoy closes the stream when the HTTP stream is done
    (stats,) = scheduler.completed
    assert stats.status == 200 and stats.streamed and stats.first_byte_s is None
    assert stats.duration_s is not None and stats.completion_tokens is None
    assert ctx.metrics.client_disconnects._value.get() == 0
    assert not ctx.warned_no_body


def test_no_response_body_the_stream_end_completes_the_response() -> None:
    run(_none_mode())


async def _warns_once() -> None:
    ctx, _ = context(needed=True)
    for _ in range(2):
        stream = RequestStream(ctx)
        await decide(stream, Mode.FULL_DUPLEX_STREAMED, Mode.NONE)
        await stream.handle(response_headers())
        stream.close()
        assert ctx.warned_no_body


def test_no_response_body_while_a_plugin_needs_it_is_flagged() -> None:
    run(_warns_once())


async def _override(needed: bool, request_mode: int, response_mode: int) -> tuple[bool, object]:
    ctx, scheduler = context(needed)
    stream = RequestStream(ctx)
    await decide(stream, request_mode, response_mode)
    (answer,) = await stream.handle(response_headers(content_type="text/event-stream"))
    override = answer.HasField("mode_override")
    if override:
        assert answer.mode_override.response_body_mode == Mode.NONE
        assert answer.mode_override.response_trailer_mode == Mode.SEND
    else:
        await stream.handle(response_body(b'data: {"usage": {"prompt_tokens": 5}}\n\n', True))
    stream.close()
    (stats,) = scheduler.completed
    return override, stats


def test_mode_override_only_when_no_plugin_needs_the_body_and_envoy_allows_it() -> None:
    buffered, streamed = Mode.BUFFERED, Mode.STREAMED
    skipped, stats = run(_override(False, buffered, streamed))
    assert skipped and stats.status == 200 and stats.prompt_tokens is None  # type: ignore[attr-defined]
    read, stats = run(_override(True, buffered, streamed))
    assert not read and stats.prompt_tokens == 5  # type: ignore[attr-defined]
    # Envoy refuses overrides when a body mode is FULL_DUPLEX_STREAMED: none is sent.
    for modes in ((Mode.FULL_DUPLEX_STREAMED, streamed), (buffered, Mode.FULL_DUPLEX_STREAMED)):
        skipped, stats = run(_override(False, *modes))
        assert not skipped and stats.prompt_tokens == 5  # type: ignore[attr-defined]


async def _abandoned() -> None:
    ctx, scheduler = context(needed=False)
    stream = RequestStream(ctx)
    await decide(stream, Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED)
    await stream.handle(response_headers())
    stream.close()  # bodies were coming: the stream ended before the response did
    assert scheduler.completed[0].status == 499


def test_with_bodies_a_stream_ending_early_is_a_client_gone() -> None:
    run(_abandoned())


PRECISE_LIKE = """
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
"""

WITH_LATENCY = """
plugins:
- type: predicted-latency-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: predicted-latency-scorer
  - pluginRef: max-score-picker
"""

WITH_ACTIVE_REQUESTS = """
plugins:
- type: active-request-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: active-request-scorer
  - pluginRef: max-score-picker
"""


def test_which_configs_need_response_bodies() -> None:
    def needs(text: str) -> bool:
        return response_body_needed(build_scheduler(load_config(text, default_registry())))

    assert not needs(PRECISE_LIKE)
    assert not needs(WITH_ACTIVE_REQUESTS)  # in-flight counting needs only the end
    assert needs(WITH_LATENCY)  # first-byte time and token usage
    assert response_body_needed(LeastWaitingScheduler())  # not the framework's: assume so


def test_usage_split_across_chunks_is_found() -> None:
    event = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}\n\n'
    token = b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
    for cut in range(1, len(event)):
        collector = UsageCollector(streamed=True)
        for chunk in (token, token + event[:cut], event[cut:], b"data: [DONE]\n\n"):
            collector.feed(chunk)
        usage = collector.finish()
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (7, 2)
    no_newline = UsageCollector(streamed=True)
    no_newline.feed(b'data: {"usage": {"prompt_tokens": 1}}')
    usage = no_newline.finish()
    assert usage is not None and usage.prompt_tokens == 1
