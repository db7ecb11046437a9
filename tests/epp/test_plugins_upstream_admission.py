"""llm-d's admitters and saturation detectors, and the SLO plugins over latency predictions
(latency-scorer, slo-headroom-tier-filter, prefix-cache-affinity-filter)."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from epp.framework import ConfigError, CycleState, SchedulerDeps, build_scheduler, load_config
from epp.plugins import default_registry
from epp.plugins.admission import (
    ConcurrencyDetector,
    ConcurrencyDetectorParams,
    LatencySLOAdmitter,
    ProbabilisticAdmitter,
    ProbabilisticAdmitterParams,
    UtilizationDetector,
    UtilizationDetectorParams,
)
from epp.plugins.latency_slo import (
    AffinityFilterParams,
    LatencyScorer,
    LatencyScorerParams,
    PrefixCacheAffinityFilter,
    SLOHeadroomTierFilter,
)
from epp.plugins.shared import (
    LATENCY_PREDICTION_KEY,
    PREFIX_MATCH_KEY,
    LatencyPredictionInfo,
    PrefixMatchInfo,
)
from epp.types import Endpoint, EngineMetrics, LLMRequest, ResponseStats, SchedulingError


def pod(i: int, waiting: int = 0, kv: float = 0.0, running: int = 1) -> Endpoint:
    return Endpoint(
        f"10.3.0.{i}",
        8000,
        metrics=EngineMetrics(
            waiting=waiting, kv_usage=kv, running=running, updated_at=time.monotonic()
        ),
    )


def req(priority: int = 0, **headers: str) -> LLMRequest:
    return LLMRequest(
        request_id="r",
        path="/v1/completions",
        model="m",
        prompt="hi",
        priority=priority,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# --- probabilistic-admitter -----------------------------------------------------------------


def test_probabilistic_admitter_rejection_probability() -> None:
    admitter = ProbabilisticAdmitter("p", ProbabilisticAdmitterParams(), FixedRandom(0.5))
    # saturation = mean(max(2/5, 0.4/0.8), max(0/5, 0/0.8)) = 0.25; 0.25^5 * 300 = 0.29
    pool = [pod(1, waiting=2, kv=0.4), pod(2)]
    assert admitter.rejection_probability(pool) == pytest.approx(0.25**5 * 300)
    assert admitter.admit(CycleState(), req(priority=-1), pool) is None  # 0.5 >= 0.29
    low = ProbabilisticAdmitter("p", ProbabilisticAdmitterParams(), FixedRandom(0.1))
    reason = low.admit(CycleState(), req(priority=-1), pool)
    assert reason is not None and "saturation=0.250" in reason
    assert low.admit(CycleState(), req(priority=0), pool) is None  # not sheddable


async def test_upstream_probabilistic_admitter_config_rejects_with_429() -> None:
    text = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: probabilistic-admitter
- type: random-picker
- type: utilization-detector
  parameters:
    queueDepthThreshold: 999999999
    kvCacheUtilThreshold: 1.0
saturationDetector:
  pluginRef: utilization-detector
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"""
    s = build_scheduler(load_config(text, default_registry()), SchedulerDeps(rng=FixedRandom(0.0)))
    assert isinstance(s.saturation_plugin, UtilizationDetector)
    full = [pod(1, waiting=50, kv=0.95)]
    with pytest.raises(SchedulingError) as err:
        await s.schedule(req(priority=-1), full)
    assert err.value.status == 429 and err.value.reason == "rejected-admission"
    assert (await s.schedule(req(priority=0), full)).endpoints[0].key == "10.3.0.1:8000"


def test_probabilistic_admitter_parameters() -> None:
    with pytest.raises(ConfigError, match="power"):
        load_config(
            "plugins:\n- type: probabilistic-admitter\n  parameters: {power: 0}\n",
            default_registry(),
        )


# --- latency-slo-admitter -------------------------------------------------------------------


def info(
    ttft_headroom: float, tpot_headroom: float = 0.0, dispatched: int = 1
) -> LatencyPredictionInfo:
    return LatencyPredictionInfo(
        ttft_ms=100.0,
        tpot_ms=10.0,
        ttft_headroom_ms=ttft_headroom,
        tpot_headroom_ms=tpot_headroom,
        ttft_valid=ttft_headroom >= 0,
        tpot_valid=tpot_headroom >= 0,
        dispatched_requests=dispatched,
    )


def test_latency_slo_admitter() -> None:
    admitter = LatencySLOAdmitter("l")
    busy = [pod(1, kv=0.5, running=3), pod(2, kv=0.5, running=3)]
    cycle = CycleState()
    cycle.write(LATENCY_PREDICTION_KEY, {e.key: info(-5.0) for e in busy})
    shed = req(priority=-1, x_slo_ttft_ms="100")
    assert admitter.admit(cycle, shed, busy) is not None
    assert admitter.admit(cycle, req(priority=0, x_slo_ttft_ms="100"), busy) is None
    assert admitter.admit(cycle, req(priority=-1), busy) is None  # no SLO header
    assert admitter.admit(CycleState(), shed, busy) is None  # no predictions
    idle = [pod(1, kv=0.5, running=3), pod(2, kv=0.5, running=0)]
    assert admitter.admit(cycle, shed, idle) is None
    cold = [pod(1, kv=0.5, running=3), pod(2, kv=0.01, running=3)]
    assert admitter.admit(cycle, shed, cold) is None
    cycle.write(LATENCY_PREDICTION_KEY, {busy[0].key: info(-5.0), busy[1].key: info(5.0)})
    assert admitter.admit(cycle, shed, busy) is None


