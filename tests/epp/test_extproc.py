"""The ext_proc state machine over a real gRPC stream on loopback, served by each ext_proc
edge (the picker's HTTP/2 edge and grpc.aio's server; the client is grpc.aio). The scheduler
is a deterministic test double; Envoy itself is exercised in test_envoy_e2e.py."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc_client import (
    ExtProcHarness,
    LeastWaitingScheduler,
    endpoints,
    header_mutation,
    immediate_headers,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

from epp.extproc_wire import MAX_CHUNK_BYTES
from epp.types import SchedulingError
from tests.polling import wait_until_async as wait_until

pytestmark = pytest.mark.usefixtures("extproc_server")

CHAT = json.dumps(
    {"model": "llama", "messages": [{"role": "user", "content": "hello " * 50}], "stream": True}
).encode()


def three_endpoints():
    return endpoints(("10.0.0.1", 8000, 5), ("10.0.0.2", 8000, 1), ("10.0.0.3", 8000, 3))


def reemitted(responses) -> tuple[bytes, list[bool]]:
    chunks = [r.request_body.response.body_mutation.streamed_response for r in responses]
    return b"".join(c.body for c in chunks), [c.end_of_stream for c in chunks]


async def test_body_is_buffered_then_one_decision_then_body_reemitted() -> None:
    scheduler = LeastWaitingScheduler(fallbacks=1, extra_headers={"x-prefiller-host-port": "p:1"})
    async with ExtProcHarness(three_endpoints(), scheduler) as h:
        third = len(CHAT) // 3
        out = await h.exchange(
            [
                request_headers(extra={"x-request-id": "r1"}),
                request_body(CHAT[:third], False),
                request_body(CHAT[third : 2 * third], False),
                request_body(CHAT[2 * third :], True),
            ],
            expect=2,
        )
    decision = out[0]
    assert decision.WhichOneof("response") == "request_headers"
    headers = header_mutation(decision)
    assert headers["x-gateway-destination-endpoint"] == "10.0.0.2:8000,10.0.0.3:8000"
    assert headers["x-prefiller-host-port"] == "p:1"
    assert decision.request_headers.response.clear_route_cache
    lb = decision.dynamic_metadata.fields["envoy.lb"].struct_value
    assert lb.fields["x-gateway-destination-endpoint"].string_value == "10.0.0.2:8000,10.0.0.3:8000"
    body, eos = reemitted(out[1:])
    assert body == CHAT and eos == [True]
    request = scheduler.scheduled[0]
    assert request.request_id == "r1" and request.model == "llama" and request.stream
    assert h.metrics.request_total.labels(model="llama", target_model="llama")._value.get() == 1


async def test_large_body_reemitted_in_bounded_chunks() -> None:
    big = json.dumps({"model": "m", "prompt": "x" * 200_000}).encode()
    async with ExtProcHarness(three_endpoints(), LeastWaitingScheduler()) as h:
        pieces = [big[i : i + 16_384] for i in range(0, len(big), 16_384)]
        messages = [request_headers("/v1/completions")]
        messages += [request_body(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
        expected_chunks = -(-len(big) // MAX_CHUNK_BYTES)
        out = await h.exchange(messages, expect=1 + expected_chunks)
    body, eos = reemitted(out[1:])
    assert body == big
    assert eos == [False] * (expected_chunks - 1) + [True]
    assert all(
        len(r.request_body.response.body_mutation.streamed_response.body) <= MAX_CHUNK_BYTES
        for r in out[1:]
    )


async def test_headers_only_request_gets_a_decision() -> None:
    scheduler = LeastWaitingScheduler()
    async with ExtProcHarness(three_endpoints(), scheduler) as h:
        out = await h.exchange(
            [request_headers("/v1/models", end_of_stream=True, extra={":method": "GET"})],
            expect=1,
        )
    assert header_mutation(out[0])["x-gateway-destination-endpoint"] == "10.0.0.2:8000"
    assert scheduler.scheduled[0].model == ""


async def test_unparsed_path_with_body_is_passed_through() -> None:
    async with ExtProcHarness(three_endpoints(), LeastWaitingScheduler()) as h:
        out = await h.exchange(
            [request_headers("/tokenize"), request_body(b"not json at all", True)], expect=2
        )
    assert header_mutation(out[0])["x-gateway-destination-endpoint"] == "10.0.0.2:8000"
    assert reemitted(out[1:]) == (b"not json at all", [True])


async def rejected(h: ExtProcHarness, messages) -> object:
    call = h.stub().Process()
    for message in messages:
        await call.write(message)
    got = [m async for m in _read_all(call)]
    assert len(got) == 1, got
    assert got[0].WhichOneof("response") == "immediate_response"
    return got[0]


async def _read_all(call):
    while True:
        message = await asyncio.wait_for(call.read(), 10)
        if message is grpc.aio.EOF:
            return
        yield message


async def test_malformed_body_is_400_naming_the_problem() -> None:
    async with ExtProcHarness(three_endpoints(), LeastWaitingScheduler()) as h:
        r = await rejected(h, [request_headers(), request_body(b'{"model": "m"}', True)])
        assert r.immediate_response.status.code == 400
        assert b"messages" in r.immediate_response.body
        assert immediate_headers(r)["x-llm-d-request-dropped-reason"] == "malformed-request"
        r = await rejected(h, [request_headers(), request_body(b"{oops", True)])
        assert b"not valid JSON" in r.immediate_response.body
        errors = h.metrics.request_error_total.labels(model="", error_code="400")
        assert errors._value.get() == 2


async def test_body_over_the_limit_is_413() -> None:
    async with ExtProcHarness(three_endpoints(), LeastWaitingScheduler(), max_body_bytes=1000) as h:
        r = await rejected(
            h, [request_headers(), request_body(b"x" * 600, False), request_body(b"x" * 600, False)]
        )
    assert r.immediate_response.status.code == 413
    assert b"1000 bytes" in r.immediate_response.body


async def test_no_endpoints_is_503() -> None:
    async with ExtProcHarness([], LeastWaitingScheduler()) as h:
        r = await rejected(h, [request_headers(), request_body(CHAT, True)])
    assert r.immediate_response.status.code == 503
    assert immediate_headers(r)["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"


async def test_scheduling_error_status_and_reason_are_forwarded() -> None:
    scheduler = LeastWaitingScheduler(
        error=SchedulingError(429, "rejected-saturated", "pool saturated, request sheddable")
    )
    async with ExtProcHarness(three_endpoints(), scheduler) as h:
        r = await rejected(h, [request_headers(), request_body(CHAT, True)])
        assert r.immediate_response.status.code == 429
        assert immediate_headers(r)["x-llm-d-request-dropped-reason"] == "rejected-saturated"
        assert b"saturated" in r.immediate_response.body
        assert h.metrics.request_error_total.labels(model="llama", error_code="429")._value.get()


async def test_crashing_scheduler_is_500_and_stream_survives() -> None:
    class Broken(LeastWaitingScheduler):
        async def schedule(self, request, eps):  # type: ignore[override]
            raise RuntimeError("plugin bug")

    async with ExtProcHarness(three_endpoints(), Broken()) as h:
        r = await rejected(h, [request_headers(), request_body(CHAT, True)])
        assert r.immediate_response.status.code == 500
        # the server keeps serving
        r = await rejected(h, [request_headers(), request_body(CHAT, True)])
        assert r.immediate_response.status.code == 500


async def test_subset_hint_restricts_candidates() -> None:
    scheduler = LeastWaitingScheduler()
    async with ExtProcHarness(three_endpoints(), scheduler) as h:
        out = await h.exchange(
            [request_headers(subset=["10.0.0.1:8000", "10.0.0.3:8000"]), request_body(CHAT, True)],
            expect=2,
        )
        assert header_mutation(out[0])["x-gateway-destination-endpoint"] == "10.0.0.3:8000"
        assert scheduler.candidates[0] == ["10.0.0.1:8000", "10.0.0.3:8000"]
        assert scheduler.scheduled[0].subset_hint == frozenset({"10.0.0.1:8000", "10.0.0.3:8000"})
        r = await rejected(h, [request_headers(subset=["10.9.9.9:1"]), request_body(CHAT, True)])
        assert r.immediate_response.status.code == 503
        assert b"subset hint" in r.immediate_response.body


async def test_trailers_end_the_body() -> None:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    async with ExtProcHarness(three_endpoints(), LeastWaitingScheduler()) as h:
        out = await h.exchange(
            [
                request_headers(),
                request_body(CHAT, False),
                pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
            ],
            expect=3,
        )
    assert [r.WhichOneof("response") for r in out] == [
        "request_headers",
        "request_body",
        "request_trailers",
    ]
    assert reemitted(out[1:2]) == (CHAT, [False])


async def test_buffered_mode_decision_rides_on_the_body_answer() -> None:
    buffered = processing_mode_pb2.ProcessingMode.BUFFERED
    scheduler = LeastWaitingScheduler()
    async with ExtProcHarness(three_endpoints(), scheduler) as h:
        out = await h.exchange(
            [
                request_headers(body_mode=buffered),
                request_body(CHAT, True),
                response_headers(),
                response_body(b'{"usage": {"prompt_tokens": 3}}', True),
            ],
            expect=4,
        )
    assert not out[0].request_headers.response.HasField("header_mutation")
    common = out[1].request_body.response
    mutation = {o.header.key: o.header.raw_value for o in common.header_mutation.set_headers}
    assert mutation["x-gateway-destination-endpoint"] == b"10.0.0.2:8000"
    assert common.clear_route_cache and not common.HasField("body_mutation")
    assert scheduler.scheduled[0].model == "llama"
    assert out[2].WhichOneof("response") == "response_headers"
    assert not out[3].response_body.response.HasField("body_mutation")
    assert scheduler.completed[0].prompt_tokens == 3


async def test_buffered_mode_with_trailers_decides_on_the_body_message() -> None:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    buffered = processing_mode_pb2.ProcessingMode.BUFFERED
    async with ExtProcHarness(three_endpoints(), LeastWaitingScheduler()) as h:
        out = await h.exchange(
            [
                request_headers(body_mode=buffered),
                request_body(CHAT, False),  # the whole body; trailers follow
                pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
            ],
            expect=3,
        )
    assert [r.WhichOneof("response") for r in out] == [
        "request_headers",
        "request_body",
        "request_trailers",
    ]
    common = out[1].request_body.response
    assert common.clear_route_cache and common.header_mutation.set_headers


async def test_streamed_mode_decides_on_headers_and_continues_bodies() -> None:
    streamed = processing_mode_pb2.ProcessingMode.STREAMED
    scheduler = LeastWaitingScheduler()
    async with ExtProcHarness(three_endpoints(), scheduler) as h:
        out = await h.exchange(
            [request_headers(body_mode=streamed), request_body(CHAT, True)], expect=2
        )
    assert header_mutation(out[0])["x-gateway-destination-endpoint"] == "10.0.0.2:8000"
    assert not out[1].request_body.response.HasField("body_mutation")
    assert scheduler.scheduled[0].model == ""  # headers-only view


SSE = [
    b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,',
    b'"prompt_tokens_details":{"cached_tokens":8}}}\n\ndata: [DONE]\n\n',
]


async def test_streamed_response_passes_through_and_reports_usage() -> None:
    scheduler = LeastWaitingScheduler()
    async with ExtProcHarness(three_endpoints(), scheduler) as h:
        messages = [
            request_headers(),
            request_body(CHAT, True),
            response_headers(content_type="text/event-stream", served="10.0.0.3:8000"),
        ]
        messages += [response_body(c, i == len(SSE) - 1) for i, c in enumerate(SSE)]
        out = await h.exchange(messages, expect=2 + 1 + len(SSE))
        passed = [r.response_body.response.body_mutation.streamed_response for r in out[3:]]
        assert [p.body for p in passed] == SSE
        assert [p.end_of_stream for p in passed] == [False, False, True]
        assert scheduler.served == ["10.0.0.3:8000"]
        (stats,) = scheduler.completed
        assert stats.served == "10.0.0.3:8000" and stats.status == 200 and stats.streamed
        assert (stats.prompt_tokens, stats.completion_tokens, stats.cached_tokens) == (12, 5, 8)
        assert stats.first_byte_s is not None and stats.duration_s is not None
        labels = {"model": "llama", "target_model": "llama"}
        assert h.metrics.output_tokens.labels(**labels)._value.get() == 5
        assert h.metrics.cached_tokens.labels(**labels)._value.get() == 8
        assert b"llm_d_epp_request_ttft_seconds_count" in h.metrics.render()


async def test_client_disconnect_mid_stream_releases_the_request() -> None:
    scheduler = LeastWaitingScheduler()
    async with ExtProcHarness(three_endpoints(), scheduler) as h:
        call = h.stub().Process()
        for m in [request_headers(), request_body(CHAT, True), response_headers()]:
            await call.write(m)
        for _ in range(3):
            await asyncio.wait_for(call.read(), 10)
        call.cancel()
        await wait_until(lambda: scheduler.completed, what="the completion report")
        assert scheduler.completed[0].status == 499
        await wait_until(lambda: h.metrics.inflight_streams._value.get() == 0)
        assert h.metrics.client_disconnects._value.get() == 1
        # and the server still serves
        out = await h.exchange([request_headers("/v1/models", end_of_stream=True)], expect=1)
        assert out[0].WhichOneof("response") == "request_headers"


class GatedScheduler(LeastWaitingScheduler):
    """Suspends in `schedule` until `gate` is set, like a remote index lookup in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def schedule(self, request, endpoints):
        self.waiting.set()
        await self.gate.wait()
        return await super().schedule(request, endpoints)


