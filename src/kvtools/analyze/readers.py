"""Trace readers: Mooncake JSONL and request logs, into :class:`Trace` (content keys).

Mooncake ``hash_ids`` become keys with ``chain_keys(root_key(model), hash_ids, 1)``: each id
is treated as the whole content of its block (one 32-bit "token"), so key ``i`` is chained
over ids ``0..i``. The ids already identify their prefix, so this loses nothing, and it makes
the key depend on the whole prefix by construction (as our keys from engine events do): a
trace that reused an id at another depth, or two traces mixed, cannot produce false hits,
and the request side and the simulated engines' events meet in the real ``MemoryIndex``
exactly as they would in production.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from kvindex.keys import DEFAULT_BLOCK_SIZE, chain_keys, root_key
from kvtools.analyze.model import Trace, TraceRequest

if TYPE_CHECKING:
    from kvindex.tokenize import Tokenizer

__all__ = [
    "MOONCAKE_BLOCK_TOKENS",
    "TraceError",
    "detect_format",
    "mooncake_keys",
    "read_mooncake",
    "read_request_log",
]

MOONCAKE_BLOCK_TOKENS = 512
DEFAULT_MODEL = "mooncake"
DEFAULT_OUTPUT_TOKENS = 256  # request logs without output_length / max_tokens


class TraceError(ValueError):
    """A malformed input line: names the file, the line and the field."""

    def __init__(self, path: str, line: int, field: str, reason: str) -> None:
        self.path, self.line, self.field, self.reason = path, line, field, reason
        super().__init__(
            f"{path}:{line}: field {field!r}: {reason} "
            "(fix the line, or pass --skip-bad-lines to skip and count such lines)"
        )


class _MooncakeLine(msgspec.Struct):
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int]


_mooncake_decoder = msgspec.json.Decoder(_MooncakeLine)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if line:
                yield number, line


def _field_of(error: msgspec.ValidationError) -> str:
    text = str(error)
    marker = "at `$."
    if marker in text:
        return text.split(marker, 1)[1].split("`", 1)[0].split("[", 1)[0]
    if "missing required field" in text:
        return text.split("`")[1]
    return "$"


def detect_format(path: Path) -> str:
    """``mooncake`` (has hash_ids), ``requests`` (has prompt/messages/token_ids) or
    ``capture`` (anything not a JSON object line)."""
    for _, line in _lines(path):
        if not line.startswith(b"{"):
            return "capture"
        try:
            first = msgspec.json.decode(line)
        except msgspec.DecodeError:
            return "capture"
        if isinstance(first, dict) and "hash_ids" in first:
            return "mooncake"
        if isinstance(first, dict) and ({"prompt", "messages", "token_ids"} & first.keys()):
            return "requests"
        if isinstance(first, dict) and ({"payload", "received_at"} & first.keys()):
            return "capture"  # a capture written as JSON lines
        raise TraceError(
            str(path),
            1,
            "$",
            "not a Mooncake line (hash_ids) nor a request (prompt, "
            "messages or token_ids); name the format with --format",
        )
    return "mooncake"


def mooncake_keys(hash_ids: list[int], model: str = DEFAULT_MODEL) -> list[int]:
    """Our content keys of one Mooncake request's blocks (see the module docstring)."""
    return chain_keys(root_key(model), hash_ids, 1)


@dataclass(slots=True)
class _Reader:
    path: Path
    skip_bad_lines: bool
    limit: int | None
    trace: Trace

    def bad(self, line: int, field: str, reason: str) -> None:
        if not self.skip_bad_lines:
            raise TraceError(str(self.path), line, field, reason)
        self.trace.bad_lines += 1

    def full(self) -> bool:
        return self.limit is not None and len(self.trace.requests) >= self.limit


def _finish(trace: Trace) -> Trace:
    """Sort by arrival (stable) and rebase time on the first request."""
    trace.requests.sort(key=lambda r: r.arrival_ms)
    if trace.requests and trace.requests[0].arrival_ms:
        t0 = trace.requests[0].arrival_ms
        trace.requests = [replace(r, arrival_ms=r.arrival_ms - t0) for r in trace.requests]
    return trace


