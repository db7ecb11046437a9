"""A lean HTTP/2 gRPC client for the ext_proc benchmarks: what Envoy does per stream, at the
cost of a few frame headers, so that the latency it measures is the picker's and not a
Python gRPC stack's (grpc.aio's client spends about as long per stream as the picker's edge).

It speaks real HTTP/2 (RFC 9113) and gRPC framing over a blocking socket, plaintext or TLS
with ALPN h2: the connection preface and SETTINGS exchange, HEADERS with a literal
(non-indexed) HPACK block, DATA within the server's connection and stream windows and its
maximum frame size, WINDOW_UPDATE credit for what it reads, PING and SETTINGS acks; response
and trailer blocks are decoded with `hpack` and a non-zero grpc-status is an error. It does
what a benchmark needs and no more: one method (`ExternalProcessor/Process`), messages
prepared up front, and streams half-closed with their last message (as Envoy does once the
request body ended and no response phase is processed).

Two ways to drive it:
- `stream(messages)`: one stream at a time, for latency (first byte written -> the decision,
  the first response message, fully read);
- `concurrent(messages_of, n, concurrency)`: `concurrency` streams in flight on the one
  connection (how Envoy multiplexes requests onto its ext_proc connection), for throughput.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import hpack  # type: ignore[import-untyped]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x4, 0x5
MAX_WINDOW = (1 << 31) - 1
PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class ProtocolError(Exception):
    pass


def frame(type_: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    header = len(payload).to_bytes(3, "big") + bytes((type_, flags))
    return header + stream_id.to_bytes(4, "big") + payload


def literal_block(fields: Sequence[tuple[str, str]]) -> bytes:
    """An HPACK block of literal fields without indexing (RFC 7541 6.2.2): the same bytes on
    every stream, so it is built once."""
    out = bytearray()
    for name, value in fields:
        out.append(0)
        for s in (name.encode(), value.encode()):
            n = len(s)
            if n < 127:
                out.append(n)
            else:  # 7-bit prefix integer
                out.append(127)
                n -= 127
                while n >= 128:
                    out.append((n & 0x7F) | 0x80)
                    n >>= 7
                out.append(n)
            out += s
    return bytes(out)


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@dataclass(slots=True)
class StreamResult:
    decision_s: float  # first byte written -> first response message read
    full_s: float  # ... -> trailers read
    messages: list[bytes]  # the response messages (serialized ProcessingResponse)


@dataclass(slots=True)
class _Stream:
    id: int
    data: bytes  # gRPC-framed request messages still to send
    started: float
    window: int
    buffer: bytearray = field(default_factory=bytearray)
    messages: list[bytes] = field(default_factory=list)
    decided: float = 0.0
    headers_seen: bool = False
    done: bool = False


class ExtProcClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        root_certificates: bytes | None = None,
        server_hostname: str = "localhost",
    ) -> None:
        raw = socket.create_connection((host, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        if root_certificates is not None:
            context = ssl.create_default_context(cadata=root_certificates.decode())
            context.check_hostname = False
            context.set_alpn_protocols(["h2"])
            self.sock = context.wrap_socket(raw, server_hostname=server_hostname)
            if self.sock.selected_alpn_protocol() != "h2":  # type: ignore[attr-defined]
                raise ProtocolError("the server did not select ALPN h2")
        self._headers = literal_block(
            [
                (":method", "POST"),
                (":scheme", "https" if root_certificates is not None else "http"),
                (":path", PROCESS),
                (":authority", f"{host}:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        self._decoder = hpack.Decoder()
        self._buf = bytearray()
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._received = 0  # DATA bytes not yet credited back on the connection
        # The server's limits (defaults until its SETTINGS arrive).
        self.max_frame = 16_384
        self.initial_window = 65_535
        self.window = 65_535
        self._settings_seen = False
        self.sock.sendall(
            PREFACE
            + frame(
                SETTINGS,
                0,
                0,
                SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + MAX_WINDOW.to_bytes(4, "big"),
            )
            + frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - 65_535).to_bytes(4, "big"))
        )
        while not self._settings_seen:
            self._read()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(frame(GOAWAY, 0, 0, bytes(8)))
        self.sock.close()

    # -- streams ----------------------------------------------------------------------

    def _open(self, messages: Sequence[bytes]) -> _Stream:
        sid = self._next_id
        self._next_id += 2
        data = b"".join(grpc_message(m) for m in messages)
        stream = _Stream(sid, data, time.perf_counter(), self.initial_window)
        self._streams[sid] = stream
        # HEADERS and what DATA the windows allow leave in one write, as a proxy that has
        # the request body at hand writes them.
        self._send_data(stream, [frame(HEADERS, END_HEADERS, sid, self._headers)])
        return stream

    def _send_data(self, stream: _Stream, out: list[bytes] | None = None) -> None:
        out = out or []
        while stream.data:
            room = min(self.window, stream.window, self.max_frame)
            if room <= 0:
                break
            chunk, stream.data = stream.data[:room], stream.data[room:]
            self.window -= len(chunk)
            stream.window -= len(chunk)
            out.append(frame(DATA, 0 if stream.data else END_STREAM, stream.id, chunk))
        if out:
            self.sock.sendall(b"".join(out))

    def stream(self, messages: Sequence[bytes]) -> StreamResult:
        """One stream, alone on the connection."""
        stream = self._open(messages)
        while not stream.done:
            self._read()
            if stream.data:
                self._send_data(stream)
        return StreamResult(
            stream.decided - stream.started, time.perf_counter() - stream.started, stream.messages
        )

    def concurrent(
        self, messages_of: Callable[[int], Sequence[bytes]], n: int, concurrency: int
    ) -> tuple[float, list[float]]:
        """`n` streams, `concurrency` in flight: (seconds, the decision latencies)."""
        started = time.perf_counter()
        sent = 0
        done: list[float] = []
        open_: list[_Stream] = []
        while len(done) < n:
            while sent < n and len(open_) < concurrency:
                open_.append(self._open(messages_of(sent)))
                sent += 1
            self._read()
            for stream in open_:
                if stream.data:
                    self._send_data(stream)
            still = []
            for stream in open_:
                if stream.done:
                    done.append(stream.decided - stream.started)
                else:
                    still.append(stream)
            open_ = still
        return time.perf_counter() - started, done

    # -- reading ----------------------------------------------------------------------

    def _read(self) -> None:
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ProtocolError("the server closed the connection")
        buf = self._buf
        buf += chunk
        pos = 0
        end = len(buf)
        now = time.perf_counter()
        while end - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            stop = pos + 9 + length
            if stop > end:
                break
            type_, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
            self._frame(type_, flags, sid, bytes(buf[pos + 9 : stop]), now)
            pos = stop
        del buf[:pos]
        if self._received > (1 << 30):
            self.sock.sendall(frame(WINDOW_UPDATE, 0, 0, self._received.to_bytes(4, "big")))
            self._received = 0

    def _frame(self, type_: int, flags: int, sid: int, payload: bytes, now: float) -> None:
        if type_ == DATA:
            self._received += len(payload)
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            stream = self._streams[sid]
            buf = stream.buffer
            buf += payload
            while len(buf) >= 5:
                size = int.from_bytes(buf[1:5], "big")
                if len(buf) < 5 + size:
                    break
                stream.messages.append(bytes(buf[5 : 5 + size]))
                del buf[: 5 + size]
                if not stream.decided:
                    stream.decided = now
            if flags & END_STREAM:
                raise ProtocolError(f"stream {sid} ended without trailers")
        elif type_ == HEADERS:
            if not flags & END_HEADERS:
                raise ProtocolError("CONTINUATION is not supported by this benchmark client")
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY:
                payload = payload[5:]
            fields = dict(self._decoder.decode(payload))
            stream = self._streams[sid]
            if flags & END_STREAM:
                status = fields.get("grpc-status", "")
                if status != "0":
                    raise ProtocolError(
                        f"stream {sid}: grpc-status {status!r} {fields.get('grpc-message', '')}"
                    )
                stream.done = True
                del self._streams[sid]
            elif fields.get(":status") != "200":
                raise ProtocolError(f"stream {sid}: HTTP status {fields.get(':status')}")
        elif type_ == SETTINGS:
            if flags & ACK:
                return
            for i in range(0, len(payload) - 5, 6):
                key = int.from_bytes(payload[i : i + 2], "big")
                value = int.from_bytes(payload[i + 2 : i + 6], "big")
                if key == SETTINGS_MAX_FRAME_SIZE:
                    self.max_frame = value
                elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                    delta = value - self.initial_window
                    self.initial_window = value
                    for stream in self._streams.values():
                        stream.window += delta
            self._settings_seen = True
            self.sock.sendall(frame(SETTINGS, ACK, 0))
        elif type_ == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
            if sid == 0:
                self.window += increment
            elif sid in self._streams:
                self._streams[sid].window += increment
        elif type_ == PING:
            if not flags & ACK:
                self.sock.sendall(frame(PING, ACK, 0, payload))
        elif type_ == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            stream = self._streams.get(sid)
            if stream is not None and not stream.done:
                raise ProtocolError(f"stream {sid} reset with code {code}")
        elif type_ == GOAWAY:
            code = int.from_bytes(payload[4:8], "big")
            raise ProtocolError(f"GOAWAY {code}: {payload[8:].decode(errors='replace')}")