async def test_messages_arriving_while_the_decision_waits_are_handled_in_order() -> None:
    scheduler = GatedScheduler()
    async with ExtProcHarness(three_endpoints(), scheduler) as h:
        call = h.stub().Process()
        for m in [request_headers(), request_body(CHAT, True)]:
            await call.write(m)
        await asyncio.wait_for(scheduler.waiting.wait(), 10)
        for m in [response_headers(), response_body(b'{"usage": {"completion_tokens": 3}}', True)]:
            await call.write(m)
        scheduler.gate.set()
        out = [await asyncio.wait_for(call.read(), 10) for _ in range(4)]
        assert [r.WhichOneof("response") for r in out] == [
            "request_headers",
            "request_body",
            "response_headers",
            "response_body",
        ]
        assert header_mutation(out[0])["x-gateway-destination-endpoint"] == "10.0.0.2:8000"
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
        (stats,) = scheduler.completed
        assert stats.status == 200 and stats.completion_tokens == 3


async def test_many_concurrent_streams_on_one_connection() -> None:
    """Envoy multiplexes every request's stream over a few connections."""
    scheduler = LeastWaitingScheduler()
    async with ExtProcHarness(three_endpoints(), scheduler) as h:

        async def one(i: int) -> bytes:
            body = json.dumps({"model": "llama", "prompt": f"request {i} " * (i + 1)}).encode()
            out = await h.exchange(
                [request_headers("/v1/completions"), request_body(body, True)], expect=2
            )
            assert header_mutation(out[0])["x-gateway-destination-endpoint"] == "10.0.0.2:8000"
            return reemitted(out[1:])[0]

        bodies = await asyncio.gather(*(one(i) for i in range(60)))
        assert [json.loads(b)["prompt"] for b in bodies] == [
            f"request {i} " * (i + 1) for i in range(60)
        ]
        assert len(scheduler.scheduled) == 60
