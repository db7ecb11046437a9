"""The picker's HTTP/2 ext_proc edge at the protocol level, over real loopback sockets.

The client is python-hyper's `h2` (an independent HTTP/2 implementation that checks what we
send: flow control, frame sizes, header rules) or raw frames for what no well-behaved client
sends. Stream semantics (decisions, rejections, response path) are covered for both edges in
test_extproc.py and through a real Envoy in test_envoy_e2e.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc_client import (
    ExtProcHarness,
    LeastWaitingScheduler,
    endpoints,
    request_body,
    request_headers,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.h2edge import frames as f
from tests.metrics import sample
from tests.polling import wait_until_async as wait_until

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi " * 40}]}).encode()


def grpc_headers(path: str = PROCESS, content_type: str = "application/grpc") -> list:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "epp"),
        ("content-type", content_type),
        ("te", "trailers"),
    ]


def messages(*requests: pb.ProcessingRequest) -> bytes:
    return b"".join(f.grpc_message(r.SerializeToString()) for r in requests)


def decode_messages(data: bytes) -> list[pb.ProcessingResponse]:
    reader = f.GrpcMessageReader(1 << 24)
    return [pb.ProcessingResponse.FromString(m) for m in reader.feed(data)]


@pytest.fixture
async def picker() -> AsyncIterator[ExtProcHarness]:
    eps = endpoints(("10.0.0.1", 8000, 0), ("10.0.0.2", 8000, 1))
    async with ExtProcHarness(eps, LeastWaitingScheduler(), server="h2") as harness:
        yield harness


class Client:
    """An h2 client connection; `until` reads and collects events until a predicate holds."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.events: list[h2.events.Event] = []
        self.data: dict[int, bytearray] = {}
        self.auto_ack = True

    @classmethod
    async def connect(cls, port: int, **settings_: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client.conn.initiate_connection()
        if settings_:
            client.conn.update_settings(
                {getattr(h2.settings.SettingCodes, k): v for k, v in settings_.items()}
            )
        await client.flush()
        return client

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def until(self, predicate, timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not predicate():
                chunk = await self.reader.read(1 << 16)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                for event in self.conn.receive_data(chunk):
                    self.events.append(event)
                    if isinstance(event, h2.events.DataReceived):
                        self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                        if self.auto_ack:
                            self.conn.acknowledge_received_data(
                                event.flow_controlled_length, event.stream_id
                            )
                await self.flush()

        await asyncio.wait_for(loop(), timeout)

    def ended(self, stream_id: int) -> bool:
        return any(
            isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
            and e.stream_id == stream_id
            for e in self.events
        )

    def trailers(self, stream_id: int) -> dict[str, str]:
        out: dict[str, str] = {}
        for e in self.events:
            headers = isinstance(e, h2.events.TrailersReceived | h2.events.ResponseReceived)
            if headers and e.stream_id == stream_id:
                out.update(dict(e.headers))
        return out

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def decision_stream(client: Client, body: bytes = CHAT, **send: object) -> int:
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, grpc_headers())
    client.conn.send_data(sid, messages(request_headers(), request_body(body, True)), **send)
    await client.flush()
    return sid


async def test_decision_then_ok_trailers_over_h2(picker: ExtProcHarness) -> None:
    client = await Client.connect(picker.port)
    sid = await decision_stream(client)
    await client.until(lambda: len(decode_messages(bytes(client.data.get(sid, b"")))) >= 2)
    decision, body = decode_messages(bytes(client.data[sid]))
    mutation = decision.request_headers.response.header_mutation.set_headers
    assert {h.header.key: h.header.raw_value for h in mutation}[
        "x-gateway-destination-endpoint"
    ] == b"10.0.0.1:8000"
    assert body.request_body.response.body_mutation.streamed_response.body == CHAT
    client.conn.end_stream(sid)
    await client.flush()
    await client.until(lambda: client.ended(sid))
    assert client.trailers(sid)["grpc-status"] == "0"
    await client.close()
    await wait_until(lambda: sample(picker.metrics, "llm_d_epp_inflight_streams") == 0)


async def send_completion(client: Client, body: bytes, body_chunk: int) -> int:
    """A /v1/completions ext_proc stream with `body` in request_body messages of at most
    `body_chunk` bytes, sent in 16,000-byte DATA frames; returns the stream id."""
    sid: int = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, grpc_headers())
    payload = messages(
        request_headers(path="/v1/completions"),
        *[
            request_body(body[i : i + body_chunk], i + body_chunk >= len(body))
            for i in range(0, len(body), body_chunk)
        ],
    )
    for i in range(0, len(payload), 16000):
        client.conn.send_data(sid, payload[i : i + 16000])
    await client.flush()
    return sid


