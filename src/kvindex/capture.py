"""Capture files: raw KV-event frames with their receive time, for later replay or analysis.

Format (all lengths unsigned 32-bit big-endian; see docs/ingest.md):

* 8-byte magic ``b"KVCAPT01"``;
* one header record: length + msgpack map ``{"format": "kvindex-capture", "version": 1,
  "created": <unix seconds>, "source": <endpoint or "">, "topic_filter": <str>}``;
* then one record per live message: length + msgpack array
  ``[received_at: float, topic: bin, seq: int, payload: bin]``.

A truncated last record (the recorder was killed mid-write) ends the iteration quietly; any
other damage raises :class:`CaptureError`.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import msgspec

from kvindex.errors import KVIndexError

__all__ = [
    "MAGIC",
    "CaptureError",
    "CaptureHeader",
    "CaptureWriter",
    "CapturedFrame",
    "read_capture",
    "read_capture_header",
]

MAGIC: Final = b"KVCAPT01"
FORMAT_NAME: Final = "kvindex-capture"
VERSION: Final = 1
_LENGTH = struct.Struct(">I")
_MAX_RECORD = 1 << 30


class CaptureError(KVIndexError, ValueError):
    """A file that is not a readable kvindex capture."""


class CaptureHeader(msgspec.Struct, frozen=True):
    format: str = FORMAT_NAME
    version: int = VERSION
    created: float = 0.0
    source: str = ""
    topic_filter: str = ""


class CapturedFrame(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One live message as received: topic, sequence number, raw payload, receive time."""

    received_at: float
    topic: bytes
    seq: int
    payload: bytes


_encode = msgspec.msgpack.Encoder().encode
_decode_frame = msgspec.msgpack.Decoder(CapturedFrame).decode
_decode_header = msgspec.msgpack.Decoder(CaptureHeader).decode


class CaptureWriter:
    """Appends records to a new capture file. Use as a context manager or call ``close``."""

    def __init__(self, path: str | Path, source: str = "", topic_filter: str = "") -> None:
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.count = 0
        header = CaptureHeader(created=time.time(), source=source, topic_filter=topic_filter)
        self._file.write(MAGIC)
        self._record(_encode(header))

    def _record(self, body: bytes) -> None:
        self._file.write(_LENGTH.pack(len(body)))
        self._file.write(body)

    def write(self, topic: bytes, seq: int, payload: bytes, received_at: float) -> None:
        self._record(_encode(CapturedFrame(received_at, topic, seq, payload)))
        self.count += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _read_record(file: IO[bytes], path: Any) -> bytes | None:
    raw_len = file.read(_LENGTH.size)
    if len(raw_len) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(raw_len)
    if length > _MAX_RECORD:
        raise CaptureError(f"{path}: record of {length} bytes: not a capture file or damaged")
    body = file.read(length)
    if len(body) < length:
        return None  # truncated tail
    return body


def _open(path: str | Path) -> tuple[IO[bytes], CaptureHeader]:
    file = open(path, "rb")  # noqa: SIM115 (the caller closes it)
    try:
        if file.read(len(MAGIC)) != MAGIC:
            raise CaptureError(f"{path}: not a kvindex capture file (bad magic)")
        body = _read_record(file, path)
        if body is None:
            raise CaptureError(f"{path}: truncated header")
        try:
            header = _decode_header(body)
        except msgspec.DecodeError as exc:
            raise CaptureError(f"{path}: bad header: {exc}") from exc
        if header.format != FORMAT_NAME or header.version > VERSION:
            raise CaptureError(f"{path}: unsupported capture {header.format} v{header.version}")
    except BaseException:
        file.close()
        raise
    return file, header


def read_capture_header(path: str | Path) -> CaptureHeader:
    file, header = _open(path)
    file.close()
    return header


def read_capture(path: str | Path) -> Iterator[CapturedFrame]:
    """Iterate the frames of a capture file in the order they were received."""
    file, _ = _open(path)
    with file:
        while (body := _read_record(file, path)) is not None:
            try:
                yield _decode_frame(body)
            except msgspec.DecodeError as exc:
                raise CaptureError(f"{path}: bad record: {exc}") from exc
