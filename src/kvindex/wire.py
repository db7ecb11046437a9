"""KV-event wire types and decoding, for every encoding vLLM and SGLang publish.

Frames: live messages are ``[topic, seq, payload]``; ``seq`` is 8 bytes big-endian unsigned.
Payload: msgpack batch ``[ts, events, data_parallel_rank]`` (or, in one unreleased revision, a
map with those names). Events come in two encodings, both tagged by class name:

* array (vLLM up to ~0.25, SGLang): ``["BlockStored", f1, f2, ...]``, positional, 5 to 15+
  fields (trailing fields of newer releases are optional here, extra ones ignored);
* map (vLLM since mid-2026, 0.33): ``{"type": "BlockStored", "block_hashes": ..., ...}``,
  defaulted fields may be absent, unknown fields are ignored.

Block hashes are opaque per-engine ids: uint64 or int64 ints, or 16/32-byte digests.

Both encodings are normalised into :class:`BlockStored`, :class:`BlockRemoved` and
:class:`AllBlocksCleared` before anything else sees them. Decoding never raises: a payload
that cannot be read yields a :class:`DecodedBatch` with ``error`` set, and unknown or
malformed events are skipped and counted in the result.
"""

from __future__ import annotations

from typing import Any, Final, Generic, TypeVar

import msgspec

from kvindex.errors import KVIndexError

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "DecodedBatch",
    "EngineHash",
    "Event",
    "Frame",
    "FrameError",
    "Medium",
    "decode_batch",
    "parse_frames",
    "parse_replay_frames",
]

EngineHash = int | bytes
"""An engine's own block hash, opaque: only equality within one engine is meaningful."""


class Medium:
    """Values of the ``medium`` field (the cache tier of a block)."""

    GPU: Final = "GPU"
    CPU: Final = "CPU"
    STORAGE: Final = "STORAGE"


# ---------------------------------------------------------------------------------------------
# Normalised events: what the rest of kvindex consumes. Not the wire forms (those are declared
# once, below): here ``medium`` and ``group_idx`` are never None and the fields are in the
# order of this public API, which callers construct positionally.


