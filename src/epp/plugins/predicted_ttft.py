"""predicted-ttft-scorer (ours, not an llm-d type): score endpoints by the time to first token
each is predicted to give this request, so a cache hit is worth exactly the prefill it saves
and no more than the queueing it costs.

For every candidate:

- uncached tokens: the prompt minus what the cycle's prefix match says the endpoint reuses
  (`PrefixMatchInfo`, written by the precise-prefix-cache producer or scorer, or the
  approximate ones; the precise match already counts whole engine blocks and never the block
  of the prompt's last token). No prefix data: the whole prompt.
- load: the larger of the engine's scraped `waiting + running` and the requests this picker
  has in flight there (the inflight-load-producer's counters, which see a pick at once, where
  a scrape sees it only at the next interval). With the engine's concurrency cap (learnt as the
  most requests it ran while some waited, or `maxRunningRequests`) the load splits into
  running and the request's queue position (requests that would wait for a slot, this one
  included); without a cap known yet, the scraped waiting count is the queue.
- latency: the online `LatencyModel` of `epp.latency` (the predicted-latency model) over
  uncached tokens, queue position and output tokens, one model for the pool (or one per
  endpoint with `perEndpoint`), plus `runningRequestSeconds` per request running there (a
  fixed cost, not learnt). It is fit to each response's duration (decision to end of
  response) with its output tokens as a feature: a duration is what every response path
  reports (streamed or not, with or without the body passing the picker), where a first body
  byte is not always the first token (an engine may send the role chunk before its prefill)
  and is not seen at all when Envoy sends the picker no response body. The output tokens are
  the response's usage when the body passes the picker, else the request's `max_tokens`
  (else `defaultOutputTokens`). The model is asked for this request's duration on each
  endpoint; the decode part is the same on engines that decode alike, so what differs
  between them is the time to first token (queue + prefill of what they do not hold). Until
  it has data the model starts from a prior: `prefillTokensPerSecond`, `queueWaitSeconds` per
  queued request and `decodeSecondsPerToken`.

  Learning, and what is deliberately not learnt (measured in benchmarks/RESULTS.md, "Chat
  closed loop: where the precise profile's misses come from"): the prompt length is the same
  on every candidate and only blurs what the uncached tokens explain; KV usage and the
  running count are confounded with the misses themselves (a miss fills the cache and holds
  a slot longer), and a fit that learnt from them charged an engine for holding the very
  prefix it was asked about, so the engines holding a tenant looked slow and requests left
  them - run to run the hit rate swung 65-87%. One model for the pool sees four times the
  samples of a per-endpoint one, and per-endpoint fits on noisy closed-loop durations
  drifted to costs seconds apart for idle engines; `perEndpoint` is for engines of really
  different speeds. The fit is projected: every learnt cost stays non-negative and an
  uncached token's at least 1 / `maxPrefillTokensPerSecond`, so a handful of noisy durations
  never teaches it that a cache hit is slower than a miss.

Score = 50 ms / (50 ms + predicted - best): 1 for the fastest endpoint, 0.5 for one predicted
50 ms slower, 0.1 for 450 ms slower (the max-score picker breaks exact ties at random).

A miss also costs later (`missPenalty`, default 1: once more its prefill): the blocks it
stores evict other prefixes, which miss in their turn; so a request leaves the engine holding
its prefix only when the queue there costs more than twice the prefill it would redo. The
tokens charged are the largest of three counts: those another endpoint already holds (storing
them here makes a second copy) and, when the precise index follows the engines' streams and
the engines publish their capacity (`num_gpu_blocks`), those that do not fit in the blocks
this endpoint has free: its capacity minus the blocks its events say it holds, minus what the
requests this picker sent there and still in flight allocate (their blocks reach the event
stream only after their prefill). Those evict someone else's prefix. So a new prefix goes
where it fits, not merely to the engine idle at that instant. And what fits now does not
stay fitting: the prefixes an engine holds grow with every turn of their conversations, so a
third count (`occupancyWeight`, default 1) charges the new tokens times the share of the
endpoint's cache in use (the blocks it will evict later); among engines with room, a new
prefix goes to the emptiest, as an approximate tree's smallest-tree rule sends it, from the
engines' own counts. Once every engine is full each is charged all it stores, and the
differences between endpoints (all a score sees) are the second-copy rule's again.

Hot prefixes spread by themselves: once the engine holding a prefix has a queue that costs
more than another engine's prefill of the whole prompt, the other engine wins, gets the
prefix (speculatively at once with `speculativeIndexing`), and from then on both are cache
hits and the queue decides. `maxQueuePosition` (default 0: off) adds a hard bound: an
endpoint where this request would wait behind more than that many others' turn for a slot is
left out while another is within it. Off by default: each time it fires it sends a request
away from the engine holding its prefix, a full prefill and a second copy of the prefix that
evicts another tenant's, which the cost above already weighs against the wait."""

