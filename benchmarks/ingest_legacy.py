"""The ingest hot path as it was before the 2026-12-01 ingest-perf pass, kept only so that
``benchmarks/ingest_perf.py`` can measure before and after side by side in one process.

Benchmark-only: nothing in the product imports this. The functions are verbatim copies of
``kvindex.wire.decode_batch`` (and its helpers), ``EventApplier.apply_batch`` / ``_stored`` /
``_removed`` / ``_tier`` and ``IngestService._apply`` / ``_on_live``'s decode step at commit
cf15eb5; :class:`legacy_ingest` swaps them in.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from kvindex import ingest as ingest_module
from kvindex import ingest_service as service_module
from kvindex import wire
from kvindex.index.base import Clear, IndexOp, Remove, Store, StoredBlock, Tier
from kvindex.index.redis import IndexUnavailable
from kvindex.ingest import EventApplier, IngestCounts, extras_for_blocks
from kvindex.ingest_service import IngestService
from kvindex.keys import ContentKey, chain_keys, root_key
from kvindex.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    EngineHash,
    Event,
    Medium,
)

# -- kvindex.wire ------------------------------------------------------------------------------


def _normalise(event: Any) -> Event:
    if isinstance(event, wire._ArrayStored | wire._MapStored):
        return BlockStored(
            block_hashes=event.block_hashes,
            parent_block_hash=event.parent_block_hash,
            token_ids=event.token_ids,
            block_size=event.block_size,
            lora_name=event.lora_name,
            medium=event.medium or Medium.GPU,
            extra_keys=event.extra_keys,
            group_idx=event.group_idx or 0,
            kv_cache_spec_kind=event.kv_cache_spec_kind,
            kv_cache_spec_sliding_window=event.kv_cache_spec_sliding_window,
            lora_id=event.lora_id,
        )
    if isinstance(event, wire._ArrayRemoved | wire._MapRemoved):
        return BlockRemoved(
            block_hashes=event.block_hashes,
            medium=event.medium or Medium.GPU,
            group_idx=event.group_idx or 0,
        )
    return AllBlocksCleared()


def _valid_hashes(hashes: list[Any]) -> bool:
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


def _decode_one(raw: msgspec.Raw) -> Event | str:
    data = bytes(raw)
    if not data:
        return "malformed"
    first = data[0]
    is_map = 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)
    try:
        return _normalise(
            wire._decode_map_event(data) if is_map else wire._decode_array_event(data)
        )
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    try:
        generic = wire._decode_any(data)
    except msgspec.DecodeError:
        return "malformed"
    tag = generic.get("type") if isinstance(generic, dict) else None
    if isinstance(generic, list) and generic:
        tag = generic[0]
    return "unknown" if isinstance(tag, str) and tag not in wire._KNOWN_TAGS else "malformed"


def legacy_decode_batch(payload: bytes) -> DecodedBatch:
    """``kvindex.wire.decode_batch`` before the ingest-perf pass."""
    try:
        batch = wire._decode_array_batch(payload)
        return _finish(
            batch.ts, [_normalise(e) for e in batch.events], batch.data_parallel_rank, 0, 0
        )
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    try:
        mbatch = wire._decode_map_event_batch(payload)
        return _finish(
            mbatch.ts, [_normalise(e) for e in mbatch.events], mbatch.data_parallel_rank, 0, 0
        )
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    raw_batch: Any
    try:
        raw_batch = wire._decode_raw_array_batch(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        try:
            raw_batch = wire._decode_raw_map_batch(payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
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


# -- kvindex.ingest.EventApplier ----------------------------------------------------------------


def _legacy_apply_batch(
    self: EventApplier, engine: str, batch: DecodedBatch, model: str | None
) -> IngestCounts:
    counts = IngestCounts()
    model = model or self.config.default_model
    ops: list[IndexOp] = []
    local: dict[EngineHash, ContentKey] = {}
    stored_any = False
    for event in batch.events:
        name = type(event).__name__
        counts.events[name] = counts.events.get(name, 0) + 1
        if isinstance(event, BlockStored):
            op = _legacy_stored(self, engine, model, event, local, counts)
            if op is not None:
                ops.append(op)
                stored_any = True
        elif isinstance(event, BlockRemoved):
            _legacy_removed(self, engine, event, ops, counts, local)
        elif isinstance(event, AllBlocksCleared):
            ops.append(Clear())
            local.clear()
            self._pending.pop(engine, None)
    if ops:
        self.index.apply(engine, ops)
    if stored_any and self._pending.get(engine):
        self._retry_pending(engine, counts)
    counts.pending = len(self._pending.get(engine, ()))
    return counts


def _legacy_tier(medium: str, counts: IngestCounts) -> Tier | None:
    try:
        return Tier.from_medium(medium)
    except KeyError:
        counts.skip("unknown_medium")
        return None


def _legacy_stored(
    self: EventApplier,
    engine: str,
    model: str,
    event: BlockStored,
    local: dict[EngineHash, ContentKey],
    counts: IngestCounts,
) -> Store | None:
    kind = event.kv_cache_spec_kind
    if kind is not None and kind not in self.config.indexed_kinds:
        self._skipped_groups.setdefault(engine, set()).add(event.group_idx)
        counts.skip("group_not_indexed", len(event.block_hashes))
        return None
    tier = _legacy_tier(event.medium, counts)
    if tier is None:
        return None
    size = event.block_size
    canonical = self.config.block_size
    n = len(event.block_hashes)
    group = (engine, event.group_idx)
    known = self._engine_block_size.get(group, 0)
    if size < known:
        counts.skip("partial_block", n)
        return None
    if size % canonical:
        counts.skip("block_size_not_multiple", n)
        return None
    if len(event.token_ids) != n * size:
        counts.skip("token_count_mismatch", n)
        return None
    if size > known:
        self._engine_block_size[group] = size
    parent_hash = event.parent_block_hash
    if parent_hash is None:
        parent = root_key(model, event.lora_name)
    else:
        found = local.get(parent_hash)
        if found is None:
            found = self.index.resolve(engine, parent_hash)
        if found is None:
            self._hold(engine, event, model, counts)
            return None
        parent = found
    split = size // canonical
    extras = extras_for_blocks(
        event.extra_keys, n, event.lora_name, parent_hash is None, split, canonical
    )
    try:
        keys = chain_keys(parent, event.token_ids, canonical, extras)
    except OverflowError:
        counts.skip("token_id_out_of_range", n)
        return None
    made = None
    native = ingest_module._native_stored_blocks
    if native is not None:
        made = native(StoredBlock, event.block_hashes, keys, split, local)
    if made is not None:
        blocks = made
    elif split == 1:
        blocks = [StoredBlock(h, (k,)) for h, k in zip(event.block_hashes, keys, strict=True)]
        local.update(zip(event.block_hashes, keys, strict=True))
    else:
        blocks = [
            StoredBlock(h, tuple(keys[i * split : (i + 1) * split]))
            for i, h in enumerate(event.block_hashes)
        ]
        for block in blocks:
            local[block.engine_hash] = block.keys[-1]
    counts.stored_blocks += n
    return Store(tier, blocks)


def _legacy_removed(
    self: EventApplier,
    engine: str,
    event: BlockRemoved,
    ops: list[IndexOp],
    counts: IngestCounts,
    local: dict[EngineHash, ContentKey],
) -> None:
    if event.group_idx in self._skipped_groups.get(engine, ()):
        counts.skip("group_not_indexed", len(event.block_hashes))
        return
    tier = _legacy_tier(event.medium, counts)
    if tier is None:
        return
    for h in event.block_hashes:
        local.pop(h, None)
    ops.append(Remove(tier, event.block_hashes))
    counts.removed_blocks += len(event.block_hashes)


# -- kvindex.ingest_service.IngestService ---------------------------------------------------


def _legacy_service_apply(
    self: IngestService, stream: Any, seq: int, decoded: DecodedBatch
) -> bool:
    try:
        counts = _legacy_apply_batch(self.applier, stream.key, decoded, stream.model)
    except IndexUnavailable as exc:
        self._index_failed(stream, exc)
        return False
    self.metrics.add_counts(counts)
    series = stream.series
    if series is None:
        series = stream.series = self.metrics.engine_series(stream.key)
    now = time.time()
    series.last_seq.set(seq)
    series.last_batch_time.set(now)
    if decoded.ts > stream.last_ts:
        lag = max(0.0, now - decoded.ts)
        series.lag.set(lag)
        self.metrics.lag_histogram.observe(lag)
    series.pending.set(counts.pending)
    stream.last_ts = max(stream.last_ts, decoded.ts)
    stream.applied_seq = max(stream.applied_seq, seq)
    if counts.pending > stream.pending:
        stream.pending_grew = True
    stream.pending = counts.pending
    with self._activity_lock:
        record = self._activity_of(stream.key)
        record.batches += 1
        for kind, n in counts.events.items():
            record.events[kind] = record.events.get(kind, 0) + n
        for reason, n in counts.skipped.items():
            record.skipped[reason] = record.skipped.get(reason, 0) + n
        record.last_seq = seq
        record.last_batch_time = now
    return True


def _legacy_service_decode(self: IngestService, payload: bytes) -> DecodedBatch | None:
    decoded = legacy_decode_batch(payload)
    if decoded.error is not None:
        self.metrics.decode_errors.labels("batch").inc()
        self._warn_once("decode", "event=undecodable_batch error=%r", decoded.error)
        return None
    if decoded.unknown:
        self.metrics.unknown_events.inc(decoded.unknown)
    if decoded.malformed:
        self.metrics.decode_errors.labels("event").inc(decoded.malformed)
    return decoded


class legacy_ingest:
    """Within: the pre-pass decode, EventApplier and IngestService hot paths."""

    _patches: tuple[tuple[object, str, object], ...] = (
        (EventApplier, "apply_batch", _legacy_apply_batch),
        (IngestService, "_apply", _legacy_service_apply),
        (IngestService, "_decode", _legacy_service_decode),
        (service_module, "decode_batch", legacy_decode_batch),
    )

    def __enter__(self) -> None:
        self.saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self._patches]
        for obj, name, new in self._patches:
            setattr(obj, name, new)

    def __exit__(self, *exc: object) -> None:
        for obj, name, old in self.saved:
            setattr(obj, name, old)