class BlockStored(msgspec.Struct, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    medium: str = Medium.GPU
    # One entry per block (or None): untagged LoRA name, (mm_identifier, offset) pairs, the
    # cache salt (first block of a chain), prompt-embedding digests, in that order.
    extra_keys: list[Any] | None = None
    group_idx: int = 0
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    lora_id: int | None = None


class BlockRemoved(msgspec.Struct, gc=False):
    block_hashes: list[EngineHash]
    medium: str = Medium.GPU
    group_idx: int = 0


class AllBlocksCleared(msgspec.Struct, gc=False):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class DecodedBatch(msgspec.Struct, gc=False):
    """One decoded payload. ``error`` is set (and ``events`` empty) when the payload itself
    could not be read; otherwise ``unknown`` counts events of unknown type and ``malformed``
    events whose fields did not fit, both skipped."""

    ts: float = 0.0
    events: list[Event] = msgspec.field(default_factory=list)
    data_parallel_rank: int | None = None
    unknown: int = 0
    malformed: int = 0
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# Wire forms. Each event's fields are declared once, in vLLM's positional order (the array
# encoding reads them by position, so this order is the wire order), generic over the block
# hash type: ``int`` for the whole-batch fast path (what vLLM and SGLang publish by default; a
# batch that decodes with int hashes needs no per-hash validation, msgpack ints fit in 64
# bits) or ``EngineHash`` for any engine. The subclasses only pick the encoding.
#
# Every field but ``block_hashes`` has a default: map events may omit defaulted fields, older
# engines send shorter arrays (newer trailing elements and unknown map keys are ignored). An
# array too short to carry ``block_size`` decodes with block size 0, which the checks below
# count as malformed, as they would count an event that failed to decode.

_H = TypeVar("_H")  # the block hash type: int or EngineHash
_E = TypeVar("_E")  # the event type of a batch


class _StoredFields(msgspec.Struct, Generic[_H], gc=False):
    block_hashes: list[_H]
    parent_block_hash: _H | None = None
    token_ids: list[int] = msgspec.field(default_factory=list)
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class _RemovedFields(msgspec.Struct, Generic[_H], gc=False):
    block_hashes: list[_H]
    medium: str | None = None
    group_idx: int | None = None


# Array encoding: ``["BlockStored", f1, f2, ...]``.
class _ArrayStored(_StoredFields[_H], array_like=True, tag="BlockStored"):
    pass


class _ArrayRemoved(_RemovedFields[_H], array_like=True, tag="BlockRemoved"):
    pass


class _ArrayCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared", gc=False):
    pass


# Map encoding: ``{"type": "BlockStored", "block_hashes": ..., ...}``.
class _MapStored(_StoredFields[_H], tag_field="type", tag="BlockStored"):
    pass


class _MapRemoved(_RemovedFields[_H], tag_field="type", tag="BlockRemoved"):
    pass


class _MapCleared(msgspec.Struct, tag_field="type", tag="AllBlocksCleared", gc=False):
    pass


_ArrayEvent = _ArrayStored[EngineHash] | _ArrayRemoved[EngineHash] | _ArrayCleared
_MapEvent = _MapStored[EngineHash] | _MapRemoved[EngineHash] | _MapCleared
_IntArrayEvent = _ArrayStored[int] | _ArrayRemoved[int] | _ArrayCleared
_IntMapEvent = _MapStored[int] | _MapRemoved[int] | _MapCleared


# Batches: ``[ts, events, data_parallel_rank]``, or (one unreleased revision) a map.
class _BatchFields(msgspec.Struct, Generic[_E], gc=False):
    ts: float
    events: list[_E]
    data_parallel_rank: int | None = None


class _ArrayBatch(_BatchFields[_E], array_like=True):
    pass


class _MapBatch(_BatchFields[_E]):
    pass


_decode_array_batch = msgspec.msgpack.Decoder(_ArrayBatch[_ArrayEvent]).decode
_decode_map_event_batch = msgspec.msgpack.Decoder(_ArrayBatch[_MapEvent]).decode
_decode_int_array_batch = msgspec.msgpack.Decoder(_ArrayBatch[_IntArrayEvent]).decode
_decode_int_map_batch = msgspec.msgpack.Decoder(_ArrayBatch[_IntMapEvent]).decode
_decode_raw_array_batch = msgspec.msgpack.Decoder(_ArrayBatch[msgspec.Raw]).decode
_decode_raw_map_batch = msgspec.msgpack.Decoder(_MapBatch[msgspec.Raw]).decode
_decode_array_event = msgspec.msgpack.Decoder(_ArrayEvent).decode
_decode_map_event = msgspec.msgpack.Decoder(_MapEvent).decode
_decode_any = msgspec.msgpack.Decoder().decode

_KNOWN_TAGS: Final = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})

# Every wire form of an event, whatever its encoding and hash type (isinstance checks).
_STORED_TYPES: Final = (_ArrayStored, _MapStored)
_REMOVED_TYPES: Final = (_ArrayRemoved, _MapRemoved)
_GPU: Final = Medium.GPU


def _normalise(event: _ArrayEvent | _MapEvent) -> Event:
    if isinstance(event, _STORED_TYPES):
        return BlockStored(
            event.block_hashes,
            event.parent_block_hash,
            event.token_ids,
            event.block_size,
            event.lora_name,
            event.medium or _GPU,
            event.extra_keys,
            event.group_idx or 0,
            event.kv_cache_spec_kind,
            event.kv_cache_spec_sliding_window,
            event.lora_id,
        )
    if isinstance(event, _REMOVED_TYPES):
        return BlockRemoved(
            event.block_hashes,
            event.medium or _GPU,
            event.group_idx or 0,
        )
    return AllBlocksCleared()


