"""predicted-latency-scorer: prefer the endpoint predicted to answer first.

For every candidate the online `LatencyModel` predicts TTFT and TPOT from the request
(uncached prompt tokens from this cycle's prefix match, prompt length, max_tokens) and the
endpoint's load (waiting, running, KV usage). The cost is
`ttftWeight * TTFT + tpotWeight * TPOT`; lower cost scores higher (min-max over candidates).

SLOs: `x-slo-ttft-ms` / `x-slo-tpot-ms` request headers. An endpoint meets them when its
prediction plus the model's upper-quantile residual, times (1 + headroom), is within the
SLO. This scorer gates: the picker chooses only among endpoints that meet every SLO given
(they also score in [0.5, 1], the rest 0); when none does, only the lowest-cost endpoint
remains (falling back to the best).

The model learns from the edge's ResponseStats: TTFT = first_byte_s of streamed responses,
TPOT = (duration_s - first_byte_s) / completion_tokens. Saved to `modelPath` (if set) at
stop and at most every `saveInterval`, loaded at start."""

from __future__ import annotations

import math
import pathlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from epp.framework.cycle import CycleState
from epp.framework.observer import SchedulerObserver
from epp.framework.params import Params
from epp.framework.plugin import Lifecycle, PreRequest, ResponseComplete, Scorer, Scores
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.latency.model import LatencyModel, LatencyPrediction, features
from epp.latency.store import LatencyModelFormatError, load_model, save_model
from epp.plugins._request import prompt_tokens
from epp.plugins.shared import prefix_match
from epp.types import Endpoint, LLMRequest, ResponseStats, SchedulingResult

SLO_TTFT_HEADER = "x-slo-ttft-ms"
SLO_TPOT_HEADER = "x-slo-tpot-ms"
OPT_IN_HEADER = "x-prediction-based-scheduling"


@dataclass(frozen=True)
class PredictedLatencyParams:
    model_path: str = ""
    save_interval_s: float = 30.0
    ttft_weight: float = 1.0
    tpot_weight: float = 0.0
    headroom: float = 0.1
    quantile: float = 0.9
    min_samples: int = 10
    forgetting: float = 0.995
    default_output_tokens: int = 256
    require_opt_in: bool = False
    max_pending: int = 100_000
    # llm-d's sloBufferFactor: the TPOT SLO an endpoint must meet is the header's times this.
    slo_buffer_factor: float = 1.0


def parse_upstream_latency_params(params: Params) -> dict[str, Any]:
    """llm-d's predicted-latency parameters (shared by the producer and, for configs written
    for it, `predicted-latency-scorer`)."""
    sampling_mean = params.number("samplingMean", 1000.0, min=0.0, min_exclusive=True)
    samples = params.integer("maxDecodeTokenSamplesForPrediction", 0, min=0)
    buffer = params.number("sloBufferFactor", 1.0, min=0.0, min_exclusive=True)
    return {
        "sampling_mean": sampling_mean,
        "max_decode_token_samples": samples,
        "slo_buffer_factor": buffer,
        "context_ttl_s": params.duration("contextTTL", 300.0),
        "streaming_mode": params.boolean("streamingMode", False),
        "endpoint_role_label": params.string("endpointRoleLabel", ""),
        "predict_in_produce": params.boolean("predictInProduce", True),
    }


def _parse(params: Params) -> PredictedLatencyParams:
    # Configs written for llm-d's predicted-latency plugins: sloBufferFactor applies, the
    # rest describe llm-d's sampling and its predictor sidecar and have no effect here.
    upstream = parse_upstream_latency_params(params)
    # The GIE predicted-latency-scorer's headroom-tier and affinity-gate knobs: this scorer
    # gates on SLOs itself (see the module docstring), so they are accepted without effect.
    params.ignore(
        "headroomSelectionStrategy",
        "podSelectionMode",
        "negHeadroomTTFTWeight",
        "negHeadroomTPOTWeight",
        "epsilonExploreNeg",
        "affinityGateTauGlobal",
        "affinityGateTau",
        "epsilonExploreSticky",
        "affinityMaxTTFTPenaltyMs",
        "compositeKVWeight",
        "compositeQueueWeight",
        "compositePrefixWeight",
    )
    return PredictedLatencyParams(
        slo_buffer_factor=float(upstream["slo_buffer_factor"]),
        model_path=params.string("modelPath", ""),
        save_interval_s=params.duration("saveInterval", 30.0),
        ttft_weight=params.number("ttftWeight", 1.0, min=0.0),
        tpot_weight=params.number("tpotWeight", 0.0, min=0.0),
        headroom=params.number("headroom", 0.1, min=0.0, max=10.0),
        quantile=params.number("sloQuantile", 0.9, min=0.5, max=0.999),
        min_samples=params.integer("minSamples", 10, min=0),
        forgetting=params.number("forgettingFactor", 0.995, min=0.9, max=1.0),
        default_output_tokens=params.integer("defaultOutputTokens", 256, min=0),
        require_opt_in=params.boolean("requireOptIn", False),
        max_pending=params.integer("maxPendingRequests", 100_000, min=1),
    )


