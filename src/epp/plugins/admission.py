"""llm-d's admission plugins and saturation detectors.

Admitters run after the data producers and before the profiles; a denial answers 429
`rejected-admission`. Saturation detectors give the pool's saturation over the candidates
(>= 1.0 is full): a configured detector replaces the built-in thresholds in the scheduler's
sheddable-request check, and, listed in a profile, filters out endpoints over its limits."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import Admitter, Filter, Plugin, SaturationDetectorPlugin
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.common import no_parameters
from epp.plugins.predicted_latency import SLO_TPOT_HEADER, SLO_TTFT_HEADER
from epp.plugins.producers import InFlightLoadConsumer
from epp.plugins.shared import latency_predictions
from epp.types import Endpoint, LLMRequest

# --- probabilistic-admitter ---------------------------------------------------------------


@dataclass(frozen=True)
class ProbabilisticAdmitterParams:
    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8
    power: float = 5.0
    k: float = 300.0


def _parse_probabilistic(params: Params) -> ProbabilisticAdmitterParams:
    return ProbabilisticAdmitterParams(
        queue_depth_threshold=params.integer("queueDepthThreshold", 5, min=1),
        kv_cache_util_threshold=params.number(
            "kvCacheUtilThreshold", 0.8, min=0.0, min_exclusive=True
        ),
        power=params.number("power", 5.0, min=0.0, min_exclusive=True),
        k=params.number("k", 300.0, min=0.0, min_exclusive=True),
    )


class ProbabilisticAdmitter(Admitter):
    """Sheddable requests (priority < 0) are rejected with probability
    `min(saturation^power * k, 1)`, where saturation is the mean over the candidates of
    `max(waiting / queueDepthThreshold, kv_usage / kvCacheUtilThreshold)`. Others always pass."""

    type_name = "probabilistic-admitter"

    def __init__(self, name: str, params: ProbabilisticAdmitterParams, rng: random.Random) -> None:
        super().__init__(name)
        self.params = params
        self._rng = rng

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        p = self.params
        total = 0.0
        for e in endpoints:
            m = e.metrics
            if m.updated_at == 0.0:  # never scraped: llm-d counts an endpoint without metrics full
                total += 1.0
                continue
            total += max(
                m.waiting / p.queue_depth_threshold, m.kv_usage / p.kv_cache_util_threshold
            )
        return total / len(endpoints)

    def rejection_probability(self, endpoints: Sequence[Endpoint]) -> float:
        return min(float(self.saturation(endpoints) ** self.params.power) * self.params.k, 1.0)

    def admit(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> str | None:
        if request.priority >= 0 or not endpoints:
            return None
        saturation = self.saturation(endpoints)
        probability = self.rejection_probability(endpoints)
        if self._rng.random() < probability:
            return f"rejected, saturation={saturation:.3f} prob={probability:.2f}"
        return None


# --- latency-slo-admitter -----------------------------------------------------------------


def _slo_given(request: LLMRequest, header: str) -> bool:
    try:
        value = float(request.headers.get(header, ""))
    except ValueError:
        return False
    return value > 0 and math.isfinite(value)


class LatencySLOAdmitter(Admitter):
    """Rejects a sheddable request (priority < 0) that carries an SLO header
    (`x-slo-ttft-ms`, `x-slo-tpot-ms`) when latency predictions exist and no candidate is
    predicted within its SLOs, none is idle (no running request) and none is cold (KV usage
    below 2%). Reads the `predicted-latency-producer`'s predictions; without them it admits."""

    type_name = "latency-slo-admitter"

    def admit(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> str | None:
        if request.priority >= 0:
            return None
        if not (_slo_given(request, SLO_TTFT_HEADER) or _slo_given(request, SLO_TPOT_HEADER)):
            return None
        predictions = latency_predictions(cycle)
        if not predictions:
            return None
        for e in endpoints:
            if e.metrics.kv_usage < 0.02 or e.metrics.running == 0:
                return None
            info = predictions.get(cycle.key(e))
            if info is not None and info.valid:
                return None
        return "no valid endpoint available to serve the request"


# --- utilization-detector -----------------------------------------------------------------


@dataclass(frozen=True)
class UtilizationDetectorParams:
    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8
    metrics_staleness_threshold_s: float = 0.2
    headroom: float = 0.0


def _parse_utilization(params: Params) -> UtilizationDetectorParams:
    return UtilizationDetectorParams(
        queue_depth_threshold=params.integer("queueDepthThreshold", 5, min=1),
        kv_cache_util_threshold=params.number(
            "kvCacheUtilThreshold", 0.8, min=0.0, max=1.0, min_exclusive=True
        ),
        metrics_staleness_threshold_s=params.duration("metricsStalenessThreshold", 0.2),
        headroom=params.number("headroom", 0.0, min=0.0),
    )


class UtilizationDetector(SaturationDetectorPlugin, Filter):
    """Pool saturation = mean over the candidates of `max(waiting / queueDepthThreshold,
    kv_usage / kvCacheUtilThreshold)`, an endpoint with stale metrics counting 1.0. As a
    filter: endpoints with fresh metrics under both limits times `1 + headroom` (all of them
    when none is)."""

    type_name = "utilization-detector"

    def __init__(self, name: str, params: UtilizationDetectorParams) -> None:
        super().__init__(name)
        self.params = params

    def _stale(self, endpoint: Endpoint, now: float) -> bool:
        return endpoint.metrics.age(now) > self.params.metrics_staleness_threshold_s

    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        if not endpoints:
            return 1.0
        p = self.params
        total = 0.0
        for e in endpoints:
            if self._stale(e, now):
                total += 1.0
                continue
            m = e.metrics
            total += max(
                m.waiting / p.queue_depth_threshold, m.kv_usage / p.kv_cache_util_threshold
            )
        return total / len(endpoints)

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        p = self.params
        queue_limit = p.queue_depth_threshold * (1.0 + p.headroom)
        kv_limit = p.kv_cache_util_threshold * (1.0 + p.headroom)
        kept = [
            e
            for e in endpoints
            if not self._stale(e, cycle.now)
            and e.metrics.waiting < queue_limit
            and e.metrics.kv_usage < kv_limit
        ]
        return kept or endpoints


# --- concurrency-detector -----------------------------------------------------------------


@dataclass(frozen=True)
class ConcurrencyDetectorParams:
    max_concurrency: int = 100
    headroom: float = 0.0
    mode: str = "requests"
    max_token_concurrency: int = 1_000_000


def _parse_concurrency(params: Params) -> ConcurrencyDetectorParams:
    return ConcurrencyDetectorParams(
        max_concurrency=params.integer("maxConcurrency", 100, min=1),
        headroom=params.number("headroom", 0.0, min=0.0),
        mode=params.string("concurrencyMode", "requests", choices=("requests", "tokens")),
        max_token_concurrency=params.integer("maxTokenConcurrency", 1_000_000, min=1),
    )


class ConcurrencyDetector(SaturationDetectorPlugin, Filter, InFlightLoadConsumer):
    """Saturation from this picker's own in-flight counts (the `inflight-load-producer`'s;
    one is added when the config has none): total in flight / total capacity over the candidates,
    capacity `maxConcurrency` requests (or `maxTokenConcurrency` estimated tokens in `tokens`
    mode) per endpoint. As a filter: endpoints under capacity times `1 + headroom` (it may
    leave none, as llm-d)."""

    type_name = "concurrency-detector"

    def __init__(self, name: str, params: ConcurrencyDetectorParams) -> None:
        super().__init__(name)
        self.params = params

    def _in_flight(self, load_requests: int, load_tokens: int) -> int:
        return load_tokens if self.params.mode == "tokens" else load_requests

    @property
    def _capacity(self) -> int:
        p = self.params
        return p.max_token_concurrency if p.mode == "tokens" else p.max_concurrency

    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        if not endpoints:
            return 1.0
        total = 0
        for e in endpoints:
            load = self.tracker.load(e.key)
            total += self._in_flight(load.requests, load.tokens)
        return total / (self._capacity * len(endpoints))

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        limit = int(self._capacity * (1.0 + self.params.headroom))
        kept = []
        for e in endpoints:
            load = self.load(cycle, e)
            if self._in_flight(load.requests, load.tokens) < limit:
                kept.append(e)
        return kept


def register(registry: Registry) -> None:
    def build_probabilistic(name: str, p: ProbabilisticAdmitterParams, ctx: BuildContext) -> Plugin:
        return ProbabilisticAdmitter(name, p, ctx.deps.rng)

    registry.register(
        PluginType(
            ProbabilisticAdmitter.type_name,
            ProbabilisticAdmitter,
            _parse_probabilistic,
            build_probabilistic,
            "sheddable requests rejected with probability rising with saturation",
        )
    )
    registry.register(
        PluginType(
            LatencySLOAdmitter.type_name,
            LatencySLOAdmitter,
            no_parameters,
            lambda name, _p, _c: LatencySLOAdmitter(name),
            "sheddable SLO requests rejected when no endpoint can meet them",
        )
    )

    def build_utilization(name: str, p: UtilizationDetectorParams, _ctx: BuildContext) -> Plugin:
        return UtilizationDetector(name, p)

    registry.register(
        PluginType(
            UtilizationDetector.type_name,
            UtilizationDetector,
            _parse_utilization,
            build_utilization,
            "saturation from queue depth and KV usage",
        )
    )

    def build_concurrency(name: str, p: ConcurrencyDetectorParams, ctx: BuildContext) -> Plugin:
        detector = ConcurrencyDetector(name, p)
        detector.bind(ctx)
        return detector

    registry.register(
        PluginType(
            ConcurrencyDetector.type_name,
            ConcurrencyDetector,
            _parse_concurrency,
            build_concurrency,
            "saturation from in-flight requests or tokens",
        )
    )
