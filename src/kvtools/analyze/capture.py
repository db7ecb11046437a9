"""Analysis of a recorded KV-event capture (``kvindex record``): replays the frames through
the real decode -> ingest -> index path and reports, per engine and over time, blocks
stored, removed (evicted), reused (a block the engine already held announced again, as vLLM
does for prefix-cache hits), the index size, and prefixes duplicated across engines (content
keys held by more than one engine).

The capture file reader is a teammate's (``kvindex.capture.read_capture``); this module only
needs frames with the :class:`CapturedFrameLike` shape, so tests build them directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvindex.engines import TopicError, parse_topic
from kvindex.index import (
    Clear,
    IndexOp,
    IndexStats,
    MemoryIndex,
    PrefixMatch,
    Remove,
    Store,
)
from kvindex.ingest import EventApplier, IngestConfig, SeqAction, SequenceTracker
from kvindex.keys import DEFAULT_BLOCK_SIZE, ContentKey
from kvindex.wire import EngineHash, decode_batch

__all__ = [
    "CAPTURE_SCHEMA",
    "CaptureAnalysis",
    "CaptureReader",
    "CapturedFrameLike",
    "analyze_capture",
    "default_capture_reader",
]

CAPTURE_SCHEMA = "kvtools.analyze.capture/v1"


class CapturedFrameLike(Protocol):
    """One recorded ZMQ message (``kvindex.capture.CapturedFrame`` has these fields)."""

    @property
    def received_at(self) -> float: ...  # seconds (wall clock of the recorder)

    @property
    def topic(self) -> bytes: ...

    @property
    def seq(self) -> int: ...

    @property
    def payload(self) -> bytes: ...


CaptureReader = Callable[[Path], Iterator[CapturedFrameLike]]


def default_capture_reader() -> CaptureReader:
    """``kvindex.capture.read_capture`` (written by a teammate; imported by name so this
    package builds before it is merged)."""
    try:
        module = importlib.import_module("kvindex.capture")
    except ImportError as e:
        raise RuntimeError(
            "reading capture files needs kvindex.capture (kvindex record), which is not in "
            "this build"
        ) from e
    reader: CaptureReader = module.read_capture
    return reader


@dataclass(slots=True)
class EngineCounters:
    stored: int = 0  # blocks newly stored
    removed: int = 0  # blocks removed (evicted) that the engine held
    reused: int = 0  # blocks stored again while held (re-announced prefix hits)
    cleared: int = 0  # AllBlocksCleared events
    batches: int = 0
    gaps: int = 0
    duplicates: int = 0  # batches with an already-seen seq (skipped)
    resets: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # ingest skips by reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "stored": self.stored,
            "removed": self.removed,
            "reused": self.reused,
            "cleared": self.cleared,
            "batches": self.batches,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "resets": self.resets,
            "skipped": dict(self.skipped),
        }


class RecordingIndex:
    """A :class:`BlockIndex` that counts what each engine's ops change, then delegates to a
    :class:`MemoryIndex`."""

    def __init__(self, inner: MemoryIndex) -> None:
        self.inner = inner
        self.held: dict[str, dict[tuple[int, EngineHash], tuple[ContentKey, ...]]] = {}
        self.counters: dict[str, EngineCounters] = {}

    def counter(self, engine: str) -> EngineCounters:
        c = self.counters.get(engine)
        if c is None:
            c = self.counters[engine] = EngineCounters()
        return c

    def apply(self, engine: str, ops: Sequence[IndexOp]) -> None:
        held = self.held.setdefault(engine, {})
        c = self.counter(engine)
        for op in ops:
            if isinstance(op, Store):
                for block in op.blocks:
                    slot = (int(op.tier), block.engine_hash)
                    if slot in held:
                        c.reused += 1
                    else:
                        c.stored += 1
                    held[slot] = block.keys
            elif isinstance(op, Remove):
                for h in op.engine_hashes:
                    if held.pop((int(op.tier), h), None) is not None:
                        c.removed += 1
            elif isinstance(op, Clear):
                c.cleared += 1
                for slot in [s for s in held if op.tier is None or s[0] == int(op.tier)]:
                    del held[slot]
        self.inner.apply(engine, ops)

    def resolve(self, engine: str, engine_hash: EngineHash) -> ContentKey | None:
        return self.inner.resolve(engine, engine_hash)

    def lookup(
        self, keys: Sequence[ContentKey], engines: Collection[str] | None = None
    ) -> dict[str, PrefixMatch]:
        return self.inner.lookup(keys, engines)

    def purge(self, engine: str) -> None:
        self.held.pop(engine, None)
        self.inner.purge(engine)

    def engines(self) -> list[str]:
        return self.inner.engines()

    def stats(self) -> IndexStats:
        return self.inner.stats()

    def _holders(self) -> dict[ContentKey, list[str]]:
        holders: dict[ContentKey, list[str]] = {}
        for engine in sorted(self.held):
            keys = {key for block_keys in self.held[engine].values() for key in block_keys}
            for key in keys:
                holders.setdefault(key, []).append(engine)
        return holders

    def duplicated(self) -> dict[int, int]:
        """Number of engines holding a key -> how many keys (only counts >= 2)."""
        out: dict[int, int] = {}
        for engines in self._holders().values():
            if len(engines) > 1:
                out[len(engines)] = out.get(len(engines), 0) + 1
        return dict(sorted(out.items()))

    def duplicated_pairs(self) -> dict[tuple[str, str], int]:
        """(engine, engine) -> keys both hold: where the same prefixes are cached twice."""
        out: dict[tuple[str, str], int] = {}
        for engines in self._holders().values():
            for i, a in enumerate(engines):
                for b in engines[i + 1 :]:
                    out[(a, b)] = out.get((a, b), 0) + 1
        return dict(sorted(out.items(), key=lambda item: (-item[1], item[0])))


@dataclass(slots=True)
class _Window:
    start_s: float
    per_engine: dict[str, list[int]] = field(default_factory=dict)  # [stored, removed, reused]


@dataclass(slots=True)
class CaptureAnalysis:
    index: RecordingIndex
    frames: int = 0
    bad_frames: dict[str, int] = field(default_factory=dict)  # by reason
    first_s: float | None = None
    last_s: float | None = None
    window_s: float = 10.0
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def bad(self, reason: str) -> None:
        self.bad_frames[reason] = self.bad_frames.get(reason, 0) + 1

    def document(self) -> dict[str, Any]:
        stats = self.index.stats()
        duplicated = self.index.duplicated()
        return {
            "schema": CAPTURE_SCHEMA,
            "frames": self.frames,
            "bad_frames": dict(self.bad_frames),
            "span_s": 0.0
            if self.first_s is None or self.last_s is None
            else self.last_s - self.first_s,
            "window_s": self.window_s,
            "index": {"keys": stats.keys, "entries": stats.entries, "engines": stats.engines},
            "engines": {
                name: {**c.as_dict(), "held_blocks": len(self.index.held.get(name, {}))}
                for name, c in sorted(self.index.counters.items())
            },
            "duplicated": {
                "keys_on_multiple_engines": sum(duplicated.values()),
                "by_engine_count": {str(k): v for k, v in duplicated.items()},
                "by_engine_pair": [
                    {"engines": list(pair), "keys": n}
                    for pair, n in self.index.duplicated_pairs().items()
                ],
            },
            "timeline": self.timeline,
        }


def analyze_capture(
    frames: Iterable[CapturedFrameLike],
    *,
    window_s: float = 10.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    default_model: str = "",
) -> CaptureAnalysis:
    """Replay ``frames`` in order into a fresh index. Frames with an unparsable topic or
    payload are skipped and counted; duplicate seqs are skipped; a seq restart clears the
    engine (as the live subscriber does)."""
    index = RecordingIndex(MemoryIndex())
    applier = EventApplier(index, IngestConfig(block_size=block_size, default_model=default_model))
    tracker = SequenceTracker()
    analysis = CaptureAnalysis(index, window_s=window_s)
    window: _Window | None = None

    def close(w: _Window) -> None:
        analysis.timeline.append(
            {
                "t_s": w.start_s - (analysis.first_s or 0.0),
                "engines": {
                    name: {"stored": v[0], "removed": v[1], "reused": v[2]}
                    for name, v in sorted(w.per_engine.items())
                },
                "index_keys": index.stats().keys,
                "duplicated_keys": sum(index.duplicated().values()),
            }
        )

    for frame in frames:
        analysis.frames += 1
        t = float(frame.received_at)
        if analysis.first_s is None:
            analysis.first_s = t
        analysis.last_s = t
        if window is None:
            window = _Window(t)
        if t >= window.start_s + window_s:
            # Close the window and jump to the one holding t (empty windows are omitted).
            close(window)
            skipped = int((t - window.start_s) // window_s)
            window = _Window(window.start_s + skipped * window_s)
        try:
            engine_id = parse_topic(frame.topic, default_model or None)
        except TopicError:
            analysis.bad("bad_topic")
            continue
        batch = decode_batch(frame.payload)
        if batch.error is not None:
            analysis.bad("bad_payload")
            continue
        endpoint = engine_id.endpoint(batch.data_parallel_rank)
        c = index.counter(endpoint)
        action = tracker.observe(endpoint, frame.seq)
        if action is SeqAction.DUPLICATE:
            c.duplicates += 1
            continue
        if action is SeqAction.GAP:
            c.gaps += 1
        elif action is SeqAction.RESET:
            c.resets += 1
            index.apply(endpoint, [Clear()])
            applier.forget(endpoint)
        before = (c.stored, c.removed, c.reused)
        counts = applier.apply_batch(endpoint, batch, engine_id.model)
        c.batches += 1
        for reason, n in counts.skipped.items():
            c.skipped[reason] = c.skipped.get(reason, 0) + n
        if batch.unknown:
            c.skipped["unknown_event"] = c.skipped.get("unknown_event", 0) + batch.unknown
        if batch.malformed:
            c.skipped["malformed_event"] = c.skipped.get("malformed_event", 0) + batch.malformed
        row = window.per_engine.setdefault(endpoint, [0, 0, 0])
        row[0] += c.stored - before[0]
        row[1] += c.removed - before[1]
        row[2] += c.reused - before[2]
    if window is not None:
        close(window)
    return analysis
