"""Scorers over the scraped load metrics: queue, KV usage, running requests, load-aware."""

from __future__ import annotations

from dataclasses import dataclass

from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import Scorer, Scores
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.common import no_parameters
from epp.types import Endpoint, LLMRequest


def _min_max_inverse(values: list[float]) -> list[float]:
    """(max - v) / (max - min); all 1.0 when every value is equal."""
    low, high = min(values), max(values)
    if high == low:
        return [1.0] * len(values)
    span = high - low
    return [(high - v) / span for v in values]


class QueueScorer(Scorer):
    """Shorter waiting queue scores higher, min-max normalised over the candidates."""

    type_name = "queue-scorer"

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        return _min_max_inverse([float(e.metrics.waiting) for e in endpoints])


class KVCacheUtilizationScorer(Scorer):
    """1 - KV cache usage."""

    type_name = "kv-cache-utilization-scorer"

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        return [1.0 - e.metrics.kv_usage for e in endpoints]


class RunningRequestsSizeScorer(Scorer):
    """Fewer running requests scores higher, min-max normalised over the candidates."""

    type_name = "running-requests-size-scorer"

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        return _min_max_inverse([float(e.metrics.running) for e in endpoints])


@dataclass(frozen=True)
class LoadAwareParams:
    threshold: int = 128


def _parse_load_aware(params: Params) -> LoadAwareParams:
    return LoadAwareParams(threshold=params.integer("threshold", 128, min=1))


class LoadAwareScorer(Scorer):
    """llm-d's load-aware-scorer: 0.5 for an empty queue, else 0.5 * (1 - waiting/threshold)
    with waiting capped at the threshold (so 0 at or beyond it)."""

    type_name = "load-aware-scorer"

    def __init__(self, name: str, params: LoadAwareParams) -> None:
        super().__init__(name)
        self.threshold = float(params.threshold)

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        t = self.threshold
        return [0.5 * (1.0 - min(float(e.metrics.waiting), t) / t) for e in endpoints]


def register(registry: Registry) -> None:
    registry.register(
        PluginType(
            QueueScorer.type_name,
            QueueScorer,
            no_parameters,
            lambda name, _p, _c: QueueScorer(name),
            "shorter waiting queue scores higher",
        ),
        aliases=("queue-depth-scorer",),
    )
    registry.register(
        PluginType(
            KVCacheUtilizationScorer.type_name,
            KVCacheUtilizationScorer,
            no_parameters,
            lambda name, _p, _c: KVCacheUtilizationScorer(name),
            "1 - KV cache usage",
        ),
        aliases=("kv-cache-scorer",),
    )
    registry.register(
        PluginType(
            RunningRequestsSizeScorer.type_name,
            RunningRequestsSizeScorer,
            no_parameters,
            lambda name, _p, _c: RunningRequestsSizeScorer(name),
            "fewer running requests scores higher",
        )
    )

    def build_load_aware(name: str, params: LoadAwareParams, _ctx: BuildContext) -> Scorer:
        return LoadAwareScorer(name, params)

    registry.register(
        PluginType(
            LoadAwareScorer.type_name,
            LoadAwareScorer,
            _parse_load_aware,
            build_load_aware,
            "0.5 * (1 - waiting / threshold)",
        )
    )
