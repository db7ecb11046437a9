"""One HTTP/2 connection from Envoy (or any gRPC client) to the picker's ext_proc port.

Serves `envoy.service.ext_proc.v3.ExternalProcessor/Process` (bidirectional streaming, each
stream driven by the same `RequestStream` state machine as the grpcio servicer) and the
unary `grpc.health.v1.Health/Check`; any other method gets UNIMPLEMENTED.

Why not grpcio: its Python server costs ~1.3 ms of CPU per ext_proc stream on our 2-core
machines before the picker does any work (benchmarks/RESULTS.md, "ext_proc edge"), about
three quarters of a decision. Here a stream is a few frames parsed in one pass per read, its
handler stepped in place (the in-process scheduler never suspends, so no task per stream),
and all replies of a read written with one `transport.write`.

Flow control: we advertise a large window and credit the peer for every DATA byte as soon
as it is buffered (bodies are bounded by `max_message`); outbound DATA respects the peer's
connection and stream windows and its maximum frame size, queueing the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import hpack  # type: ignore[import-untyped]
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2

from epp.extproc import PickerContext, RequestStream
from epp.framework.eager import Resume
from epp.h2edge import frames as f

log = logging.getLogger(__name__)

PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK_PATH = b"/grpc.health.v1.Health/Check"
HEALTH_WATCH_PATH = b"/grpc.health.v1.Health/Watch"

# What we advertise: windows large enough that Envoy never waits for our credit.
RECEIVE_WINDOW = 16 << 20
MAX_FRAME_SIZE = 1 << 20
MAX_HEADER_LIST_SIZE = 64 << 10

_RESPONSE_HEADERS = f.encode_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
_OK_TRAILERS = f.encode_headers([(b"grpc-status", b"0")])

# grpc status codes used here
UNIMPLEMENTED = 12
INTERNAL = 13
NOT_FOUND = 5
SERVICE_UNKNOWN = 3  # grpc.health.v1 ServingStatus

_HEADER_CACHE_SIZE = 64


def _same_table(a: tuple[int, Any], b: tuple[int, Any]) -> bool:
    # The first entry is compared by identity: a new entry is a new tuple.
    return a[0] == b[0] and a[1] is b[1]


def _trailers_only(status: int, message: str) -> bytes:
    """A gRPC trailers-only response: status, content type and grpc-status in one block."""
    return f.encode_headers(
        [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(status).encode()),
            (b"grpc-message", f.percent_encode(message)),
        ]
    )


HealthLookup = Callable[[str], int | None]  # service name -> ServingStatus, None if unknown


class _Stream:
    __slots__ = (
        "backlog",
        "busy",
        "headers_sent",
        "id",
        "kind",
        "local_closed",
        "pending",
        "pending_trailers",
        "reader",
        "received",
        "remote_closed",
        "send_window",
        "state",
        "unary",
        "watch_sent",
        "watched",
    )

    def __init__(self, stream_id: int, kind: str, send_window: int, max_message: int) -> None:
        self.id = stream_id
        self.kind = kind  # "process" | "health" | "watch"
        self.send_window = send_window
        self.reader = f.GrpcMessageReader(max_message)
        self.state: RequestStream | None = None
        self.headers_sent = False
        self.remote_closed = False
        self.local_closed = False
        self.busy = False  # a handler coroutine is suspended; messages wait in backlog
        self.backlog: list[bytes | memoryview] = []
        self.pending = bytearray()  # DATA payload waiting for flow-control window
        self.pending_trailers: bytes | None = None
        self.unary: bytes | memoryview | None = None
        self.received = 0  # DATA bytes not yet credited back to the client
        # Health/Watch: the service watched (None until the request arrived) and the last
        # status sent for it.
        self.watched: str | None = None
        self.watch_sent: int | None = None


class H2Connection(asyncio.BufferedProtocol):
    # Reads land in one buffer per connection (BufferedProtocol): the transport fills it
    # with recv_into, and asyncio's TLS layer decrypts every pending record into it in one
    # pass, instead of allocating a 256 KiB bytes object per read (per TLS record with TLS).
    # Frames are copied out of it as they are parsed, so it is free again after each read.
    READ_BUFFER = 256 << 10

    def __init__(
        self,
        ctx: PickerContext,
        health: HealthLookup,
        on_close: Callable[[H2Connection], None],
        max_message: int,
        serve_process: bool = True,
    ) -> None:
        self.ctx = ctx
        self.health = health
        self.serve_process = serve_process  # False on the health port: Health only
        self._on_close = on_close
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        self.reader = f.FrameReader(MAX_FRAME_SIZE)
        self._read_view = memoryview(bytearray(self.READ_BUFFER))
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
        # hpack keeps its dynamic table in a deque; every change adds at the left or evicts
        # (shortens), so (length, first entry) tells whether it changed. None: unknown
        # hpack internals, no cache.
        self._table_entries: Any = getattr(
            getattr(self.decoder, "header_table", None), "dynamic_entries", None
        )
        self._header_cache: dict[bytes, tuple[tuple[int, Any], list[tuple[bytes, bytes]]]] = {}
        self._preface = b""
        self._preface_ok = False
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0
        self._out: list[bytes | memoryview] = []
        self._continuation: tuple[int, int, list[bytes]] | None = None  # stream, flags, parts
        # peer's settings
        self.peer_window = f.DEFAULT_WINDOW  # connection send window
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self._table_size_update = True  # next header block starts with a size update to 0
        self._blocked: dict[int, _Stream] = {}
        self._unacked = 0  # connection-level bytes received and not yet credited back
        self.goaway_sent = False
        self.closed = False
        self.idle = asyncio.Event()
        self.idle.set()

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not asserted to be an asyncio.Transport: uvloop's transports are not subclasses.
        self.transport = transport  # type: ignore[assignment]
        settings = f.settings_payload(
            [
                (f.SETTINGS_MAX_CONCURRENT_STREAMS, 1 << 16),
                (f.SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW),
                (f.SETTINGS_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
                (f.SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
            ]
        )
        self._out.append(f.frame(f.SETTINGS, 0, 0, settings))
        self._out.append(f.window_update(0, RECEIVE_WINDOW - f.DEFAULT_WINDOW))
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes from the peer (`buffer_updated` passes a view of the read buffer, valid
        only during the call: what is kept of it is copied)."""
        if self.closed:
            return
        try:
            if not self._preface_ok:
                data = self._take_preface(data)
                if not data:
                    return
            for fr in self.reader.feed(data):
                self._on_frame(fr)
            self._credit_connection()
        except f.ConnectionError_ as exc:
            self.ctx.metrics.skipped.labels(what="extproc_h2_protocol_error").inc()
            log.info("closing ext_proc connection: %s", exc.reason)
            self._fail(exc.code, exc.reason)
            return
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for stream in list(self.streams.values()):
            self._close_stream(stream)
        self._on_close(self)

    # -- frames -----------------------------------------------------------------------

    def _take_preface(self, data: bytes | memoryview) -> bytes:
        got = self._preface + data
        need = len(f.PREFACE)
        if not f.PREFACE.startswith(got[:need]):
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "not an HTTP/2 client (bad preface)")
        if len(got) < need:
            self._preface = got
            return b""
        self._preface_ok = True
        self._preface = b""
        return got[need:]

    def _on_frame(self, fr: f.Frame) -> None:
        if self._continuation is not None and fr.type != f.CONTINUATION:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "header block interrupted")
        kind = fr.type
        if kind == f.DATA:
            self._on_data(fr)
        elif kind == f.HEADERS:
            self._on_headers(fr)
        elif kind == f.CONTINUATION:
            self._on_continuation(fr)
        elif kind == f.WINDOW_UPDATE:
            self._on_window_update(fr)
        elif kind == f.SETTINGS:
            self._on_settings(fr)
        elif kind == f.PING:
            if fr.stream_id or len(fr.payload) != 8:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "malformed PING")
            if not fr.flags & f.ACK:
                self._out.append(f.frame(f.PING, f.ACK, 0, fr.payload))
        elif kind == f.RST_STREAM:
            if not fr.stream_id or len(fr.payload) != 4:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "malformed RST_STREAM")
            stream = self.streams.get(fr.stream_id)
            if stream is not None:
                self._close_stream(stream)
        elif kind == f.GOAWAY:
            # The peer opens no more streams; ours finish, then it closes the connection.
            pass
        elif kind == f.PUSH_PROMISE:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored (RFC 9113 5.5).

    def _on_settings(self, fr: f.Frame) -> None:
        if fr.stream_id:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if fr.flags & f.ACK:
            return
        for key, value in f.parse_settings(fr.payload):
            if key == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_FRAME_LIMIT:
                    raise f.ConnectionError_(f.PROTOCOL_ERROR, "invalid SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == f.SETTINGS_HEADER_TABLE_SIZE:
                self._table_size_update = True
        self._out.append(f.frame(f.SETTINGS, f.ACK, 0))
        self._flush_blocked()

    def _on_window_update(self, fr: f.Frame) -> None:
        if len(fr.payload) != 4:
            raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = int.from_bytes(fr.payload, "big") & 0x7FFF_FFFF
        if fr.stream_id == 0:
            if increment == 0:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.peer_window += increment
            if self.peer_window > f.MAX_WINDOW:
                raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            stream = self.streams.get(fr.stream_id)
            if stream is None:
                return
            if increment == 0:
                self._reset(stream, f.PROTOCOL_ERROR)
                return
            stream.send_window += increment
            if stream.send_window > f.MAX_WINDOW:
                self._reset(stream, f.FLOW_CONTROL_ERROR)
                return
        self._flush_blocked()

    def _on_headers(self, fr: f.Frame) -> None:
        sid = fr.stream_id
        if sid == 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = f.header_block_fragment(fr)
        if fr.flags & f.END_HEADERS:
            self._on_header_block(sid, fr.flags, fragment)
        else:
            self._continuation = (sid, fr.flags, [fragment])

    def _on_continuation(self, fr: f.Frame) -> None:
        if self._continuation is None or fr.stream_id != self._continuation[0]:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "unexpected CONTINUATION")
        sid, flags, parts = self._continuation
        parts.append(fr.payload)
        if sum(map(len, parts)) > MAX_HEADER_LIST_SIZE:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "header block too large")
        if fr.flags & f.END_HEADERS:
            self._continuation = None
            self._on_header_block(sid, flags, b"".join(parts))

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """HPACK-decode `block`. Envoy sends the same block for every ext_proc stream (its
        fields indexed or literal without indexing), so a block that left the dynamic table
        as it was is remembered with the table's state and reused while that state holds."""
        if self._table_entries is None:
            return self._decode_fully(block)
        state = self._table_state()
        cached = self._header_cache.get(block)
        if cached is not None and _same_table(cached[0], state):
            return cached[1]
        headers = self._decode_fully(block)
        if _same_table(self._table_state(), state):
            if len(self._header_cache) >= _HEADER_CACHE_SIZE:
                self._header_cache.clear()
            self._header_cache[block] = (state, headers)
        return headers

    def _table_state(self) -> tuple[int, Any]:
        entries = self._table_entries
        return len(entries), (entries[0] if entries else None)

    def _decode_fully(self, block: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return list(self.decoder.decode(block, raw=True))
        except Exception as exc:  # hpack raises several types; all break the shared table
            raise f.ConnectionError_(f.COMPRESSION_ERROR, f"bad header block: {exc}") from exc

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)
        end_stream = bool(flags & f.END_STREAM)
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: only END_STREAM matters
            if end_stream:
                self._on_remote_close(stream)
            return
        if sid % 2 == 0 or sid <= self.last_stream_id:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, f"stream {sid} cannot be opened")
        self.last_stream_id = sid
        if self.goaway_sent:
            self._out.append(f.rst_stream(sid, f.REFUSED_STREAM))
            return
        self._open_stream(sid, dict(headers), end_stream)

    def _open_stream(self, sid: int, headers: dict[bytes, bytes], end_stream: bool) -> None:
        path = headers.get(b":path", b"")
        content_type = headers.get(b"content-type", b"")
        if headers.get(b":method") != b"POST" or not content_type.startswith(b"application/grpc"):
            self.ctx.metrics.skipped.labels(what="extproc_not_grpc").inc()
            self._end_stream(sid, f.encode_headers([(b":status", b"415")]), not end_stream)
            return
        if path == PROCESS_PATH and self.serve_process:
            kind = "process"
        elif path == HEALTH_CHECK_PATH:
            kind = "health"
        elif path == HEALTH_WATCH_PATH:
            kind = "watch"
        else:
            self.ctx.metrics.skipped.labels(what="extproc_unknown_method").inc()
            detail = f"method {path.decode('latin-1')} is not served here"
            self._end_stream(sid, _trailers_only(UNIMPLEMENTED, detail), not end_stream)
            return
        stream = _Stream(sid, kind, self.peer_initial_window, self.max_message)
        self.streams[sid] = stream
        self.idle.clear()
        if kind == "process":
            state = stream.state = RequestStream(self.ctx)
            if self.ctx.evictable:
                state.push = lambda responses: self._push(stream, responses)
            self.ctx.stream_opened()
        if end_stream:
            self._on_remote_close(stream)

    def _on_data(self, fr: f.Frame) -> None:
        sid = fr.stream_id
        if sid == 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "DATA on stream 0")
        self._unacked += len(fr.payload)
        if self._unacked > RECEIVE_WINDOW:
            raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "peer overran the connection window")
        stream = self.streams.get(sid)
        if stream is None or stream.remote_closed:
            if sid > self.last_stream_id:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we closed; its bytes still count (credited above)
        data = f.strip_padding(fr)
        # Bytes are buffered at once (bounded by max_message), so credit them back once half
        # the stream window is used: a long streamed response never stalls.
        stream.received += len(fr.payload)
        if stream.received >= RECEIVE_WINDOW // 2:
            self._out.append(f.window_update(sid, stream.received))
            stream.received = 0
        try:
            messages = stream.reader.feed(data) if data else []
        except f.GrpcMessageError as exc:
            self.ctx.metrics.skipped.labels(what="extproc_bad_message").inc()
            self._finish(stream, exc.status, exc.message)
            return
        for message in messages:
            self._on_message(stream, message)
            if stream.local_closed:
                return
        if fr.flags & f.END_STREAM:
            self._on_remote_close(stream)

    def _credit_connection(self) -> None:
        # Credit the connection once half the window is used: one frame per many requests.
        if self._unacked >= RECEIVE_WINDOW // 2:
            self._out.append(f.window_update(0, self._unacked))
            self._unacked = 0

    # -- streams ----------------------------------------------------------------------

    def _on_message(self, stream: _Stream, raw: bytes | memoryview) -> None:
        if stream.kind == "health":
            stream.unary = raw
            return
        if stream.kind == "watch":
            if stream.watched is None:
                self._start_watch(stream, raw)
            return
        if stream.busy:
            stream.backlog.append(raw)
            return
        self._handle(stream, raw)

    def _handle(self, stream: _Stream, raw: bytes | memoryview) -> None:
        try:
            message = pb.ProcessingRequest.FromString(raw)
        except DecodeError:
            self.ctx.metrics.skipped.labels(what="extproc_bad_message").inc()
            self._finish(stream, INTERNAL, "malformed ProcessingRequest")
            return
        assert stream.state is not None
        coro = stream.state.handle(message)
        try:
            pending = coro.send(None)
        except StopIteration as done:
            self._deliver(stream, done.value)
            return
        except Exception as exc:
            self._handler_failed(stream, exc)
            return
        # The handler awaits something real (a remote index): finish it in a task; later
        # messages of this stream wait so that they are handled in order.
        stream.busy = True
        task = asyncio.ensure_future(Resume(coro, pending))
        task.add_done_callback(lambda t: self._resumed(stream, t))

    def _resumed(self, stream: _Stream, task: asyncio.Future[Any]) -> None:
        stream.busy = False
        if self.closed or stream.local_closed:
            return
        if task.cancelled():
            self._finish(stream, INTERNAL, "handler cancelled")
        elif task.exception() is not None:
            self._handler_failed(stream, task.exception())  # type: ignore[arg-type]
        else:
            self._deliver(stream, task.result())
        while stream.backlog and not stream.busy and not stream.local_closed:
            self._handle(stream, stream.backlog.pop(0))
        if stream.remote_closed and not stream.busy and not stream.local_closed:
            self._finish(stream, 0, "")
        self._flush()

    def _handler_failed(self, stream: _Stream, exc: BaseException) -> None:
        log.error("ext_proc stream handler failed", exc_info=exc)
        self._finish(stream, INTERNAL, f"picker error: {exc!r}")

    def _deliver(self, stream: _Stream, responses: list[pb.ProcessingResponse]) -> None:
        if responses:
            self._send_messages(stream, [r.SerializeToString() for r in responses])
        assert stream.state is not None
        if stream.state.done:
            self._finish(stream, 0, "")

    def _push(self, stream: _Stream, responses: list[pb.ProcessingResponse]) -> bool:
        """Send `responses` on `stream` unasked, outside any message's handling (flow
        control's in-flight eviction), and end it if its state says so. False when the
        stream is gone or a handler of it is still running."""
        if self.closed or stream.local_closed or stream.busy:
            return False
        self._deliver(stream, responses)
        self._flush()
        return True

    def _on_remote_close(self, stream: _Stream) -> None:
        stream.remote_closed = True
        if stream.reader.partial:
            self._finish(stream, INTERNAL, "stream ended inside a message")
        elif stream.kind == "health":
            self._answer_health(stream)
        elif stream.kind == "watch":
            if stream.watched is None:  # the client half-closed without a request
                self._start_watch(stream, b"")
        elif not stream.busy:
            self._finish(stream, 0, "")

    def _answer_health(self, stream: _Stream) -> None:
        try:
            request = health_pb2.HealthCheckRequest.FromString(stream.unary or b"")
        except DecodeError:
            self._finish(stream, INTERNAL, "malformed HealthCheckRequest")
            return
        status = self.health(request.service)
        if status is None:
            self._finish(stream, NOT_FOUND, f"unknown service {request.service!r}")
            return
        reply = health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
        self._send_messages(stream, [reply.SerializeToString()])
        self._finish(stream, 0, "")

    def _start_watch(self, stream: _Stream, raw: bytes | memoryview) -> None:
        """Health/Watch: the current status at once, then each change (`notify_watchers`),
        until the client cancels or the server stops. An unknown service is reported as
        SERVICE_UNKNOWN and watched all the same (grpc.health.v1 semantics)."""
        try:
            request = health_pb2.HealthCheckRequest.FromString(raw)
        except DecodeError:
            self._finish(stream, INTERNAL, "malformed HealthCheckRequest")
            return
        stream.watched = request.service
        self._send_watch(stream)

    def _send_watch(self, stream: _Stream) -> None:
        assert stream.watched is not None
        status = self.health(stream.watched)
        if status is None:
            status = SERVICE_UNKNOWN
        if status == stream.watch_sent:
            return
        stream.watch_sent = status
        reply = health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
        self._send_messages(stream, [reply.SerializeToString()])

    def notify_watchers(self, service: str) -> None:
        """The status of `service` may have changed: tell its watchers on this connection."""
        if self.closed:
            return
        for stream in list(self.streams.values()):
            if stream.kind == "watch" and stream.watched == service and not stream.local_closed:
                self._send_watch(stream)
        self._flush()

    def end_watches(self) -> None:
        """End every Health/Watch stream (OK): a draining server has no more to say."""
        if self.closed:
            return
        for stream in list(self.streams.values()):
            if stream.kind == "watch":
                self._finish(stream, 0, "")
        self._flush()

    # -- sending ----------------------------------------------------------------------

    def _header_block(self, encoded: bytes) -> bytes:
        """`encoded` as the next header block on the wire: called when the block is
        emitted, so a pending table size update leads the first block sent after it."""
        if self._table_size_update:
            self._table_size_update = False
            return f.TABLE_SIZE_ZERO + encoded
        return encoded

    def _send_messages(self, stream: _Stream, payloads: list[bytes]) -> None:
        if stream.local_closed:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            block = self._header_block(_RESPONSE_HEADERS)
            self._out.append(f.frame(f.HEADERS, f.END_HEADERS, stream.id, block))
        parts: list[bytes] = []
        for payload in payloads:
            parts += (f.grpc_prefix(len(payload)), payload)
        if stream.pending:
            stream.pending += b"".join(parts)
            return
        self._send_data(stream, parts)

    def _send_data(self, stream: _Stream, parts: list[bytes]) -> None:
        """`parts`, one after the other, in DATA frames within the peer's windows and frame
        size; what does not fit waits in `stream.pending`. Frame headers and views of the
        parts go to the output list as they are, so the one join in `_flush` is the only
        copy (a re-emitted 41 KB body would otherwise be copied four more times)."""
        out = self._out
        sid = stream.id
        left = sum(map(len, parts))  # bytes not yet given a frame
        room = 0  # bytes the current frame still takes
        for i, part in enumerate(parts):
            view = memoryview(part)
            pos, size = 0, len(view)
            while pos < size:
                if room == 0:
                    room = min(self.peer_window, stream.send_window, self.peer_max_frame, left)
                    if room <= 0:
                        stream.pending += view[pos:]
                        for rest in parts[i + 1 :]:
                            stream.pending += rest
                        self._blocked[sid] = stream
                        return
                    out.append(f.frame_header(f.DATA, 0, sid, room))
                    self.peer_window -= room
                    stream.send_window -= room
                    left -= room
                take = min(room, size - pos)
                out.append(view[pos : pos + take])
                pos += take
                room -= take

    def _flush_blocked(self) -> None:
        for sid, stream in list(self._blocked.items()):
            data = bytes(stream.pending)
            stream.pending = bytearray()
            del self._blocked[sid]
            self._send_data(stream, [data])
            if not stream.pending and stream.pending_trailers is not None:
                self._end_stream(sid, stream.pending_trailers, not stream.remote_closed)
                stream.pending_trailers = None
                self._close_stream(stream)

    def _end_stream(self, sid: int, block: bytes, client_sending: bool) -> None:
        """The stream's last HEADERS (END_STREAM), then RST_STREAM(NO_ERROR) if the client
        is still sending (RFC 9113 8.1)."""
        block = self._header_block(block)
        self._out.append(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, block))
        if client_sending:
            self._out.append(f.rst_stream(sid, f.NO_ERROR))

    def _finish(self, stream: _Stream, status: int, message: str) -> None:
        """End the stream with grpc-status `status`: trailers-only if nothing was sent,
        else trailers after any DATA still waiting for window."""
        if stream.local_closed:
            return
        stream.local_closed = True
        if not stream.headers_sent:
            block = _trailers_only(status, message)
        elif status == 0:
            block = _OK_TRAILERS
        else:
            fields = [(b"grpc-status", str(status).encode())]
            if message:
                fields.append((b"grpc-message", f.percent_encode(message)))
            block = f.encode_headers(fields)
        if stream.pending:
            stream.pending_trailers = block
            return
        self._end_stream(stream.id, block, not stream.remote_closed)
        self._close_stream(stream)

    def _reset(self, stream: _Stream, code: int) -> None:
        self._out.append(f.rst_stream(stream.id, code))
        self._close_stream(stream)

    def _close_stream(self, stream: _Stream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        self._blocked.pop(stream.id, None)
        stream.local_closed = True
        if stream.state is not None:
            self.ctx.stream_closed()
            stream.state.push = None  # its closure holds this stream: no cycle left behind
            try:
                stream.state.close()
            except Exception:
                log.exception("closing an ext_proc stream failed")
        if not self.streams:
            self.idle.set()

    # -- connection -------------------------------------------------------------------

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _fail(self, code: int, reason: str) -> None:
        self._out.append(f.goaway(self.last_stream_id, code, reason.encode()[:200]))
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def goaway(self) -> None:
        """Graceful drain: no new streams; open ones finish."""
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        self._out.append(f.goaway(self.last_stream_id, f.NO_ERROR))
        self._flush()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
