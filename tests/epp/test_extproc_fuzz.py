"""Property: any sequence of ext_proc messages (in any order, with any bodies and modes)
is answered without raising, never gets two decisions, and the scheduler hears about each
scheduled request's end exactly once. Drives RequestStream directly (no gRPC) so hypothesis
can try many sequences quickly; the gRPC path is covered in test_extproc.py."""

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
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.extproc import PickerContext, RequestStream
from epp.metrics import EppMetrics
from epp.requests import RequestParser

MODES = [
    None,
    processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED,
    processing_mode_pb2.ProcessingMode.BUFFERED,
    processing_mode_pb2.ProcessingMode.STREAMED,
    processing_mode_pb2.ProcessingMode.NONE,
]
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()

messages = st.one_of(
    st.builds(
        request_headers,
        path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/messages", "/x"]),
        end_of_stream=st.booleans(),
        body_mode=st.sampled_from(MODES),
        subset=st.none() | st.lists(st.sampled_from(["10.0.0.1:1", "10.0.0.2:1", "9.9.9.9:9"])),
    ),
    st.builds(request_body, st.sampled_from([b"", CHAT, b"{", b"\xff" * 10]), st.booleans()),
    st.just(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())),
    st.builds(
        response_headers,
        status=st.sampled_from([200, 500, 0]),
        content_type=st.sampled_from(["application/json", "text/event-stream", ""]),
        served=st.none() | st.just("10.0.0.1:1"),
    ),
    st.builds(
        response_body,
        st.sampled_from([b"", b'data: {"usage": {"prompt_tokens": 1}}\n', b"\x00{"]),
        st.booleans(),
    ),
    st.just(pb.ProcessingRequest(response_trailers=pb.HttpTrailers())),
    st.just(pb.ProcessingRequest()),
)


@settings(max_examples=300, deadline=None)
@given(sequence=st.lists(messages, max_size=12), max_body=st.sampled_from([10, 1 << 20]))
def test_any_message_sequence_is_handled(
    sequence: list[pb.ProcessingRequest], max_body: int
) -> None:
    scheduler = LeastWaitingScheduler()
    ctx = PickerContext(
        scheduler=scheduler,
        endpoints=lambda: endpoints(("10.0.0.1", 1, 0), ("10.0.0.2", 1, 0)),
        parser=RequestParser(),
        metrics=EppMetrics(),
        max_body_bytes=max_body,
    )

    async def run() -> list[pb.ProcessingResponse]:
        stream = RequestStream(ctx)
        out: list[pb.ProcessingResponse] = []
        try:
            for message in sequence:
                out.extend(await stream.handle(message))
                if stream.done:
                    break
        finally:
            stream.close()
        return out

    out = asyncio.run(run())
    decisions = [
        r
        for r in out
        if r.HasField("dynamic_metadata") or r.WhichOneof("response") == "immediate_response"
    ]
    assert len(decisions) <= 1
    if any(r.WhichOneof("response") == "immediate_response" for r in out):
        assert out[-1].WhichOneof("response") == "immediate_response"
    # Each scheduled request is reported complete exactly once (normally or abandoned).
    assert len(scheduler.scheduled) <= 1
    assert len(scheduler.completed) == len(scheduler.scheduled)