def _valid_hashes(hashes: list[EngineHash]) -> bool:
    # Engine hashes are 64-bit ints (signed or unsigned) or 16/32-byte digests; msgpack ints
    # already fit in 64 bits, so only digest lengths need checking.
    # A plain loop, not all(genexpr): this runs for every block hash of every event (ingest
    # hot path) and the loop is about twice as fast.
    for h in hashes:  # noqa: SIM110
        if not isinstance(h, int) and len(h) not in (8, 16, 32):
            return False
    return True


def _checked(event: Event) -> bool:
    if isinstance(event, BlockStored):
        parent = event.parent_block_hash
        return (
            bool(event.block_hashes)
            and _valid_hashes(event.block_hashes)
            and (parent is None or _valid_hashes([parent]))
            and event.block_size > 0
        )
    if isinstance(event, BlockRemoved):
        return _valid_hashes(event.block_hashes)
    return True


def _finish(
    ts: float, events: list[Event], rank: int | None, unknown: int, malformed: int
) -> DecodedBatch:
    good = [e for e in events if _checked(e)]
    return DecodedBatch(
        ts=ts,
        events=good,
        data_parallel_rank=rank,
        unknown=unknown,
        malformed=malformed + len(events) - len(good),
    )


def _finish_int(
    ts: float,
    decoded: list[_IntArrayEvent] | list[_IntMapEvent],
    rank: int | None,
) -> DecodedBatch:
    """Normalise and check a batch whose hashes are all ints, in one pass: the checks of
    :func:`_checked` less the digest lengths (there are none)."""
    events: list[Event] = []
    append = events.append
    malformed = 0
    for e in decoded:
        if isinstance(e, _STORED_TYPES):
            if not e.block_hashes or e.block_size <= 0:
                malformed += 1
                continue
            append(
                BlockStored(
                    e.block_hashes,  # type: ignore[arg-type]  # list[int] is a list[EngineHash]
                    e.parent_block_hash,
                    e.token_ids,
                    e.block_size,
                    e.lora_name,
                    e.medium or _GPU,
                    e.extra_keys,
                    e.group_idx or 0,
                    e.kv_cache_spec_kind,
                    e.kv_cache_spec_sliding_window,
                    e.lora_id,
                )
            )
        elif isinstance(e, _REMOVED_TYPES):
            append(BlockRemoved(e.block_hashes, e.medium or _GPU, e.group_idx or 0))  # type: ignore[arg-type]
        else:
            append(AllBlocksCleared())
    return DecodedBatch(ts, events, rank, 0, malformed)


def _decode_one(raw: msgspec.Raw) -> Event | str:
    """Decode one event of either encoding; on failure return 'unknown' or 'malformed'."""
    data = bytes(raw)
    if not data:
        return "malformed"
    first = data[0]
    is_map = 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)
    try:
        return _normalise(_decode_map_event(data) if is_map else _decode_array_event(data))
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    try:
        generic = _decode_any(data)
    except msgspec.DecodeError:
        return "malformed"
    tag = generic.get("type") if isinstance(generic, dict) else None
    if isinstance(generic, list) and generic:
        tag = generic[0]
    # Unknown: a well-formed tag we do not know (a newer event type). Anything else is damage.
    return "unknown" if isinstance(tag, str) and tag not in _KNOWN_TAGS else "malformed"


def _first_event_is_map(payload: bytes) -> bool | None:
    """Whether the first event of an array batch ``[float64 ts, [events...], ...]`` is
    map-encoded; None when the payload does not start that way (other forms, empty batch).
    Only picks which fast decoder is tried first: the result never depends on it."""
    if len(payload) < 12 or not 0x91 <= payload[0] <= 0x9F or payload[1] != 0xCB:
        return None
    head = payload[10]  # the events array header, after the 9-byte float64
    if 0x91 <= head <= 0x9F:
        first = payload[11]
    elif head == 0xDC and len(payload) > 13:
        first = payload[13]
    elif head == 0xDD and len(payload) > 15:
        first = payload[15]
    else:
        return None
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


