"""Per-policy metrics of one simulation run (definitions in docs/analyze.md)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtools.analyze.model import Trace

__all__ = ["EngineLoad", "Percentiles", "PolicyResult", "percentile", "reuse_ceiling", "summarise"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclass(frozen=True, slots=True)
class Percentiles:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        ordered = sorted(values)
        mean = statistics.fmean(ordered) if ordered else 0.0
        return cls(mean, percentile(ordered, 50), percentile(ordered, 90), percentile(ordered, 99))

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "p50": self.p50, "p90": self.p90, "p99": self.p99}


@dataclass(frozen=True, slots=True)
class EngineLoad:
    requests: int
    prefill_busy_ms: float
    max_waiting: int
    evicted_blocks: int

    def as_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "prefill_busy_ms": self.prefill_busy_ms,
            "max_waiting": self.max_waiting,
            "evicted_blocks": self.evicted_blocks,
        }


@dataclass(slots=True)
class PolicyResult:
    policy: str
    requests: int
    total_blocks: int
    hit_blocks: int
    total_tokens: int
    hit_tokens: int
    ttft_ms: Percentiles
    queue_ms: Percentiles
    engines: list[EngineLoad]
    window_s: float
    timeline_hit_rate: list[float | None]  # block hit rate of requests arriving per window
    index_keys: int | None = None  # precise policy: keys in the MemoryIndex at the end
    ingest_skipped: dict[str, int] | None = None  # precise policy: events ingest skipped
    ttft_samples: list[float] = field(default_factory=list)  # sorted; for plots, not JSON

    @property
    def hit_rate_blocks(self) -> float:
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def hit_rate_tokens(self) -> float:
        return self.hit_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def load_max_over_mean(self) -> float:
        counts = [e.requests for e in self.engines]
        mean = statistics.fmean(counts) if counts else 0.0
        return max(counts) / mean if mean else 0.0

    @property
    def load_cv(self) -> float:
        counts = [e.requests for e in self.engines]
        mean = statistics.fmean(counts) if counts else 0.0
        return statistics.pstdev(counts) / mean if mean else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "requests": self.requests,
            "hit_rate_blocks": self.hit_rate_blocks,
            "hit_rate_tokens": self.hit_rate_tokens,
            "hit_blocks": self.hit_blocks,
            "total_blocks": self.total_blocks,
            "hit_tokens": self.hit_tokens,
            "total_tokens": self.total_tokens,
            "ttft_ms": self.ttft_ms.as_dict(),
            "queue_ms": self.queue_ms.as_dict(),
            "load": {
                "max_over_mean": self.load_max_over_mean,
                "cv": self.load_cv,
                "engines": [e.as_dict() for e in self.engines],
            },
            "timeline": {"window_s": self.window_s, "hit_rate_blocks": self.timeline_hit_rate},
            "index_keys": self.index_keys,
            "ingest_skipped": self.ingest_skipped,
        }


def reuse_ceiling(trace: Trace) -> tuple[float, float]:
    """(block, token) hit rate with one unbounded cache seen in arrival order."""
    seen: set[int] = set()
    hit_blocks = hit_tokens = total_tokens = 0
    bt = trace.block_tokens
    for r in trace.requests:
        h = 0
        for key in r.keys:
            if key not in seen:
                break
            h += 1
        seen.update(r.keys)
        hit_blocks += h
        hit_tokens += min(h * bt, r.input_tokens)
        total_tokens += r.input_tokens
    blocks = trace.blocks
    return (
        hit_blocks / blocks if blocks else 0.0,
        hit_tokens / total_tokens if total_tokens else 0.0,
    )


def summarise(
    *,
    policy: str,
    trace: Trace,
    settings_windows: int,
    speed: float,
    engine_of: Sequence[int],
    hits: Sequence[int],
    start: Sequence[float],
    first_token: Sequence[float],
    per_engine: Sequence[tuple[int, float, int, int]],
    index_keys: int | None,
    ingest_skipped: dict[str, int] | None = None,
) -> PolicyResult:
    reqs = trace.requests
    bt = trace.block_tokens
    scale = 1.0 / speed
    arrival = [r.arrival_ms * scale for r in reqs]
    ttft = sorted(first_token[i] - arrival[i] for i in range(len(reqs)))
    queue = [start[i] - arrival[i] for i in range(len(reqs))]
    span_ms = (arrival[-1] - arrival[0]) if reqs else 0.0
    windows = max(1, settings_windows)
    width_ms = span_ms / windows if span_ms > 0 else 1.0
    w_hits = [0] * windows
    w_blocks = [0] * windows
    for i, r in enumerate(reqs):
        w = min(windows - 1, int((arrival[i] - arrival[0]) / width_ms))
        w_hits[w] += hits[i]
        w_blocks[w] += len(r.keys)
    return PolicyResult(
        policy=policy,
        requests=len(reqs),
        total_blocks=sum(len(r.keys) for r in reqs),
        hit_blocks=sum(hits),
        total_tokens=sum(r.input_tokens for r in reqs),
        hit_tokens=sum(min(h * bt, r.input_tokens) for h, r in zip(hits, reqs, strict=True)),
        ttft_ms=Percentiles.of(ttft),
        queue_ms=Percentiles.of(queue),
        engines=[EngineLoad(*row) for row in per_engine],
        window_s=width_ms / 1000.0,
        timeline_hit_rate=[h / b if b else None for h, b in zip(w_hits, w_blocks, strict=True)],
        index_keys=index_keys,
        ingest_skipped=ingest_skipped,
        ttft_samples=ttft,
    )
