"""Summaries of demo runs: the numbers in the final table, JSON and the chart."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvtools.demo.driver import RequestResult

__all__ = ["RunSummary", "quantile", "summarise"]


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) by linear interpolation between the closest ranks (numpy's
    default), None for no values: the one percentile every demo and benchmark reports."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(slots=True)
class RunSummary:
    policy: str
    requests: int
    errors: int
    hit_rate: float  # cached prompt tokens / prompt tokens
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    throughput_tok_s: float  # completion tokens per second of wall time
    wall_s: float
    per_engine: dict[str, int] = field(default_factory=dict)
    load_cv: float = 0.0  # coefficient of variation of requests per engine
    gateway: str = "envoy"  # what stood in front: "envoy" or "direct" (the fallback gateway)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(
    policy: str,
    results: Sequence[RequestResult],
    wall_s: float,
    engines: Sequence[str],
    gateway: str = "envoy",
) -> RunSummary:
    ok = [r for r in results if r.error is None and r.status == 200]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    counts = Counter(r.engine for r in ok)
    per_engine = {e: counts.get(e, 0) for e in engines}
    for engine, n in counts.items():  # an engine the run did not know (should not happen)
        per_engine.setdefault(engine or "?", n)
    loads = list(per_engine.values())
    mean = statistics.fmean(loads) if loads else 0.0
    cv = statistics.pstdev(loads) / mean if mean else 0.0
    return RunSummary(
        policy=policy,
        requests=len(results),
        errors=len(results) - len(ok),
        hit_rate=cached / prompt if prompt else 0.0,
        ttft_p50_s=quantile(ttfts, 0.5),
        ttft_p90_s=quantile(ttfts, 0.9),
        throughput_tok_s=sum(r.completion_tokens for r in ok) / wall_s if wall_s else 0.0,
        wall_s=wall_s,
        per_engine=per_engine,
        load_cv=cv,
        gateway=gateway,
    )
