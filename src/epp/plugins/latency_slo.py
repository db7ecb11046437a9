"""llm-d's SLO-aware scheduling plugins over the `predicted-latency-producer`'s predictions
(`LatencyPredictionInfo` per endpoint in the cycle state) and the prefix producers' matches:

- `latency-scorer`: scores by SLO headroom (tightest fit first by default); without
  predictions, a composite of free KV cache, queue and prefix match.
- `slo-headroom-tier-filter`: keeps the endpoints predicted within their SLOs (with a small
  exploration probability of the others).
- `prefix-cache-affinity-filter`: keeps the endpoints whose prefix match is at least a
  threshold, unless that costs too much predicted TTFT.

Filters run before the profile's scorers, so they read the matches of a prefix *producer*
(approx- or precise-prefix-cache-producer); a config without one gets an
approx-prefix-cache-producer with its defaults, as in llm-d."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import Filter, Plugin, Scorer, Scores
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.producers import ensure_prefix_producer
from epp.plugins.shared import (
    LatencyPredictionInfo,
    PrefixMatchInfo,
    latency_predictions,
    prefix_match,
)
from epp.types import Endpoint, LLMRequest

_EPS = 1e-9
# llm-d maps scores onto integer weights 1..100 and divides by 100.
_W_MAX = 100


def prefix_score(info: PrefixMatchInfo | None, endpoint_key: str) -> float:
    """An endpoint's prefix match in [0, 1]: the producer's score when given, else the
    fraction of prompt tokens cached there."""
    if info is None:
        return 0.0
    if info.endpoint_scores is not None:
        return info.endpoint_scores.get(endpoint_key, 0.0)
    if info.prompt_tokens <= 0:
        return 0.0
    return min(1.0, info.hit_tokens(endpoint_key) / info.prompt_tokens)


# --- latency-scorer -----------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyScorerParams:
    ttft_weight: float = 0.8
    tpot_weight: float = 0.2
    strategy: str = "least"
    composite_kv_weight: float = 1.0
    composite_queue_weight: float = 1.0
    composite_prefix_weight: float = 1.0


def _parse_latency_scorer(params: Params) -> LatencyScorerParams:
    return LatencyScorerParams(
        ttft_weight=params.number("ttftWeight", 0.8),
        tpot_weight=params.number("tpotWeight", 0.2),
        strategy=params.string("headroomSelectionStrategy", "least", choices=("least", "most")),
        composite_kv_weight=params.number("compositeKVWeight", 1.0),
        composite_queue_weight=params.number("compositeQueueWeight", 1.0),
        composite_prefix_weight=params.number("compositePrefixWeight", 1.0),
    )


@dataclass(slots=True)
class _Headroom:
    index: int
    ttft: float
    tpot: float
    info: LatencyPredictionInfo | None


class LatencyScorer(Scorer):
    """With predictions: endpoints with non-negative TTFT and TPOT headroom are scored among
    themselves (strategy `least`: least headroom scores highest, packing requests tightly;
    `most`: most headroom); the others score 0. When none has headroom, the first non-empty
    bucket of: idle endpoints (nothing dispatched), negative TPOT only, negative TTFT only,
    both negative, is scored (least absolute deficit first). Headrooms are min-max
    normalised per bucket and combined with ttftWeight/tpotWeight (normalised to sum 1; all
    weight on the one that varies when only one does), then mapped to (0, 1] in steps of
    1/100. Without predictions: `kvW * free KV + queueW * relative queue + prefixW * prefix
    match` with the weights normalised."""

    type_name = "latency-scorer"

    def __init__(self, name: str, params: LatencyScorerParams) -> None:
        super().__init__(name)
        self.params = params

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        predictions = latency_predictions(cycle)
        scores = [0.0] * len(endpoints)
        data = []
        for i, e in enumerate(endpoints):
            info = predictions.get(cycle.key(e)) if predictions else None
            if info is None:
                data.append(_Headroom(i, 0.0, 0.0, None))
            else:
                data.append(_Headroom(i, info.ttft_headroom_ms, info.tpot_headroom_ms, info))
        if all(d.info is None for d in data):
            return self._composite(cycle, endpoints)
        positive = [d for d in data if d.info is None or (d.ttft >= 0 and d.tpot >= 0)]
        if positive:
            self._score_bucket(positive, scores, force_least=False)
            return scores
        negative = data
        idle = [d for d in negative if d.info is not None and d.info.dispatched_requests == 0]
        if idle:
            self._score_bucket(idle, scores, force_least=True)
            return scores
        tpot_only = [d for d in negative if d.tpot < 0 <= d.ttft]
        ttft_only = [d for d in negative if d.ttft < 0 <= d.tpot]
        both = [d for d in negative if not (d.tpot < 0 <= d.ttft) and not (d.ttft < 0 <= d.tpot)]
        for bucket in (tpot_only, ttft_only, both):
            if bucket:
                self._score_bucket(bucket, scores, force_least=True)
                return scores
        return scores

    def _score_bucket(
        self, bucket: list[_Headroom], scores: list[float], force_least: bool
    ) -> None:
        p = self.params
        total = p.ttft_weight + p.tpot_weight
        alpha, beta = (p.ttft_weight / total, p.tpot_weight / total) if total > 0 else (1.0, 0.0)
        ttfts = [abs(d.ttft) for d in bucket]
        tpots = [abs(d.tpot) for d in bucket]
        ttft_lo, ttft_range = min(ttfts), max(ttfts) - min(ttfts)
        tpot_lo, tpot_range = min(tpots), max(tpots) - min(tpots)
        if ttft_range <= _EPS < tpot_range:
            alpha, beta = 0.0, 1.0
        elif tpot_range <= _EPS < ttft_range:
            alpha, beta = 1.0, 0.0
        least = force_least or p.strategy == "least"
        for d in bucket:
            n_ttft = (abs(d.ttft) - ttft_lo) / ttft_range if ttft_range > _EPS else 0.5
            n_tpot = (abs(d.tpot) - tpot_lo) / tpot_range if tpot_range > _EPS else 0.5
            combined = alpha * n_ttft + beta * n_tpot
            weight = int((1.0 - combined if least else combined) * _W_MAX) + 1
            scores[d.index] = min(weight, _W_MAX) / _W_MAX

    def _composite(self, cycle: CycleState, endpoints: list[Endpoint]) -> Scores:
        p = self.params
        kv_w, queue_w, prefix_w = (
            p.composite_kv_weight,
            p.composite_queue_weight,
            p.composite_prefix_weight,
        )
        total = kv_w + queue_w + prefix_w
        if total <= 0:
            kv_w, queue_w, prefix_w, total = 1.0, 0.0, 0.0, 1.0
        kv_w, queue_w, prefix_w = kv_w / total, queue_w / total, prefix_w / total
        max_queue = max((e.metrics.waiting for e in endpoints), default=0)
        info = prefix_match(cycle)
        out = []
        for e in endpoints:
            relative_queue = (max_queue - e.metrics.waiting) / max_queue if max_queue > 0 else 1.0
            composite = (
                kv_w * (1.0 - e.metrics.kv_usage)
                + queue_w * relative_queue
                + prefix_w * prefix_score(info, cycle.key(e))
            )
            out.append(round(_W_MAX * composite) / _W_MAX)
        return out


# --- slo-headroom-tier-filter -------------------------------------------------------------


def _parse_tier(params: Params) -> float:
    return params.number("epsilonExploreNeg", 0.01, min=0.0, max=1.0)


class SLOHeadroomTierFilter(Filter):
    """Splits the candidates into those predicted within their SLOs (TTFT and TPOT headroom
    >= 0) and the rest (including endpoints without a prediction). Keeps the positive tier,
    except with probability `epsilonExploreNeg` the negative one (exploration); only one
    tier present: that one; no predictions at all: everything."""

    type_name = "slo-headroom-tier-filter"

    def __init__(self, name: str, epsilon_explore_negative: float, rng: random.Random) -> None:
        super().__init__(name)
        self.epsilon = epsilon_explore_negative
        self._rng = rng

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        if len(endpoints) <= 1:
            return endpoints
        predictions = latency_predictions(cycle) or {}
        positive: list[Endpoint] = []
        negative: list[Endpoint] = []
        missing: list[Endpoint] = []
        for e in endpoints:
            info = predictions.get(cycle.key(e))
            if info is None:
                missing.append(e)
            elif info.ttft_headroom_ms >= 0 and info.tpot_headroom_ms >= 0:
                positive.append(e)
            else:
                negative.append(e)
        if not positive and not negative:
            return endpoints
        negative.extend(missing)
        if positive and negative:
            return negative if self._rng.random() < self.epsilon else positive
        return positive or negative


# --- prefix-cache-affinity-filter ---------------------------------------------------------


@dataclass(frozen=True)
class AffinityFilterParams:
    affinity_threshold: float = 0.80
    exploration_probability: float = 0.01
    max_ttft_penalty_ms: float = 5000.0


def _parse_affinity(params: Params) -> AffinityFilterParams:
    # Newer llm-d: which producers to read and a prefill throughput for its own TTFT
    # estimate; this filter reads whichever producers ran, so they have no effect.
    params.ignore(
        "prefixMatchInfoProducerName", "inFlightLoadProducerName", "peakPrefillThroughput"
    )
    return AffinityFilterParams(
        affinity_threshold=params.number("affinityThreshold", 0.80, max=1.0),
        exploration_probability=params.number("explorationProbability", 0.01, min=0.0, max=1.0),
        max_ttft_penalty_ms=params.number("maxTTFTPenaltyMs", 5000.0, min=0.0),
    )


class PrefixCacheAffinityFilter(Filter):
    """Keeps the "sticky" endpoints, whose prefix match is at least `affinityThreshold`,
    when there are any. Skipped (everything kept) with probability `explorationProbability`,
    when the threshold is <= 0, and when the best predicted TTFT among sticky endpoints is
    more than `maxTTFTPenaltyMs` worse than among the others (the cache is not worth the
    queue)."""

    type_name = "prefix-cache-affinity-filter"

    def __init__(self, name: str, params: AffinityFilterParams, rng: random.Random) -> None:
        super().__init__(name)
        self.params = params
        self._rng = rng

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        p = self.params
        if len(endpoints) <= 1 or p.affinity_threshold <= 0:
            return endpoints
        if self._rng.random() < p.exploration_probability:
            return endpoints
        info = prefix_match(cycle)
        sticky: list[Endpoint] = []
        others: list[Endpoint] = []
        for e in endpoints:
            (sticky if prefix_score(info, cycle.key(e)) >= p.affinity_threshold else others).append(
                e
            )
        if not sticky:
            return endpoints
        if p.max_ttft_penalty_ms > 0 and others:
            predictions = latency_predictions(cycle) or {}

            def best_ttft(group: list[Endpoint]) -> float:
                values = [
                    predictions[cycle.key(e)].ttft_ms for e in group if cycle.key(e) in predictions
                ]
                return min(values, default=math.inf)

            sticky_best, other_best = best_ttft(sticky), best_ttft(others)
            if math.isfinite(sticky_best) and sticky_best - other_best > p.max_ttft_penalty_ms:
                return endpoints
        return sticky


def register(registry: Registry) -> None:
    def build_scorer(name: str, p: LatencyScorerParams, ctx: BuildContext) -> Plugin:
        ensure_prefix_producer(ctx)  # the composite fallback reads prefix matches
        return LatencyScorer(name, p)

    registry.register(
        PluginType(
            LatencyScorer.type_name,
            LatencyScorer,
            _parse_latency_scorer,
            build_scorer,
            "SLO headroom from latency predictions",
        )
    )

    def build_tier(name: str, epsilon: float, ctx: BuildContext) -> Plugin:
        return SLOHeadroomTierFilter(name, epsilon, ctx.deps.rng)

    registry.register(
        PluginType(
            SLOHeadroomTierFilter.type_name,
            SLOHeadroomTierFilter,
            _parse_tier,
            build_tier,
            "endpoints predicted within their SLOs",
        )
    )

    def build_affinity(name: str, p: AffinityFilterParams, ctx: BuildContext) -> Plugin:
        ensure_prefix_producer(ctx)  # filters run before any prefix scorer could
        return PrefixCacheAffinityFilter(name, p, ctx.deps.rng)

    registry.register(
        PluginType(
            PrefixCacheAffinityFilter.type_name,
            PrefixCacheAffinityFilter,
            _parse_affinity,
            build_affinity,
            "endpoints with a prefix match above a threshold",
        )
    )