# --- saturation detectors -------------------------------------------------------------------


def test_utilization_detector_saturation_and_filter() -> None:
    detector = UtilizationDetector("u", UtilizationDetectorParams(headroom=0.2))
    now = time.monotonic()
    stale = Endpoint("10.3.0.9", 8000, metrics=EngineMetrics(updated_at=now - 10))
    pool = [pod(1, waiting=5), pod(2, kv=0.4), stale]
    # (max(1, 0) + max(0, 0.5) + 1.0) / 3
    assert detector.pool_saturation(pool, now) == pytest.approx(2.5 / 3)
    kept = detector.filter(CycleState(now), req(), pool)
    assert [e.key for e in kept] == ["10.3.0.1:8000", "10.3.0.2:8000"]  # 5 < 5 * 1.2
    assert detector.filter(CycleState(now), req(), [stale]) == [stale]  # none: all kept


async def test_concurrency_detector_counts_its_own_in_flight_requests() -> None:
    text = """\
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 2}
- type: random-picker
saturationDetector:
  pluginRef: concurrency-detector
schedulingProfiles:
- name: default
  plugins: [{pluginRef: concurrency-detector}, {pluginRef: random-picker}]
"""
    s = build_scheduler(load_config(text, default_registry()), SchedulerDeps(rng=random.Random(0)))
    detector = s.plugin("concurrency-detector")
    assert isinstance(detector, ConcurrencyDetector)
    pool = [pod(1)]
    first, second = req(), req()
    first.request_id, second.request_id = "a", "b"
    await s.schedule(first, pool)
    await s.schedule(second, pool)
    assert detector.pool_saturation(pool, 0.0) == 1.0
    with pytest.raises(SchedulingError) as err:
        await s.schedule(req(priority=-1), pool)  # sheddable and the pool is full
    assert err.value.status == 429 and err.value.reason == "rejected-saturated"
    with pytest.raises(SchedulingError) as err:
        await s.schedule(req(), pool)  # as a filter: at capacity, nothing left
    assert err.value.status == 503
    s.on_response_complete(first, ResponseStats(served=pool[0].key))
    assert detector.pool_saturation(pool, 0.0) == 0.5


def test_concurrency_detector_token_mode() -> None:
    detector = ConcurrencyDetector(
        "c", ConcurrencyDetectorParams(mode="tokens", max_token_concurrency=100)
    )
    assert detector.pool_saturation([pod(1)], 0.0) == 0.0
    with pytest.raises(ConfigError, match="concurrencyMode"):
        load_config(
            "plugins:\n- type: concurrency-detector\n  parameters: {concurrencyMode: bytes}\n",
            default_registry(),
        )


# --- latency-scorer ---------------------------------------------------------------------------


def scored(
    scorer: LatencyScorer, predictions: dict[str, LatencyPredictionInfo], pool: list[Endpoint]
) -> list[float]:
    cycle = CycleState()
    cycle.write(LATENCY_PREDICTION_KEY, predictions)
    return list(scorer.score(cycle, req(), pool))


def test_latency_scorer_least_headroom_first_among_positive() -> None:
    scorer = LatencyScorer("l", LatencyScorerParams())
    pool = [pod(1), pod(2), pod(3)]
    preds = {pool[0].key: info(10.0), pool[1].key: info(100.0), pool[2].key: info(-1.0)}
    scores = scored(scorer, preds, pool)
    # TTFT varies, TPOT does not: all weight on TTFT; least headroom -> 1.0 (101/100 capped).
    assert scores == [1.0, 0.01, 0.0]
    most = LatencyScorer("l", LatencyScorerParams(strategy="most"))
    assert scored(most, preds, pool) == [0.01, 1.0, 0.0]


def test_latency_scorer_negative_buckets() -> None:
    scorer = LatencyScorer("l", LatencyScorerParams(strategy="most"))
    pool = [pod(1), pod(2), pod(3)]
    preds = {
        pool[0].key: info(-50.0, dispatched=1),
        pool[1].key: info(-10.0, dispatched=1),
        pool[2].key: info(-500.0, dispatched=0),
    }
    assert scored(scorer, preds, pool) == [0.0, 0.0, pytest.approx(0.51)]  # idle bucket only
    preds[pool[2].key] = info(-500.0, dispatched=2)
    scores = scored(scorer, preds, pool)
    assert scores[1] > scores[0] > scores[2]  # smallest deficit first, whatever the strategy