from __future__ import annotations

import math
import pathlib
from collections import OrderedDict
from dataclasses import dataclass

from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import Lifecycle, PreRequest, ResponseComplete, Scorer, Scores
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.latency.model import FEATURES, LatencyModel, features
from epp.latency.store import LatencyModelFormatError, load_model, save_model
from epp.plugins._request import prompt_tokens
from epp.plugins.producers import InFlightLoadConsumer
from epp.plugins.shared import PrefixMatchInfo, prefix_match
from epp.types import Endpoint, LLMRequest, ResponseStats, SchedulingResult

# Score = SCALE / (SCALE + predicted - best): 1 for the best, 0.5 for 50 ms slower.
SCORE_SCALE_S = 0.050
OUTPUT_FEATURE = FEATURES.index("output_ktokens")
UNCACHED_FEATURE = FEATURES.index("uncached_ktokens")
# The one model every endpoint shares without `perEndpoint` (not an endpoint key: no port).
POOL_KEY = "pool"


@dataclass(frozen=True)
class PredictedTTFTParams:
    prefill_tokens_per_second: float = 10_000.0  # prior until learnt
    # The fastest prefill the fit may learn: its cost per uncached token never falls below
    # 1 / this (see _coefficient_floors).
    max_prefill_tokens_per_second: float = 200_000.0
    queue_wait_s: float = 0.1  # prior: seconds per request ahead in the queue
    # seconds each request running there adds: a tie-breaker that spreads a burst of
    # requests over idle engines before any scrape or event. Small on purpose: a scrape can
    # still show a finished request running, and on a small model the prefill a cache hit
    # saves is a few ms, which this must never outweigh (tests/real_vllm).
    running_s: float = 0.0005
    # One learnt model per endpoint (engines of different speeds) instead of one for the pool.
    per_endpoint: bool = False
    decode_s_per_token: float = 0.02  # prior
    max_running: int = 0  # the engines' concurrency cap; 0: learn it from the metrics
    max_queue_position: int = 0  # 0: no hard bound (the cost decides)
    # What a miss costs later, in multiples of its prefill: the blocks it stores evict others'
    # cached prefixes, which miss in their turn.
    miss_penalty: float = 1.0
    # The share of a new prefix's tokens charged as displacing others, per share of the
    # endpoint's KV cache in use (the module doc: "what fits now does not stay fitting");
    # 0: only what does not fit now.
    occupancy_weight: float = 1.0
    min_samples: int = 30
    forgetting: float = 0.995
    default_output_tokens: int = 256
    model_path: str = ""
    max_pending: int = 100_000


def _parse(params: Params) -> PredictedTTFTParams:
    return PredictedTTFTParams(
        prefill_tokens_per_second=params.number(
            "prefillTokensPerSecond", 10_000.0, min=0.0, min_exclusive=True
        ),
        max_prefill_tokens_per_second=params.number(
            "maxPrefillTokensPerSecond", 200_000.0, min=0.0, min_exclusive=True
        ),
        queue_wait_s=params.duration("queueWaitSeconds", 0.1),
        running_s=params.duration("runningRequestSeconds", 0.0005),
        per_endpoint=params.boolean("perEndpoint", False),
        decode_s_per_token=params.duration("decodeSecondsPerToken", 0.02),
        max_running=params.integer("maxRunningRequests", 0, min=0),
        max_queue_position=params.integer("maxQueuePosition", 0, min=0),
        miss_penalty=params.number("missPenalty", 1.0, min=0.0),
        occupancy_weight=params.number("occupancyWeight", 1.0, min=0.0),
        min_samples=params.integer("minSamples", 30, min=0),
        forgetting=params.number("forgettingFactor", 0.995, min=0.9, max=1.0),
        default_output_tokens=params.integer("defaultOutputTokens", 256, min=1),
        model_path=params.string("modelPath", ""),
        max_pending=params.integer("maxPendingRequests", 100_000, min=1),
    )