_DECODE_ERRORS: Final = (msgspec.ValidationError, msgspec.DecodeError)


def decode_batch(payload: bytes) -> DecodedBatch:
    """Decode one msgpack batch payload of any supported encoding. Never raises."""
    # Fastest path: a batch of one encoding with int hashes decodes in one C call and needs
    # no hash validation; the encoding of its first event picks the decoder to try.
    maps = _first_event_is_map(payload)
    if maps is not None:
        try:
            ibatch = (_decode_int_map_batch if maps else _decode_int_array_batch)(payload)
            return _finish_int(ibatch.ts, ibatch.events, ibatch.data_parallel_rank)
        except _DECODE_ERRORS:
            pass
    # Fast paths: a whole batch of one encoding decodes in one C call.
    if not maps:
        try:
            batch = _decode_array_batch(payload)
            return _finish(
                batch.ts, [_normalise(e) for e in batch.events], batch.data_parallel_rank, 0, 0
            )
        except _DECODE_ERRORS:
            pass
    try:
        mbatch = _decode_map_event_batch(payload)
        return _finish(
            mbatch.ts, [_normalise(e) for e in mbatch.events], mbatch.data_parallel_rank, 0, 0
        )
    except _DECODE_ERRORS:
        pass
    # Slow path: mixed encodings, unknown event types, a map batch, or damage.
    raw_batch: _BatchFields[msgspec.Raw]
    try:
        raw_batch = _decode_raw_array_batch(payload)
    except _DECODE_ERRORS:
        try:
            raw_batch = _decode_raw_map_batch(payload)
        except _DECODE_ERRORS as exc:
            return DecodedBatch(error=f"undecodable batch: {exc}")
    events: list[Event] = []
    unknown = malformed = 0
    for raw in raw_batch.events:
        result = _decode_one(raw)
        if result == "unknown":
            unknown += 1
        elif result == "malformed":
            malformed += 1
        else:
            assert not isinstance(result, str)
            events.append(result)
    return _finish(raw_batch.ts, events, raw_batch.data_parallel_rank, unknown, malformed)


# ---------------------------------------------------------------------------------------------
# Frames.


class FrameError(KVIndexError, ValueError):
    """A multipart message that is not a KV-event message."""


class Frame(msgspec.Struct, gc=False):
    topic: bytes
    seq: int
    payload: bytes


_END_OF_REPLAY: Final = -1


def _seq(raw: bytes, *, signed: bool = False) -> int:
    if len(raw) != 8:
        raise FrameError(f"sequence frame has {len(raw)} bytes, expected 8")
    return int.from_bytes(raw, "big", signed=signed)


def parse_frames(frames: list[bytes]) -> Frame:
    """A live message: exactly ``[topic, seq8, payload]``."""
    if len(frames) != 3:
        raise FrameError(f"live message has {len(frames)} frames, expected 3")
    topic, seq, payload = frames
    return Frame(topic=topic, seq=_seq(seq), payload=payload)


def parse_replay_frames(frames: list[bytes]) -> Frame | None:
    """A replay reply as a DEALER sees it: ``[b"", topic, seq8, payload]`` (current vLLM) or
    ``[b"", seq8, payload]`` (older vLLM, SGLang). Returns None for the end-of-replay marker
    (seq -1, empty payload)."""
    if frames and frames[0] == b"":
        frames = frames[1:]
    if len(frames) == 3:
        topic, seq_raw, payload = frames
    elif len(frames) == 2:
        topic, (seq_raw, payload) = b"", frames
    else:
        raise FrameError(f"replay message has {len(frames)} frames, expected 2 or 3 after b''")
    if _seq(seq_raw, signed=True) == _END_OF_REPLAY:
        return None
    return Frame(topic=topic, seq=_seq(seq_raw), payload=payload)