def test_latency_scorer_composite_without_predictions() -> None:
    scorer = LatencyScorer("l", LatencyScorerParams())
    pool = [pod(1, waiting=4, kv=0.5), pod(2, waiting=0, kv=0.0)]
    cycle = CycleState()
    cycle.write(
        PREFIX_MATCH_KEY,
        PrefixMatchInfo(prompt_tokens=10, block_size_tokens=1, matched_tokens={pool[0].key: 10}),
    )
    scores = list(scorer.score(cycle, req(), pool))
    # kv free 0.5, relative queue 0, prefix 1 | kv free 1, relative queue 1, prefix 0
    assert scores == pytest.approx([0.5, 0.67], abs=0.01)


# --- slo-headroom-tier-filter ---------------------------------------------------------------


def test_slo_headroom_tier_filter() -> None:
    pool = [pod(1), pod(2), pod(3)]
    cycle = CycleState()
    cycle.write(LATENCY_PREDICTION_KEY, {pool[0].key: info(5.0), pool[1].key: info(-5.0)})
    keep_positive = SLOHeadroomTierFilter("t", 0.01, FixedRandom(0.5))
    assert keep_positive.filter(cycle, req(), pool) == [pool[0]]
    explore = SLOHeadroomTierFilter("t", 0.01, FixedRandom(0.001))
    assert explore.filter(cycle, req(), pool) == [pool[1], pool[2]]  # negative + unpredicted
    assert keep_positive.filter(CycleState(), req(), pool) == pool  # no predictions
    with pytest.raises(ConfigError, match="epsilonExploreNeg"):
        load_config(
            "plugins:\n- type: slo-headroom-tier-filter\n  parameters: {epsilonExploreNeg: 2}\n",
            default_registry(),
        )


# --- prefix-cache-affinity-filter -----------------------------------------------------------


def affinity_cycle(
    pool: list[Endpoint], scores: dict[str, float], ttft: dict[str, float] | None = None
) -> CycleState:
    cycle = CycleState()
    cycle.write(
        PREFIX_MATCH_KEY,
        PrefixMatchInfo(prompt_tokens=100, block_size_tokens=16, endpoint_scores=scores),
    )
    if ttft is not None:
        preds: dict[str, Any] = {}
        for key, value in ttft.items():
            preds[key] = LatencyPredictionInfo(value, 0.0, 0.0, 0.0, True, True)
        cycle.write(LATENCY_PREDICTION_KEY, preds)
    return cycle


def test_prefix_cache_affinity_filter() -> None:
    pool = [pod(1), pod(2), pod(3)]
    sticky = {pool[0].key: 0.9, pool[1].key: 0.5}
    gate = PrefixCacheAffinityFilter("a", AffinityFilterParams(), FixedRandom(0.5))
    assert gate.filter(affinity_cycle(pool, sticky), req(), pool) == [pool[0]]
    strict = PrefixCacheAffinityFilter(
        "a", AffinityFilterParams(affinity_threshold=0.99), FixedRandom(0.5)
    )
    assert strict.filter(affinity_cycle(pool, sticky), req(), pool) == pool  # none sticky
    explore = PrefixCacheAffinityFilter("a", AffinityFilterParams(), FixedRandom(0.001))
    assert explore.filter(affinity_cycle(pool, sticky), req(), pool) == pool
    # The sticky endpoint is predicted 6 s slower than the best other: the cache is not worth it.
    slow = {pool[0].key: 7000.0, pool[1].key: 1000.0, pool[2].key: 900.0}
    assert gate.filter(affinity_cycle(pool, sticky, slow), req(), pool) == pool
    fine = {pool[0].key: 2000.0, pool[1].key: 1000.0, pool[2].key: 900.0}
    assert gate.filter(affinity_cycle(pool, sticky, fine), req(), pool) == [pool[0]]


CHART_LATENCY_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters: {scheme: "http", path: "/metrics", insecureSkipVerify: true}
- type: core-metrics-extractor
- type: predicted-latency-producer
- name: strict-affinity-filter
  type: prefix-cache-affinity-filter
  parameters: {affinityThreshold: 0.99}
- name: loose-affinity-filter
  type: prefix-cache-affinity-filter
  parameters: {affinityThreshold: 0.80}
- type: latency-scorer
- type: weighted-random-picker
- type: slo-headroom-tier-filter
- type: latency-slo-admitter
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: predicted-latency-producer
  - pluginRef: strict-affinity-filter
  - pluginRef: slo-headroom-tier-filter
  - pluginRef: loose-affinity-filter
  - pluginRef: latency-scorer
  - pluginRef: weighted-random-picker
"""


async def test_the_charts_latency_predictor_config_schedules() -> None:
    """llm-d's chart (config/charts/epplib/templates/_config.yaml, latencyPredictor.enabled)
    rendered with its defaults."""
    s = build_scheduler(
        load_config(CHART_LATENCY_CONFIG, default_registry()), SchedulerDeps(rng=random.Random(2))
    )
    await s.start()
    try:
        pool = [pod(1, waiting=3), pod(2), pod(3, kv=0.9)]
        result = await s.schedule(req(x_slo_ttft_ms="500"), pool)
        assert result.endpoints[0] in pool
    finally:
        await s.stop()