def read_mooncake(
    path: Path,
    *,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    limit: int | None = None,
    skip_bad_lines: bool = False,
    source: str | None = None,
) -> Trace:
    """Read a Mooncake JSONL trace (the first ``limit`` requests)."""
    reader = _Reader(
        path, skip_bad_lines, limit, Trace(source or str(path), "mooncake", block_tokens)
    )
    for number, line in _lines(path):
        if reader.full():
            break
        try:
            row = _mooncake_decoder.decode(line)
        except msgspec.ValidationError as e:
            reader.bad(number, _field_of(e), str(e))
            continue
        except msgspec.DecodeError as e:
            reader.bad(number, "$", f"not valid JSON ({e})")
            continue
        if row.input_length < 0 or row.output_length < 0 or row.timestamp < 0:
            reader.bad(number, "input_length", "lengths and timestamp must be >= 0")
            continue
        try:
            keys = mooncake_keys(row.hash_ids)
        except OverflowError:
            reader.bad(number, "hash_ids", "ids must be integers in [0, 2**32)")
            continue
        reader.trace.requests.append(
            TraceRequest(
                row.timestamp,
                row.input_length,
                row.output_length,
                tuple(keys),
                tuple(row.hash_ids),
                DEFAULT_MODEL,
            )
        )
    return _finish(reader.trace)


def _timestamp_ms(value: Any) -> float | None:
    """Numbers are milliseconds (as Mooncake); strings ISO-8601."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.timestamp() * 1000.0
    return None


def _token_ids(row: dict[str, Any], tokenizer: Tokenizer | None) -> tuple[str, list[int]]:
    """(field, tokens); raises ValueError naming the problem."""
    if "token_ids" in row:
        ids = row["token_ids"]
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise ValueError("token_ids: expected a list of integers")
        return "token_ids", ids
    field = "prompt" if "prompt" in row else "messages" if "messages" in row else ""
    if not field:
        raise ValueError("$: one of prompt, messages or token_ids is required")
    if tokenizer is None:
        raise ValueError(f"{field}: text needs a tokenizer (pass --tokenizer PATH)")
    if field == "prompt":
        if not isinstance(row["prompt"], str):
            raise ValueError("prompt: expected a string")
        return field, tokenizer.encode(row["prompt"])
    messages = row["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages: expected a list of {role, content} objects")
    return field, tokenizer.apply_chat_template(messages)


def read_request_log(
    path: Path,
    *,
    tokenizer: Tokenizer | None = None,
    block_tokens: int = DEFAULT_BLOCK_SIZE,
    limit: int | None = None,
    skip_bad_lines: bool = False,
    default_model: str = "",
) -> Trace:
    """Read a JSONL request log: ``timestamp`` (ms, or ISO-8601), ``model``, one of
    ``token_ids`` / ``prompt`` / ``messages``, optional ``output_length`` (or ``max_tokens``)
    and ``lora``. Prompts are blocked with our block keys (``chain_keys``)."""
    reader = _Reader(
        path, skip_bad_lines, limit, Trace(str(path), "requests", block_tokens, block_tokens)
    )
    for number, line in _lines(path):
        if reader.full():
            break
        try:
            row = msgspec.json.decode(line)
        except msgspec.DecodeError as e:
            reader.bad(number, "$", f"not valid JSON ({e})")
            continue
        if not isinstance(row, dict):
            reader.bad(number, "$", "expected a JSON object")
            continue
        ts = _timestamp_ms(row.get("timestamp"))
        if ts is None:
            reader.bad(number, "timestamp", "required: milliseconds or an ISO-8601 string")
            continue
        model = row.get("model", default_model)
        if not isinstance(model, str) or not model:
            reader.bad(number, "model", "required: a non-empty string")
            continue
        try:
            _, tokens = _token_ids(row, tokenizer)
        except ValueError as e:
            field, _, reason = str(e).partition(": ")
            reader.bad(number, field, reason)
            continue
        output = row.get("output_length", row.get("max_tokens", DEFAULT_OUTPUT_TOKENS))
        if not isinstance(output, int) or isinstance(output, bool) or output < 0:
            reader.bad(number, "output_length", "expected a non-negative integer")
            continue
        lora = row.get("lora")
        lora_name = lora if isinstance(lora, str) and lora else None
        try:
            keys = chain_keys(root_key(model, lora_name), tokens, block_tokens)
        except OverflowError:
            reader.bad(number, "token_ids", "token ids must be integers in [0, 2**32)")
            continue
        n_full = len(keys) * block_tokens
        reader.trace.requests.append(
            TraceRequest(
                ts, len(tokens), output, tuple(keys), tuple(tokens[:n_full]), model, lora_name
            )
        )
    return _finish(reader.trace)