def _slo_seconds(request: LLMRequest, header: str) -> float | None:
    raw = request.headers.get(header)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        return None
    return ms / 1000.0 if ms > 0 and math.isfinite(ms) else None


@dataclass(slots=True)
class _Pending:
    endpoint_key: str
    x: list[float]
    predicted: LatencyPrediction


class PredictedLatencyScorer(Scorer, PreRequest, ResponseComplete, Lifecycle):
    type_name = "predicted-latency-scorer"
    stage = 1  # after the prefix scorers, whose match info gives the uncached tokens
    gates = True

    def __init__(
        self,
        name: str,
        params: PredictedLatencyParams,
        *,
        clock: Callable[[], float],
        observer: SchedulerObserver | None,
    ) -> None:
        super().__init__(name)
        self.params = params
        self._clock = clock
        self._observer = observer
        self.model = self._fresh_model()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._last_save = clock()
        self._dirty = False
        self.load_error: str | None = None
        self.counters = {
            "learned_ttft": 0,
            "learned_tpot": 0,
            "skipped": 0,
            "saved": 0,
            "slo_unmet": 0,
        }

    def _fresh_model(self) -> LatencyModel:
        p = self.params
        return LatencyModel(forgetting=p.forgetting, min_samples=p.min_samples, quantile=p.quantile)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def path(self) -> pathlib.Path | None:
        return pathlib.Path(self.params.model_path) if self.params.model_path else None

    async def start(self) -> None:
        path = self.path
        if path is None:
            return
        try:
            loaded = load_model(
                path,
                forgetting=self.params.forgetting,
                min_samples=self.params.min_samples,
                quantile=self.params.quantile,
            )
        except (LatencyModelFormatError, OSError) as exc:
            # Start fresh rather than refuse to route; the error stays visible.
            self.load_error = str(exc)
            return
        if loaded is not None:
            self.model = loaded

    async def stop(self) -> None:
        self.save()

    def save(self) -> None:
        path = self.path
        if path is None:
            return
        save_model(path, self.model)
        self._dirty = False
        self._last_save = self._clock()
        self.counters["saved"] += 1

    # -- scoring -----------------------------------------------------------------------------

    def _enabled(self, request: LLMRequest) -> bool:
        flag = request.headers.get(OPT_IN_HEADER, "").strip().lower()
        if self.params.require_opt_in:
            return flag == "true"
        return flag != "false"

    def _features(self, cycle: CycleState, request: LLMRequest, endpoint: Endpoint) -> list[float]:
        info = prefix_match(cycle)
        total = info.prompt_tokens if info is not None else prompt_tokens(request)
        uncached = info.uncached_tokens(cycle.key(endpoint)) if info is not None else total
        m = endpoint.metrics
        out_tokens = request.max_tokens or self.params.default_output_tokens
        return features(
            uncached_tokens=uncached,
            waiting=m.waiting,
            running=m.running,
            kv_usage=m.kv_usage,
            prompt_tokens=total,
            output_tokens=out_tokens,
        )

    def predict(
        self, cycle: CycleState, request: LLMRequest, endpoint: Endpoint
    ) -> tuple[list[float], LatencyPrediction]:
        x = self._features(cycle, request, endpoint)
        return x, self.model.predict(cycle.key(endpoint), x)

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        if not self._enabled(request):
            return [1.0] * len(endpoints)
        p = self.params
        preds = [self.predict(cycle, request, e) for e in endpoints]
        cycle.write(
            self._cycle_key, {cycle.key(e): xp for e, xp in zip(endpoints, preds, strict=True)}
        )
        costs = [p.ttft_weight * pr.ttft_s + p.tpot_weight * pr.tpot_s for _, pr in preds]
        ttft_slo = _slo_seconds(request, SLO_TTFT_HEADER)
        tpot_slo = _slo_seconds(request, SLO_TPOT_HEADER)
        if ttft_slo is None and tpot_slo is None:
            return _inverse_min_max(costs)
        factor = 1.0 + p.headroom
        meets = [
            (ttft_slo is None or (pr.ttft_s + pr.ttft_margin_s) * factor <= ttft_slo)
            and (
                tpot_slo is None
                or (pr.tpot_s + pr.tpot_margin_s) * factor <= tpot_slo * p.slo_buffer_factor
            )
            for _, pr in preds
        ]
        if not any(meets):
            self.counters["slo_unmet"] += 1
            best = min(range(len(costs)), key=costs.__getitem__)
            cycle.write(self._gate_key, [i == best for i in range(len(costs))])
            return _inverse_min_max(costs)
        cycle.write(self._gate_key, meets)
        feasible = _inverse_min_max([c for c, ok in zip(costs, meets, strict=True) if ok])
        it = iter(feasible)
        return [0.5 + 0.5 * next(it) if ok else 0.0 for ok in meets]

    def eligible(self, cycle: CycleState, endpoints: list[Endpoint]) -> list[bool] | None:
        return cycle.read(self._gate_key, list)

    @property
    def _gate_key(self) -> str:
        return "predicted-latency/gate/" + self.name

    @property
    def _cycle_key(self) -> str:
        return "predicted-latency/" + self.name

    # -- learning ----------------------------------------------------------------------------

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        picked = result.endpoints
        if not picked:
            return
        endpoint = picked[0]
        key = cycle.key(endpoint)
        scored = cycle.read(self._cycle_key, dict)
        if scored is not None and key in scored:
            x, pred = scored[key]
        else:  # this scorer was not in the primary profile's run: predict now
            x, pred = self.predict(cycle, request, endpoint)
        self._pending[request.request_id] = _Pending(key, x, pred)
        while len(self._pending) > self.params.max_pending:
            self._pending.popitem(last=False)
        if self._observer is not None:
            self._observer.latency_predicted(key, "ttft", pred.ttft_s)
            self._observer.latency_predicted(key, "tpot", pred.tpot_s)

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        pending = self._pending.pop(request.request_id, None)
        if pending is None or stats.status != 200:
            self.counters["skipped"] += 1
            return
        if stats.served is not None and stats.served != pending.endpoint_key:
            self.counters["skipped"] += 1  # served by a fallback: features are not its own
            return
        key, x, pred = pending.endpoint_key, pending.x, pending.predicted
        ttft = stats.first_byte_s
        # A non-streamed body's first byte arrives with the last: not a TTFT.
        if ttft is not None and stats.streamed:
            self.model.observe(key, "ttft", x, ttft)
            self.counters["learned_ttft"] += 1
            self._dirty = True
            if self._observer is not None:
                self._observer.latency_observed(key, "ttft", pred.ttft_s, ttft)
        tokens = stats.completion_tokens
        if (
            stats.streamed
            and ttft is not None
            and stats.duration_s is not None
            and tokens is not None
            and tokens > 1
        ):
            tpot = max(0.0, stats.duration_s - ttft) / tokens
            self.model.observe(key, "tpot", x, tpot)
            self.counters["learned_tpot"] += 1
            if self._observer is not None:
                self._observer.latency_observed(key, "tpot", pred.tpot_s, tpot)
        if self._dirty and self._clock() - self._last_save >= self.params.save_interval_s:
            try:
                self.save()
            except OSError:
                self.counters["save_errors"] = self.counters.get("save_errors", 0) + 1
                self._last_save = self._clock()


def _inverse_min_max(costs: list[float]) -> list[float]:
    low, high = min(costs), max(costs)
    if high <= low:
        return [1.0] * len(costs)
    span = high - low
    return [(high - c) / span for c in costs]


def register(registry: Registry) -> None:
    def build(name: str, p: PredictedLatencyParams, ctx: BuildContext) -> Scorer:
        return PredictedLatencyScorer(name, p, clock=ctx.deps.clock, observer=ctx.deps.observer)

    registry.register(
        PluginType(
            PredictedLatencyScorer.type_name,
            PredictedLatencyScorer,
            _parse,
            build,
            "lowest predicted TTFT/TPOT, SLO-aware",
        )
    )