def reemitted(client: Client, sid: int) -> bytes:
    """The request body the picker has sent back on stream `sid` so far."""
    out = decode_messages(bytes(client.data.get(sid, b"")))
    return b"".join(r.request_body.response.body_mutation.streamed_response.body for r in out)


async def test_small_client_window_and_frames_are_respected(picker: ExtProcHarness) -> None:
    """h2 raises if we overrun its window or frame size; the 200 KB body re-emission must
    wait for credit and still arrive intact."""
    client = await Client.connect(picker.port, INITIAL_WINDOW_SIZE=1000, MAX_FRAME_SIZE=16384)
    await client.until(
        lambda: any(isinstance(e, h2.events.SettingsAcknowledged) for e in client.events)
    )
    big = json.dumps({"model": "m", "prompt": "x" * 200_000}).encode()
    sid = await send_completion(client, big, body_chunk=16384)
    await client.until(lambda: reemitted(client, sid) == big)
    await client.close()


async def test_large_windows_and_small_frames_are_respected(picker: ExtProcHarness) -> None:
    """With the windows wide open, replies are framed straight from the messages (no
    intermediate copies); h2 checks every frame against the 16 KiB frame size."""
    client = await Client.connect(picker.port, INITIAL_WINDOW_SIZE=1 << 30, MAX_FRAME_SIZE=16384)
    client.conn.increment_flow_control_window(1 << 30)
    await client.flush()
    big = json.dumps({"model": "m", "prompt": "y" * 150_001}).encode()
    # Our SETTINGS and connection credit let it send the whole body at once.
    await client.until(lambda: client.conn.outbound_flow_control_window > 2 * len(big))
    sid = await send_completion(client, big, body_chunk=len(big))
    await client.until(lambda: reemitted(client, sid) == big)
    sizes = [
        e.flow_controlled_length
        for e in client.events
        if isinstance(e, h2.events.DataReceived) and e.stream_id == sid
    ]
    assert max(sizes) == 16384 and len(sizes) >= len(big) // 16384
    await client.close()


async def test_unknown_method_and_non_grpc_requests_are_refused(picker: ExtProcHarness) -> None:
    client = await Client.connect(picker.port)
    unknown = client.conn.get_next_available_stream_id()
    client.conn.send_headers(unknown, grpc_headers(path="/pkg.Svc/Nope"), end_stream=True)
    plain = client.conn.get_next_available_stream_id()
    client.conn.send_headers(plain, grpc_headers(content_type="text/plain"), end_stream=True)
    await client.flush()
    await client.until(lambda: all(client.ended(s) for s in (unknown, plain)))
    assert client.trailers(unknown)["grpc-status"] == "12"
    assert "/pkg.Svc/Nope" in client.trailers(unknown)["grpc-message"]
    assert client.trailers(plain)[":status"] == "415"
    # the connection is still good
    sid = await decision_stream(client)
    await client.until(lambda: len(decode_messages(bytes(client.data.get(sid, b"")))) >= 2)
    await client.close()


async def test_bad_messages_end_their_stream_only(picker: ExtProcHarness) -> None:
    client = await Client.connect(picker.port)
    garbage = client.conn.get_next_available_stream_id()
    client.conn.send_headers(garbage, grpc_headers())
    client.conn.send_data(garbage, b"\x00\x00\x00\x00\x03\xff\xff\xff")
    compressed = client.conn.get_next_available_stream_id()
    client.conn.send_headers(compressed, grpc_headers())
    client.conn.send_data(compressed, b"\x01\x00\x00\x00\x01\x00")
    cut = client.conn.get_next_available_stream_id()
    client.conn.send_headers(cut, grpc_headers())
    client.conn.send_data(cut, b"\x00\x00\x00\x10\x00abc", end_stream=True)
    await client.flush()
    await client.until(lambda: all(client.ended(s) for s in (garbage, compressed, cut)))
    assert client.trailers(garbage)["grpc-status"] == "13"
    assert client.trailers(compressed)["grpc-status"] == "12"
    assert client.trailers(cut)["grpc-status"] == "13"
    assert sample(picker.metrics, "llm_d_epp_skipped_total", what="extproc_bad_message") == 2
    sid = await decision_stream(client, pad_length=7)  # padded DATA too
    await client.until(lambda: len(decode_messages(bytes(client.data.get(sid, b"")))) >= 2)
    await client.close()


