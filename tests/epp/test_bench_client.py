"""The benchmarks' lean HTTP/2 ext_proc client (benchmarks/h2client.py) against the picker's
h2 edge, plaintext and TLS, over loopback: the decision it times is the real first
response, concurrent streams all complete, and errors surface instead of hanging. The
benchmark's latency and throughput figures rest on it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from benchmarks.extproc import FirstEndpointScheduler, request_messages
from benchmarks.h2client import ExtProcClient, ProtocolError
from epp.extproc import PickerContext
from epp.extproc_wire import DESTINATION_HEADER, MAX_CHUNK_BYTES
from epp.h2edge.server import H2ExtProcServer, server_ssl_context
from epp.metrics import EppMetrics
from epp.requests import RequestParser
from epp.tls import self_signed_certificate
from epp.types import Endpoint


def body(chars: int) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "x" * chars}]}
    ).encode()


def payloads(chars: int) -> list[bytes]:
    return [m.SerializeToString() for m in request_messages(body(chars))]


async def serve(tls: bool) -> tuple[H2ExtProcServer, int, bytes | None]:
    eps = [Endpoint("10.0.0.7", 8000)]
    ctx = PickerContext(FirstEndpointScheduler(), lambda: eps, RequestParser(), EppMetrics())
    cert: bytes | None = None
    context = None
    if tls:
        cert, key = self_signed_certificate()
        context = server_ssl_context(cert, key)
    server = H2ExtProcServer(ctx, health=lambda service: None, ssl_context=context)
    port = await server.bind("127.0.0.1", 0)
    await server.start_serving()
    return server, port, cert


def destination(messages: Sequence[bytes]) -> str:
    first = pb.ProcessingResponse.FromString(messages[0])
    assert first.HasField("request_headers")
    headers = first.request_headers.response.header_mutation.set_headers
    return next(h.header.raw_value.decode() for h in headers if h.header.key == DESTINATION_HEADER)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_one_stream_times_the_decision_and_reads_the_body_back(tls: bool) -> None:
    server, port, cert = await serve(tls)
    try:

        def run() -> list[tuple[float, float, list[bytes]]]:
            client = ExtProcClient("127.0.0.1", port, root_certificates=cert)
            try:
                # 150 KB: several DATA frames and, on the way back, three body chunks.
                return [
                    (r.decision_s, r.full_s, r.messages)
                    for r in (client.stream(payloads(n)) for n in (100, 150_000, 100))
                ]
            finally:
                client.close()

        results = await asyncio.to_thread(run)
    finally:
        await server.stop()
    for decision_s, full_s, messages in results:
        assert 0 < decision_s <= full_s
        assert destination(messages) == "10.0.0.7:8000"
    big = [pb.ProcessingResponse.FromString(m) for m in results[1][2][1:]]
    chunks = [r.request_body.response.body_mutation.streamed_response for r in big]
    assert b"".join(c.body for c in chunks) == body(150_000)
    assert len(chunks) == -(-len(body(150_000)) // MAX_CHUNK_BYTES)
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]


async def test_concurrent_streams_all_complete() -> None:
    server, port, _ = await serve(False)
    try:

        def run() -> tuple[float, list[float]]:
            client = ExtProcClient("127.0.0.1", port)
            try:
                return client.concurrent(lambda i: payloads(1000 + 10 * i), 60, 8)
            finally:
                client.close()

        wall, latencies = await asyncio.to_thread(run)
    finally:
        await server.stop()
    assert len(latencies) == 60
    assert all(0 < t <= wall for t in latencies)


async def test_a_failed_stream_is_an_error_not_a_hang() -> None:
    server, port, _ = await serve(False)
    try:

        def run() -> None:
            client = ExtProcClient("127.0.0.1", port)
            try:
                # Not a ProcessingRequest: the edge ends the stream with a grpc-status.
                client.stream([b"\xff\xff\xff"])
            finally:
                client.close()

        with pytest.raises(ProtocolError, match="grpc-status"):
            await asyncio.wait_for(asyncio.to_thread(run), 10)
    finally:
        await server.stop()
