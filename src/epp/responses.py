"""Read token usage out of a model server's response as it streams past. Pure: no I/O.

OpenAI servers put `usage` in the JSON body, or in the final SSE `data:` event when streaming
(`stream_options.include_usage`); Anthropic's `/v1/messages` spreads it over `message_start`
(input tokens) and `message_delta` (output tokens). Fields seen later win."""

from __future__ import annotations

from typing import Any

import msgspec

_decoder = msgspec.json.Decoder()
_USAGE_MARKER = b'"usage"'


class Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    raw: dict[str, Any] | None = None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def merge_usage(into: Usage, usage: Any) -> bool:
    """Fold one `usage` object (OpenAI or Anthropic shape) into `into`; False if not one."""
    if not isinstance(usage, dict):
        return False
    prompt = _int_or_none(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _int_or_none(usage.get("input_tokens"))
    completion = _int_or_none(usage.get("completion_tokens"))
    if completion is None:
        completion = _int_or_none(usage.get("output_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _int_or_none(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:
        cached = _int_or_none(usage.get("cache_read_input_tokens"))
    if prompt is not None:
        into.prompt_tokens = prompt
    if completion is not None:
        into.completion_tokens = completion
    if cached is not None:
        into.cached_tokens = cached
    into.raw = {**(into.raw or {}), **usage}
    return True


class UsageCollector:
    """Feed response body chunks; `finish()` returns the usage seen, if any. Holds at most
    `max_bytes` (a JSON body larger than that, or one SSE line longer than that, is not
    parsed and counted in `skipped`)."""

    def __init__(self, streamed: bool, max_bytes: int = 4 << 20) -> None:
        self.streamed = streamed
        self.max_bytes = max_bytes
        self.usage = Usage()
        self.found = False
        self.skipped = 0
        self._buffer = bytearray()
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self.streamed:
            self._feed_events(chunk)
            return
        if self._overflow:
            return
        self._buffer += chunk
        if len(self._buffer) > self.max_bytes:
            self._overflow = True
            self.skipped += 1
            self._buffer.clear()

    def _feed_events(self, chunk: bytes) -> None:
        """SSE: only lines holding `"usage"` are decoded. A chunk is searched as a whole
        (C speed); only a line cut at the chunk's end is kept for the next one, so a stream
        of token events costs two byte searches per chunk."""
        if self._buffer:
            data = bytes(self._buffer) + chunk
            self._buffer.clear()
        else:
            data = chunk
        end = data.rfind(b"\n")
        if end >= 0 and data.find(_USAGE_MARKER, 0, end) >= 0:
            for line in data[: end + 1].split(b"\n"):
                self._scan_line(line.strip())
        if end + 1 < len(data):
            tail = data[end + 1 :]
            if len(tail) > self.max_bytes:
                self.skipped += 1
            else:
                self._buffer += tail

    def _scan_line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or _USAGE_MARKER not in line:
            return
        try:
            event = _decoder.decode(line[5:].strip())
        except (msgspec.DecodeError, RecursionError):
            self.skipped += 1
            return
        if not isinstance(event, dict):
            return
        usage = event.get("usage")
        if usage is None and isinstance(event.get("message"), dict):
            usage = event["message"].get("usage")  # Anthropic message_start
        if merge_usage(self.usage, usage):
            self.found = True

    def finish(self) -> Usage | None:
        if self.streamed:
            if self._buffer:
                self._scan_line(bytes(self._buffer).strip())
                self._buffer.clear()
        elif self._buffer and not self._overflow:
            try:
                doc = _decoder.decode(bytes(self._buffer))
            except (msgspec.DecodeError, RecursionError):
                self.skipped += 1
                doc = None
            self._buffer.clear()
            if isinstance(doc, dict) and merge_usage(self.usage, doc.get("usage")):
                self.found = True
        return self.usage if self.found else None