async def test_client_reset_releases_the_request(picker: ExtProcHarness) -> None:
    client = await Client.connect(picker.port)
    sid = await decision_stream(client)
    await client.until(lambda: len(decode_messages(bytes(client.data.get(sid, b"")))) >= 2)
    client.conn.reset_stream(sid, error_code=f.CANCEL)
    ping = b"12345678"
    client.conn.ping(ping)
    await client.flush()
    await client.until(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in client.events))
    await wait_until(lambda: len(picker.scheduler.completed) == 1)
    assert picker.scheduler.completed[0].status == 499
    assert sample(picker.metrics, "llm_d_epp_inflight_streams") == 0
    await client.close()


async def raw_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f.PREFACE + f.frame(f.SETTINGS, 0, 0))
    await writer.drain()
    return reader, writer


async def read_frames(reader: asyncio.StreamReader, stop) -> list[f.Frame]:
    parser = f.FrameReader(f.MAX_FRAME_LIMIT)
    seen: list[f.Frame] = []

    async def loop() -> None:
        while not stop(seen):
            chunk = await reader.read(1 << 16)
            if not chunk:
                return
            seen.extend(parser.feed(chunk))

    await asyncio.wait_for(loop(), 10)
    return seen


async def test_header_block_split_over_continuation_frames(picker: ExtProcHarness) -> None:
    reader, writer = await raw_connection(picker.port)
    block = hpack.Encoder().encode(grpc_headers())
    half = len(block) // 2
    writer.write(
        f.frame(f.HEADERS, 0, 1, block[:half])
        + f.frame(f.CONTINUATION, f.END_HEADERS, 1, block[half:])
        + f.frame(f.DATA, 0, 1, messages(request_headers(), request_body(CHAT, True)))
    )
    await writer.drain()
    data = bytearray()

    def got_two(seen: list[f.Frame]) -> bool:
        data[:] = b"".join(x.payload for x in seen if x.type == f.DATA and x.stream_id == 1)
        return len(decode_messages(bytes(data))) >= 2

    await read_frames(reader, got_two)
    assert decode_messages(bytes(data))[0].HasField("request_headers")
    writer.close()


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", f.PROTOCOL_ERROR),
        (f.PREFACE + f.frame(f.DATA, 0, 0, b"x"), f.PROTOCOL_ERROR),
        (
            f.PREFACE + f.frame(f.HEADERS, f.END_HEADERS, 1, b"\xff\xff\xff\xff"),
            f.COMPRESSION_ERROR,
        ),
        (f.PREFACE + f.frame(f.SETTINGS, 0, 0, b"\x00\x04"), f.FRAME_SIZE_ERROR),
        (f.PREFACE + f.frame(f.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), f.PROTOCOL_ERROR),
        (
            f.PREFACE + f.frame(f.HEADERS, 0, 1, b"\x83") + f.frame(f.PING, 0, 0, b"1" * 8),
            f.PROTOCOL_ERROR,
        ),
    ],
    ids=[
        "http1",
        "data-on-0",
        "bad-hpack",
        "short-settings",
        "zero-window-update",
        "interrupted-headers",
    ],
)
async def test_protocol_errors_close_with_goaway_and_are_counted(
    picker: ExtProcHarness, wire: bytes, code: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", picker.port)
    writer.write(wire)
    await writer.drain()
    seen = await read_frames(reader, lambda s: any(x.type == f.GOAWAY for x in s))
    goaway = next(x for x in seen if x.type == f.GOAWAY)
    assert int.from_bytes(goaway.payload[4:8], "big") == code
    assert await reader.read() == b""  # and the connection is closed
    writer.close()
    assert sample(picker.metrics, "llm_d_epp_skipped_total", what="extproc_h2_protocol_error") == 1
    client = await Client.connect(picker.port)  # the server itself is fine
    sid = await decision_stream(client)
    await client.until(lambda: len(decode_messages(bytes(client.data.get(sid, b"")))) >= 2)
    await client.close()


_frames = st.tuples(
    st.integers(0, 12),  # types, including unknown ones
    st.integers(0, 255),
    st.sampled_from([0, 1, 3, 5, 2, 0x7FFF_FFFF]),
    st.binary(max_size=64),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    frames_=st.lists(_frames, max_size=8),
    with_stream=st.booleans(),
)
async def test_arbitrary_frames_never_break_the_server(
    picker: ExtProcHarness, frames_: list[tuple[int, int, int, bytes]], with_stream: bool
) -> None:
    """Whatever frames follow the preface, the server answers or closes the connection with
    GOAWAY, never crashes, and leaks no stream once the client is gone."""
    reader, writer = await raw_connection(picker.port)
    wire = b""
    if with_stream:
        block = hpack.Encoder().encode(grpc_headers())
        wire += f.frame(f.HEADERS, f.END_HEADERS, 1, block)
        wire += f.frame(f.DATA, 0, 1, messages(request_headers()))
    wire += b"".join(f.frame(t, fl, sid, payload) for t, fl, sid, payload in frames_)
    writer.write(wire + f.frame(f.PING, 0, 0, b"pingpong"))
    await writer.drain()
    # Either the PING is answered (the connection lives on) or a GOAWAY ends it.
    await read_frames(
        reader,
        lambda s: any(
            x.type == f.GOAWAY
            or (x.type == f.PING and x.flags & f.ACK and x.payload == b"pingpong")
            for x in s
        ),
    )
    writer.close()
    await writer.wait_closed()
    await wait_until(lambda: sample(picker.metrics, "llm_d_epp_inflight_streams") == 0)
    client = await Client.connect(picker.port)
    sid = await decision_stream(client)
    await client.until(lambda: len(decode_messages(bytes(client.data.get(sid, b"")))) >= 2)
    await client.close()


async def test_a_scheduled_request_can_be_evicted_unasked(picker: ExtProcHarness) -> None:
    """Flow control's in-flight eviction: after its decision, the stream gets an immediate
    response (429 `evicted` with the dropped-reason header) without Envoy asking, ends with
    grpc-status 0, and the request is reported finished (abandoned); once ended it cannot
    be evicted again."""
    client = await Client.connect(picker.port)
    sid = await decision_stream(client)
    await client.until(lambda: len(decode_messages(bytes(client.data.get(sid, b"")))) >= 2)
    (request,) = picker.scheduler.scheduled
    assert request.evict is not None
    assert request.evict(429, "evicted", "room for a higher priority")
    await client.until(lambda: client.ended(sid))
    answer = decode_messages(bytes(client.data[sid]))[-1].immediate_response
    assert answer.status.code == 429
    headers = {h.header.key: h.header.raw_value for h in answer.headers.set_headers}
    assert headers["x-llm-d-request-dropped-reason"] == b"evicted"
    assert client.trailers(sid)["grpc-status"] == "0"
    await wait_until(lambda: len(picker.scheduler.completed) == 1)
    assert picker.scheduler.completed[0].status == 499  # abandoned: not a served response
    assert request.evict is None  # the stream ended: no reference to it is left
    await client.close()
    await wait_until(lambda: sample(picker.metrics, "llm_d_epp_inflight_streams") == 0)


@pytest.mark.parametrize("server, evictable", [("h2", False), ("grpcio", True)])
async def test_requests_are_not_evictable_without_the_option_or_on_grpcio(
    server: str, evictable: bool
) -> None:
    """`--no-flow-control-in-flight-eviction` (PickerContext.evictable False) and the grpcio
    edge, which cannot answer a stream unasked: no request carries `evict`."""
    eps = endpoints(("10.0.0.1", 8000, 0))
    scheduler = LeastWaitingScheduler()
    async with ExtProcHarness(eps, scheduler, server=server, evictable=evictable) as harness:
        client = await Client.connect(harness.port)
        sid = await decision_stream(client)
        await client.until(lambda: len(decode_messages(bytes(client.data.get(sid, b"")))) >= 2)
        assert scheduler.scheduled[0].evict is None
        await client.close()