@dataclass(slots=True)
class _Pending:
    endpoint_key: str
    x: list[float]

    @property
    def reserved_tokens(self) -> float:
        """The KV it allocates there: its uncached prompt and output tokens."""
        return (self.x[UNCACHED_FEATURE] + self.x[OUTPUT_FEATURE]) * 1000.0


@dataclass(slots=True, frozen=True)
class TTFTEstimate:
    """What the scorer predicted for one endpoint (also shared in the cycle state): the
    request's latency there (time to first token plus its decode)."""

    ttft_s: float
    uncached_tokens: int
    queue_position: int
    running: int


class PredictedTTFTScorer(Scorer, InFlightLoadConsumer, PreRequest, ResponseComplete, Lifecycle):
    type_name = "predicted-ttft-scorer"
    stage = 1  # after a prefix scorer (when one runs as a scorer, not a producer)
    gates = True  # only with maxQueuePosition
    # Learns from the response's end (duration) and, when the body passes the picker, its
    # usage; needs no body (Envoy's response_body_mode NONE is enough).
    response_data = "end"

    def __init__(self, name: str, params: PredictedTTFTParams) -> None:
        super().__init__(name)
        self.params = params
        self.model = self._fresh_model()
        # Per endpoint key: the most requests it was seen running while others waited.
        self.caps: dict[str, int] = {}
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        # Per endpoint key: tokens of KV the requests picked there and still in flight
        # allocate (their uncached prompt and output). Their blocks reach the engine's event
        # stream only after their prefill, so without this a burst of new prefixes all
        # "fits" on the same empty engine.
        self._reserved: dict[str, float] = {}
        self.load_error: str | None = None
        self.counters = {"learned": 0, "skipped": 0, "gated": 0}

    def _fresh_model(self) -> LatencyModel:
        p = self.params
        model = LatencyModel(
            forgetting=p.forgetting, min_samples=p.min_samples, floors=self._coefficient_floors()
        )
        self._seed(model)
        return model

    def _coefficient_floors(self) -> list[float]:
        """Every cost the model learns keeps its physical sign: an uncached token costs at
        least 1 / `maxPrefillTokensPerSecond`; a request ahead, one running, KV usage and
        output tokens never make a request faster. Without them a few noisy durations (a
        cache hit that happened to be slow, on a small engine whose prefill is quick) fit a
        negative prefill cost, and the endpoint that does not hold the prompt wins."""
        floors = [0.0] * len(FEATURES)
        floors[FEATURES.index("bias")] = -math.inf
        floors[FEATURES.index("uncached_ktokens")] = (
            1000.0 / self.params.max_prefill_tokens_per_second
        )
        return floors

    def _seed(self, model: LatencyModel) -> None:
        """The prior: a pooled TTFT fit of prefill time plus queue wait (new endpoints start
        from the pooled fit, so this is every endpoint's starting point)."""
        if model.pooled["ttft"].model.n > 0:
            return
        w = model.pooled["ttft"].model.w
        w[FEATURES.index("uncached_ktokens")] = 1000.0 / self.params.prefill_tokens_per_second
        w[FEATURES.index("waiting")] = self.params.queue_wait_s
        w[OUTPUT_FEATURE] = 1000.0 * self.params.decode_s_per_token  # seconds per 1k output tokens
        model.pooled["ttft"].model.project()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def path(self) -> pathlib.Path | None:
        return pathlib.Path(self.params.model_path) if self.params.model_path else None

    async def start(self) -> None:
        path = self.path
        if path is None:
            return
        p = self.params
        try:
            loaded = load_model(
                path,
                forgetting=p.forgetting,
                min_samples=p.min_samples,
                floors=self._coefficient_floors(),
            )
        except (LatencyModelFormatError, OSError) as exc:
            self.load_error = str(exc)  # start from the prior rather than refuse to route
            return
        if loaded is not None:
            self._seed(loaded)
            self.model = loaded

    async def stop(self) -> None:
        path = self.path
        if path is not None:
            save_model(path, self.model)

    # -- prediction --------------------------------------------------------------------------

    def cap(self, endpoint: Endpoint) -> int | None:
        if self.params.max_running > 0:
            return self.params.max_running
        key = endpoint.key
        m = endpoint.metrics
        if m.waiting > 0 and m.running > self.caps.get(key, 0):
            self.caps[key] = m.running
        return self.caps.get(key)

    def estimate(
        self, cycle: CycleState, request: LLMRequest, endpoint: Endpoint
    ) -> tuple[list[float], TTFTEstimate]:
        info = prefix_match(cycle)
        key = cycle.key(endpoint)
        total = info.prompt_tokens if info is not None else prompt_tokens(request)
        uncached = info.uncached_tokens(key) if info is not None else total
        m = endpoint.metrics
        load = max(m.waiting + m.running, self.load(cycle, endpoint).requests)
        cap = self.cap(endpoint)
        if cap is not None and cap > 0:
            running = min(load, cap)
            queue = max(0, load + 1 - cap)
        else:
            running = max(m.running, load - m.waiting)
            queue = m.waiting
        # Only what a request's duration physically depends on and what differs between
        # candidates is fed (see the module doc, "Learning").
        x = features(
            uncached_tokens=uncached,
            waiting=queue,
            running=0,
            kv_usage=0.0,
            prompt_tokens=0,
            output_tokens=self._output_tokens(request),
        )
        cost = self.model.predict_ttft(self._model_key(key), x) + running * self.params.running_s
        if self.params.miss_penalty > 0.0 and uncached > 0:
            occupancy = self._occupancy(info, key, endpoint)
            charged = max(
                uncached - self._fewest_uncached(info, total),
                self._displaced_tokens(occupancy, uncached + x[OUTPUT_FEATURE] * 1000.0),
                self._expected_displaced(occupancy, uncached),
            )
            cost += (
                self.params.miss_penalty * self.prefill_seconds_per_ktoken(key) * charged / 1000.0
            )
        return x, TTFTEstimate(cost, uncached, queue, running)

    def _occupancy(
        self, info: PrefixMatchInfo | None, key: str, endpoint: Endpoint
    ) -> tuple[float, int, int] | None:
        """The endpoint's KV blocks in use, its capacity and its block size in tokens: the
        blocks its event stream says it holds plus those its requests in flight are
        allocating (their blocks reach the stream only after their prefill), capped at the
        capacity its metrics publish. None when either is unknown (a remote index, an engine
        that does not publish its cache geometry)."""
        if info is None or info.resident_blocks is None:
            return None
        capacity = endpoint.metrics.num_gpu_blocks
        if not capacity:
            return None
        block = endpoint.metrics.block_size or info.block_size_tokens
        # An engine not heard from yet holds nothing the index knows of.
        resident = info.resident_blocks.get(key, 0) + self.reserved_tokens(key) / block
        return min(resident, float(capacity)), capacity, block

    @staticmethod
    def _displaced_tokens(occupancy: tuple[float, int, int] | None, new_tokens: float) -> float:
        """Tokens of other prefixes the request's new blocks would evict on this endpoint:
        what does not fit in the blocks it has free. 0 when its occupancy is unknown."""
        if occupancy is None:
            return 0.0
        resident, capacity, block = occupancy
        needed = math.ceil(new_tokens / block)
        return max(0, needed - (capacity - resident)) * block

    def _expected_displaced(self, occupancy: tuple[float, int, int] | None, uncached: int) -> float:
        """Tokens of other prefixes the request's new blocks are expected to evict later: the
        prefixes an engine holds grow (each conversation turn adds blocks), so the fuller it
        is the sooner what it stores now pushes another prefix out. Charged in proportion
        to the share of its cache in use; 0 when its occupancy is unknown."""
        if occupancy is None or self.params.occupancy_weight <= 0.0:
            return 0.0
        resident, capacity, _ = occupancy
        return self.params.occupancy_weight * uncached * resident / capacity

    @staticmethod
    def _fewest_uncached(info: PrefixMatchInfo | None, total: int) -> int:
        """The tokens even the best-matching engine must compute: what the request stores
        wherever it goes (only the rest is a choice that evicts)."""
        if info is None or not info.matched_tokens:
            return total
        return max(0, total - max(info.matched_tokens.values()))

    def _output_tokens(self, request: LLMRequest) -> int:
        return request.max_tokens or self.params.default_output_tokens

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        estimates = [self.estimate(cycle, request, e) for e in endpoints]
        cycle.write(
            self._cycle_key, {cycle.key(e): xe for e, xe in zip(endpoints, estimates, strict=True)}
        )
        costs = [est.ttft_s if math.isfinite(est.ttft_s) else math.inf for _, est in estimates]
        best = min(costs) if costs else 0.0
        bound = self.params.max_queue_position
        if bound > 0:
            within = [est.queue_position <= bound for _, est in estimates]
            if any(within) and not all(within):
                self.counters["gated"] += 1
                cycle.write(self._gate_key, within)
        scale = SCORE_SCALE_S
        return [scale / (scale + (c - best)) for c in costs]

    def eligible(self, cycle: CycleState, endpoints: list[Endpoint]) -> list[bool] | None:
        return cycle.read(self._gate_key, list)

    def estimates(self, cycle: CycleState) -> dict[str, TTFTEstimate]:
        """This cycle's estimates per endpoint key (after `score`)."""
        raw = cycle.read(self._cycle_key, dict) or {}
        return {k: est for k, (_, est) in raw.items()}

    @property
    def _gate_key(self) -> str:
        return "predicted-ttft/gate/" + self.name

    @property
    def _cycle_key(self) -> str:
        return "predicted-ttft/" + self.name

    # -- learning ----------------------------------------------------------------------------

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        picked = result.endpoints
        if not picked:
            return
        endpoint = picked[0]
        key = cycle.key(endpoint)
        scored = cycle.read(self._cycle_key, dict)
        if scored is not None and key in scored:
            x = scored[key][0]
        else:  # this scorer did not run in the primary profile: estimate now
            x = self.estimate(cycle, request, endpoint)[0]
        pending = self._pending[request.request_id] = _Pending(key, x)
        self._reserved[key] = self._reserved.get(key, 0.0) + pending.reserved_tokens
        while len(self._pending) > self.params.max_pending:
            self._release(self._pending.popitem(last=False)[1])

    def _release(self, pending: _Pending) -> None:
        key = pending.endpoint_key
        left = self._reserved.get(key, 0.0) - pending.reserved_tokens
        if left > 0.5:
            self._reserved[key] = left
        else:
            self._reserved.pop(key, None)  # bounded by the endpoints with requests in flight

    def reserved_tokens(self, endpoint_key: str) -> float:
        """KV tokens the requests in flight on the endpoint allocate (see __init__)."""
        return self._reserved.get(endpoint_key, 0.0)

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        pending = self._pending.pop(request.request_id, None)
        if pending is not None:
            self._release(pending)
        duration, tokens = stats.duration_s, stats.completion_tokens
        if tokens is None:  # no usage seen (no response body through the picker)
            tokens = self._output_tokens(request)
        if (
            pending is None
            or stats.status != 200
            or duration is None
            or tokens < 1
            or (stats.served is not None and stats.served != pending.endpoint_key)
        ):
            self.counters["skipped"] += 1
            return
        x = pending.x
        if tokens != round(x[OUTPUT_FEATURE] * 1000.0):
            x = list(x)
            x[OUTPUT_FEATURE] = tokens / 1000.0
        self.model.observe(self._model_key(pending.endpoint_key), "ttft", x, duration)
        self.counters["learned"] += 1

    def prefill_seconds_per_ktoken(self, endpoint_key: str) -> float:
        """The learnt prefill time per 1000 uncached tokens of one endpoint (pooled until it
        has its own samples)."""
        x = [0.0] * len(FEATURES)
        x[FEATURES.index("uncached_ktokens")] = 1.0
        return self.model.predict_ttft(self._model_key(endpoint_key), x)

    def _model_key(self, endpoint_key: str) -> str:
        """The model an endpoint is predicted with: its own (`perEndpoint`) or the pool's."""
        return endpoint_key if self.params.per_endpoint else POOL_KEY


def register(registry: Registry) -> None:
    def build(name: str, p: PredictedTTFTParams, ctx: BuildContext) -> Scorer:
        scorer = PredictedTTFTScorer(name, p)
        scorer.bind(ctx)  # the in-flight counters of the config's inflight-load-producer
        return scorer

    registry.register(
        PluginType(
            PredictedTTFTScorer.type_name,
            PredictedTTFTScorer,
            _parse,
            build,
            "lowest predicted time to first token (prefill of uncached tokens + queue), ours",
        )
    )
