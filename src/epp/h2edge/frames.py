"""HTTP/2 framing (RFC 9113) and gRPC message framing, as far as a gRPC server of one
bidirectional method needs them. Pure: bytes in, frames and bytes out, no I/O.

Header blocks are decoded with `hpack` (python-hyper); what we send is encoded here as
literal fields without indexing, so our side keeps no HPACK encoder state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from epp.errors import EPPError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9

# Settings.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
FRAME_HEADER = 9


class ConnectionError_(EPPError):
    """A connection error: the connection ends with GOAWAY(`code`)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes


class FrameReader:
    """Incremental frame parser: `feed` bytes as they arrive, get whole frames back.
    Frames longer than `max_frame_size` (what we advertised) are a FRAME_SIZE_ERROR."""

    __slots__ = ("_rest", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        self._rest = b""
        self.max_frame_size = max_frame_size

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """`data` may be a view of a buffer the caller reuses: frames and the unparsed
        rest are copied out of it."""
        buf = self._rest + data if self._rest else data
        end = len(buf)
        pos = 0
        frames: list[Frame] = []
        limit = self.max_frame_size
        while end - pos >= FRAME_HEADER:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if length > limit:
                raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {limit}")
            stop = pos + FRAME_HEADER + length
            if stop > end:
                break
            frames.append(
                Frame(
                    buf[pos + 3],
                    buf[pos + 4],
                    int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF,
                    bytes(buf[pos + FRAME_HEADER : stop]),
                )
            )
            pos = stop
        self._rest = bytes(buf[pos:]) if pos < end else b""
        return frames


def frame_header(type_: int, flags: int, stream_id: int, length: int) -> bytes:
    return length.to_bytes(3, "big") + bytes((type_, flags)) + stream_id.to_bytes(4, "big")


def frame(type_: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((type_, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def strip_padding(f: Frame) -> bytes:
    """DATA / HEADERS payload without the pad length byte and padding."""
    payload = f.payload
    if not f.flags & PADDED:
        return payload
    if not payload:
        raise ConnectionError_(PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "padding exceeds the frame")
    return payload[1 : len(payload) - pad]


def header_block_fragment(f: Frame) -> bytes:
    """A HEADERS frame's block fragment: padding and priority fields removed."""
    payload = strip_padding(f)
    if f.flags & PRIORITY_FLAG:
        if len(payload) < 5:
            raise ConnectionError_(FRAME_SIZE_ERROR, "HEADERS priority fields truncated")
        payload = payload[5:]
    return payload


def settings_payload(settings: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in settings)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6")
    return [
        (int.from_bytes(payload[i : i + 2], "big"), int.from_bytes(payload[i + 2 : i + 6], "big"))
        for i in range(0, len(payload), 6)
    ]


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big") + debug)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


# -- HPACK, encoder side: literal header fields without indexing (RFC 7541 6.2.2) ------


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(raw: bytes) -> bytes:
    return _hpack_int(len(raw), 7, 0x00) + raw  # H bit 0: not Huffman-coded


# Dynamic table size update to 0 (RFC 7541 6.3): sent first in our first header block and
# after every SETTINGS_HEADER_TABLE_SIZE the peer sends; we never index anything.
TABLE_SIZE_ZERO = b"\x20"


def encode_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A header block of literal fields with new names and no indexing."""
    return b"".join(b"\x00" + _hpack_string(name) + _hpack_string(value) for name, value in headers)


# -- gRPC message framing (length-prefixed messages) ---------------------------------


def grpc_prefix(length: int) -> bytes:
    """The 5-byte prefix of an uncompressed gRPC message of `length` bytes."""
    return b"\x00" + length.to_bytes(4, "big")


def grpc_message(payload: bytes) -> bytes:
    return grpc_prefix(len(payload)) + payload


class GrpcMessageReader:
    """Length-prefixed gRPC messages from a stream's DATA payloads. A message longer than
    `max_message` or compressed (we accept only identity) raises GrpcMessageError."""

    __slots__ = ("_buf", "max_message")

    def __init__(self, max_message: int) -> None:
        self._buf = bytearray()
        self.max_message = max_message

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        buf = self._buf
        if not buf and len(data) >= 5:
            # Fast path: messages aligned with DATA payloads (what Envoy and grpc send).
            length = int.from_bytes(data[1:5], "big")
            if len(data) == 5 + length:
                self._check(data[0], length)
                return [memoryview(data)[5:]]  # a view: the payload is not copied again
        buf += data
        out: list[bytes | memoryview] = []
        pos = 0
        while len(buf) - pos >= 5:
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            self._check(buf[pos], length)
            if len(buf) - pos < 5 + length:
                break
            out.append(bytes(buf[pos + 5 : pos + 5 + length]))
            pos += 5 + length
        del buf[:pos]
        return out

    def _check(self, compressed: int, length: int) -> None:
        if compressed:
            raise GrpcMessageError(12, "compressed messages are not supported (use identity)")
        if length > self.max_message:
            raise GrpcMessageError(8, f"message of {length} bytes exceeds {self.max_message}")

    @property
    def partial(self) -> bool:
        return bool(self._buf)


class GrpcMessageError(EPPError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def percent_encode(message: str) -> bytes:
    """grpc-message value encoding: printable ASCII except '%' as is, the rest %XX of UTF-8."""
    out = bytearray()
    for b in message.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)
