"""llm-d's data producers: plugins that run once per request before the profiles and fill
the cycle state (or the request) with what filters, scorers and admitters read.

- `token-producer` (legacy `tokenizer`): the prompt's token ids on `LLMRequest.token_ids`,
  from vLLM's render endpoints (`kvindex.tokenize.EngineTokenizer`) or llm-d's tokenizer
  sidecar over a Unix socket (`kvindex.tokenize.UdsTokenizer`).
- `approx-prefix-cache-producer`: the approximate prefix index of `prefix-cache-scorer`
  run as a producer; writes `PrefixMatchInfo` (with `endpoint_scores`).
- `precise-prefix-cache-producer`: the KV-event index of `precise-prefix-cache-scorer` run
  as a producer; writes `PrefixMatchInfo` (with `endpoint_scores`).
- `inflight-load-producer`: requests and estimated tokens in flight per endpoint, counted
  from this picker's decisions; writes `InFlightLoad` per endpoint.
- `predicted-latency-producer`: TTFT/TPOT predictions per endpoint from the online latency
  model of `predicted-latency-scorer`; writes `LatencyPredictionInfo` per endpoint.

Every producer writes into the same `CycleState` keys the existing scorers use
(`epp.plugins.shared`), so a `prefix-cache-scorer` behind a producer consumes the producer's
match info instead of keeping a second index."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from epp.framework.config import ConfigError
from epp.framework.cycle import CycleState
from epp.framework.observer import SchedulerObserver
from epp.framework.params import Params
from epp.framework.plugin import (
    DataProducer,
    Lifecycle,
    Plugin,
    PreRequest,
    ResponseComplete,
    ResponseHeaders,
)
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins._request import CHARS_PER_TOKEN, prompt_text
from epp.plugins.precise_prefix import (
    PrecisePrefixCacheScorer,
    PrecisePrefixParams,
    build_precise,
    parse_precise_params,
)
from epp.plugins.predicted_latency import (
    SLO_TPOT_HEADER,
    SLO_TTFT_HEADER,
    PredictedLatencyParams,
    PredictedLatencyScorer,
    parse_upstream_latency_params,
)
from epp.plugins.prefix import PrefixCacheScorer, PrefixParams
from epp.plugins.shared import (
    INFLIGHT_LOAD_KEY,
    LATENCY_PREDICTION_KEY,
    InFlightLoad,
    LatencyPredictionInfo,
    inflight_load,
    prefix_match,
)
from epp.types import Endpoint, LLMRequest, ResponseStats, SchedulingResult

log = logging.getLogger(__name__)

# llm-d's profile name whose pick is released at the start of the response stream.
PREFILL_PROFILE = "prefill"


# --- approx-prefix-cache-producer ---------------------------------------------------------


def _parse_approx(params: Params) -> PrefixParams:
    block = params.integer("blockSizeTokens", 16, min=0)
    if params.has("blockSize") and not params.has("blockSizeTokens"):
        raise params.fail(
            "blockSize", "is deprecated; use blockSizeTokens (the cache block size in tokens)"
        )
    params.ignore("blockSize")
    auto_tune = params.boolean("autoTune", False)
    if block <= 0 and not auto_tune:
        raise params.fail("blockSizeTokens", "must be > 0 when autoTune is disabled")
    max_blocks = params.integer("maxPrefixBlocksToMatch", 256, min=1)
    max_tokens = params.integer("maxPrefixTokensToMatch", 0, min=0)
    if max_tokens > 0 and block > 0:
        max_blocks = max(1, max_tokens // block)
    return PrefixParams(
        block_size_tokens=block if block > 0 else 16,
        max_prefix_blocks_to_match=max_blocks,
        lru_capacity_per_server=params.integer("lruCapacityPerServer", 31250, min=1),
    )


class ApproxPrefixCacheProducer(DataProducer, PreRequest):
    """The approximate prefix index as a producer: match lengths for every candidate before
    the profiles run, learned from the picks (primary, and prefill under P/D)."""

    type_name = "approx-prefix-cache-producer"
    produce_stage = 1

    def __init__(self, name: str, params: PrefixParams) -> None:
        super().__init__(name)
        self.params = params
        self.index_owner = PrefixCacheScorer(f"{name}/index", params)

    def produce(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> None:
        scores = self.index_owner.score(cycle, request, endpoints)
        info = prefix_match(cycle)
        if info is None:
            return
        info.source = self.type_name
        info.endpoint_scores = {
            cycle.key(e): float(s) for e, s in zip(endpoints, scores, strict=True)
        }

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        self.index_owner.pre_request(cycle, request, result)


# --- precise-prefix-cache-producer --------------------------------------------------------


class PrecisePrefixCacheProducer(DataProducer, PreRequest, Lifecycle):
    """The KV-event index as a producer (newer llm-d splits the precise scorer into this
    producer plus `prefix-cache-scorer` with `prefixMatchInfoProducerName`)."""

    type_name = "precise-prefix-cache-producer"
    produce_stage = 1

    def __init__(self, name: str, scorer: PrecisePrefixCacheScorer) -> None:
        super().__init__(name)
        self.scorer = scorer

    async def start(self) -> None:
        await self.scorer.start()

    async def stop(self) -> None:
        await self.scorer.stop()

    async def produce(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> None:
        scores = await self.scorer._score(cycle, request, endpoints)
        info = prefix_match(cycle)
        if info is None:
            return
        info.source = self.type_name
        info.endpoint_scores = {
            cycle.key(e): min(max(float(s), 0.0), 1.0) if math.isfinite(s) else 0.0
            for e, s in zip(endpoints, scores, strict=True)
        }

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        self.scorer.pre_request(cycle, request, result)


def _parse_precise_producer(params: Params) -> PrecisePrefixParams:
    # Newer llm-d names that have no meaning for this index (its metrics are always on).
    params.ignore("prefixMatchInfoProducerName")
    return parse_precise_params(params)


def _build_precise_producer(
    name: str, params: PrecisePrefixParams, ctx: BuildContext
) -> PrecisePrefixCacheProducer:
    scorer = build_precise(f"{name}/index", params, ctx)
    assert isinstance(scorer, PrecisePrefixCacheScorer)
    return PrecisePrefixCacheProducer(name, scorer)


# --- inflight-load-producer ---------------------------------------------------------------

# llm-d's SimpleTokenEstimator: input tokens (body bytes / 4, else characters / 4) plus 1.5
# times as many output tokens.
_OUTPUT_RATIO = 1.5


def estimate_request_tokens(request: LLMRequest) -> int:
    if request.raw_body:
        inputs = max(len(request.raw_body) // 4, 1)
    elif request.token_ids is not None:
        inputs = len(request.token_ids)
    else:
        text = prompt_text(request)
        if not text:
            return 0
        inputs = max(1, round(len(text) / CHARS_PER_TOKEN))
    return inputs + round(inputs * _OUTPUT_RATIO)


@dataclass(slots=True)
class _Charge:
    profile: str
    endpoint_key: str
    tokens: int


@dataclass(slots=True)
class _Load:
    requests: int = 0
    tokens: int = 0


class InFlightLoadProducer(DataProducer, PreRequest, ResponseHeaders, ResponseComplete):
    """Counts what this picker sent to each endpoint and has not seen finish: +1 request and
    the estimated tokens for the first pick of every profile result at decision time; the
    prefill pick is released when the response starts, the others when it completes."""

    type_name = "inflight-load-producer"
    produce_stage = 1
    response_data = "end"  # releases at the end of the response; reads no body

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._load: dict[str, _Load] = {}
        self._charges: dict[str, list[_Charge]] = {}

    def load(self, endpoint_key: str) -> InFlightLoad:
        current = self._load.get(endpoint_key)
        if current is None:
            return InFlightLoad()
        return InFlightLoad(current.requests, current.tokens)

    def produce(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> None:
        cycle.write(INFLIGHT_LOAD_KEY, {cycle.key(e): self.load(cycle.key(e)) for e in endpoints})

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        tokens = estimate_request_tokens(request)
        charges = self._charges.setdefault(request.request_id, [])
        for profile_name, profile in result.profiles.items():
            if not profile.endpoints:
                continue
            key = cycle.key(profile.endpoints[0])
            load = self._load.setdefault(key, _Load())
            load.requests += 1
            load.tokens += tokens
            charges.append(_Charge(profile_name, key, tokens))

    def _release(self, request_id: str, prefill_only: bool) -> None:
        charges = self._charges.get(request_id)
        if not charges:
            self._charges.pop(request_id, None)
            return
        kept: list[_Charge] = []
        for charge in charges:
            if prefill_only and charge.profile != PREFILL_PROFILE:
                kept.append(charge)
                continue
            load = self._load.get(charge.endpoint_key)
            if load is None:
                continue
            load.requests = max(0, load.requests - 1)
            load.tokens = max(0, load.tokens - charge.tokens)
            if load.requests == 0 and load.tokens == 0:
                del self._load[charge.endpoint_key]
        if kept:
            self._charges[request_id] = kept
        else:
            self._charges.pop(request_id, None)

    def on_response_headers(self, request: LLMRequest, served: str | None) -> None:
        self._release(request.request_id, prefill_only=True)

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        self._release(request.request_id, prefill_only=False)

    def forget_endpoint(self, endpoint_key: str) -> None:
        """The endpoint left the pool (llm-d drops its counters on the delete event)."""
        self._load.pop(endpoint_key, None)


def ensure_inflight_producer(
    ctx: BuildContext, use: Callable[[InFlightLoadProducer], None]
) -> None:
    """Once every plugin is built, hand `use` the config's inflight-load-producer; when the
    config has none, add one (llm-d registers it as the default producer of in-flight
    load), so every consumer reads the same counters."""

    def resolve() -> None:
        for plugin in ctx.plugins.values():
            if isinstance(plugin, InFlightLoadProducer):
                use(plugin)
                return
        name = InFlightLoadProducer.type_name
        while name in ctx.plugins:
            name += "-default"
        producer = InFlightLoadProducer(name)
        ctx.plugins[name] = producer
        log.info(
            "added %s %r: llm-d's default producer of in-flight load", producer.type_name, name
        )
        use(producer)

    ctx.defer(resolve)


def ensure_prefix_producer(ctx: BuildContext) -> None:
    """Plugins that read prefix matches before the profiles' scorers run (filters, the
    latency producer) need a prefix producer; when the config has none, add an
    approx-prefix-cache-producer with its defaults, as llm-d does."""

    def resolve() -> None:
        producers = (ApproxPrefixCacheProducer, PrecisePrefixCacheProducer)
        if any(isinstance(p, producers) for p in ctx.plugins.values()):
            return
        name = ApproxPrefixCacheProducer.type_name
        while name in ctx.plugins:
            name += "-default"
        ctx.plugins[name] = ApproxPrefixCacheProducer(
            name, PrefixParams(max_prefix_blocks_to_match=256)
        )
        log.info(
            "added approx-prefix-cache-producer %r: llm-d's default producer of prefix matches",
            name,
        )

    ctx.defer(resolve)


class InFlightLoadConsumer(Plugin):
    """Base of the plugins that read in-flight load (token-load-scorer, concurrency-detector):
    they read the one `inflight-load-producer` (`bind` finds or adds it)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        # Replaced by the config's producer in `bind`; a lone instance counts nothing.
        self.tracker = InFlightLoadProducer(f"{name}/unbound")

    def bind(self, ctx: BuildContext) -> None:
        def use(producer: InFlightLoadProducer) -> None:
            self.tracker = producer

        ensure_inflight_producer(ctx, use)

    def load(self, cycle: CycleState, endpoint: Endpoint) -> InFlightLoad:
        snapshot = inflight_load(cycle)
        key = cycle.key(endpoint)
        if snapshot is not None:
            value = snapshot.get(key)
            if isinstance(value, InFlightLoad):
                return value
        return self.tracker.load(key)


def _parse_inflight(params: Params) -> None:
    # Newer llm-d: the prefix producer whose matches discount cached tokens; the estimate
    # here does not use prefix matches, so it is accepted without effect.
    params.ignore("prefixMatchInfoProducerName")


# --- token-producer -----------------------------------------------------------------------


@dataclass(frozen=True)
class TokenProducerParams:
    model_name: str
    render_url: str = "http://localhost:8000"
    timeout_s: float = 5.0
    multimodal_timeout_s: float = 30.0
    uds_config: dict[str, Any] = field(default_factory=dict)


def _parse_token_producer(params: Params) -> TokenProducerParams:
    model = params.string("modelName", "")
    if not model:
        raise params.fail("modelName", "must be specified")
    uds = params.nested("udsTokenizerConfig")
    uds_config = uds.remaining()
    uds.ignore(*uds_config)
    uds.finish()
    if uds_config.get("socketFile"):  # llm-d's IsEnabled: a socket file is named
        from kvindex.tokenize.uds import UdsTokenizerConfig

        try:
            UdsTokenizerConfig.from_mapping(uds_config)
        except ValueError as exc:
            raise params.fail("udsTokenizerConfig", str(exc)) from None
    else:
        uds_config = {}
    vllm_given = params.has("vllm")
    vllm = params.nested("vllm")
    url = vllm.string("http", "")
    url = vllm.string("url", url)  # newer llm-d spelling of the same base URL
    timeout = vllm.duration("timeout", 5.0)
    mm_timeout = vllm.duration("mmTimeout", 30.0)
    vllm.finish()
    if vllm_given and uds_config:
        raise params.fail("vllm", "only one of 'udsTokenizerConfig' or 'vllm' may be set")
    return TokenProducerParams(
        model_name=model,
        render_url=(url or "http://localhost:8000").rstrip("/"),
        timeout_s=timeout,
        multimodal_timeout_s=mm_timeout,
        uds_config=uds_config,
    )


def _has_multimodal_parts(request: LLMRequest) -> bool:
    for message in request.messages or ():
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    return True
    return False


class TokenProducer(DataProducer, Lifecycle):
    """Tokenizes each request once, before the profiles, through vLLM's render endpoints
    (`POST {url}/v1/completions/render`, `/v1/chat/completions/render`) and leaves the ids
    on `LLMRequest.token_ids` for every later plugin. A request already tokenized is left
    alone. With `udsTokenizerConfig.socketFile`, llm-d's tokenizer sidecar over that Unix
    socket instead (`kvindex.tokenize.UdsTokenizer`); a sidecar that cannot load the model
    fails the start, as upstream fails the plugin's creation."""

    type_name = "token-producer"
    produce_stage = 0
    produces_token_ids = True  # read by precise-prefix-cache-scorer's start-up check

    def __init__(self, name: str, params: TokenProducerParams) -> None:
        super().__init__(name)
        self.params = params
        self._session: aiohttp.ClientSession | None = None
        self._text: Any = None
        self._multimodal: Any = None
        self._uds: Any = None
        self.failures = 0

    async def start(self) -> None:
        p = self.params
        if p.uds_config:
            await self._start_uds()
            return
        # Imported here: kvindex's tokenizer package is only needed when this plugin is used.
        from kvindex.tokenize.engine import EngineTokenizer

        self._session = aiohttp.ClientSession()
        self._text = EngineTokenizer(
            p.render_url, p.model_name, self._session, style="render", timeout_s=p.timeout_s
        )
        self._multimodal = EngineTokenizer(
            p.render_url,
            p.model_name,
            self._session,
            style="render",
            timeout_s=p.multimodal_timeout_s,
        )
        log.info(
            "%s %r: tokenizing %s through %s/v1/(chat/)completions/render",
            self.type_name,
            self.name,
            p.model_name,
            p.render_url,
        )

    async def _start_uds(self) -> None:
        from kvindex.tokenize import TokenizationError
        from kvindex.tokenize.uds import UdsTokenizer, UdsTokenizerConfig

        p = self.params
        uds = UdsTokenizer(
            p.model_name,
            UdsTokenizerConfig.from_mapping(p.uds_config),
            timeout_s=p.timeout_s,
            multimodal_timeout_s=p.multimodal_timeout_s,
        )
        try:
            await uds.start()
        except TokenizationError as exc:
            await uds.close()
            raise ConfigError(f"{self.type_name} {self.name!r}: {exc}") from exc
        self._uds = self._text = self._multimodal = uds
        log.info(
            "%s %r: tokenizing %s through %s", self.type_name, self.name, p.model_name, uds.where
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._uds is not None:
            await self._uds.close()
            self._uds = None

    async def produce(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> None:
        if request.token_ids is not None:
            return
        if self._text is None:
            raise RuntimeError(f"{self.type_name} {self.name!r} was not started")
        try:
            if request.messages is not None:
                tokenizer = self._multimodal if _has_multimodal_parts(request) else self._text
                ids = await tokenizer.apply_chat_template(request.messages, tools=request.tools)
            elif request.prompt is not None:
                ids = await self._text.encode(request.prompt)
            else:
                return
        except Exception:
            self.failures += 1
            raise
        request.token_ids = list(ids)


def _build_token_producer(name: str, p: TokenProducerParams, _ctx: BuildContext) -> Plugin:
    return TokenProducer(name, p)


class LegacyTokenizer(TokenProducer):
    type_name = "tokenizer"


def _build_legacy_tokenizer(name: str, p: TokenProducerParams, ctx: BuildContext) -> Plugin:
    log.warning("plugin type 'tokenizer' is deprecated; use 'token-producer' (plugin %r)", name)
    _build_token_producer(name, p, ctx)
    return LegacyTokenizer(name, p)


# --- predicted-latency-producer -----------------------------------------------------------


@dataclass(frozen=True)
class PredictedLatencyProducerParams:
    sampling_mean: float = 1000.0
    max_decode_token_samples: int = 0
    slo_buffer_factor: float = 1.0
    context_ttl_s: float = 300.0
    streaming_mode: bool = False
    endpoint_role_label: str = ""
    predict_in_produce: bool = True
    model: PredictedLatencyParams = field(default_factory=PredictedLatencyParams)


def _parse_latency_producer(params: Params) -> PredictedLatencyProducerParams:
    upstream = parse_upstream_latency_params(params)
    # This picker's own model settings, as on predicted-latency-scorer.
    model = PredictedLatencyParams(
        model_path=params.string("modelPath", ""),
        save_interval_s=params.duration("saveInterval", 30.0),
        quantile=params.number("sloQuantile", 0.9, min=0.5, max=0.999),
        min_samples=params.integer("minSamples", 10, min=0),
        forgetting=params.number("forgettingFactor", 0.995, min=0.9, max=1.0),
        default_output_tokens=params.integer("defaultOutputTokens", 256, min=0),
        max_pending=params.integer("maxPendingRequests", 100_000, min=1),
    )
    return PredictedLatencyProducerParams(model=model, **upstream)


def _slo_ms(request: LLMRequest, header: str) -> float:
    raw = request.headers.get(header)
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value if value > 0 and math.isfinite(value) else 0.0


class PredictedLatencyProducer(DataProducer, PreRequest, ResponseComplete, Lifecycle):
    """Per-endpoint TTFT/TPOT predictions before the profiles run, from the same online model
    `predicted-latency-scorer` uses (llm-d asks an XGBoost sidecar; this picker learns in
    process from its own responses). Headroom = SLO - prediction, in milliseconds; an SLO
    header absent counts as met. Without `streamingMode` the TTFT model learns end-to-end
    latency and TPOT is neutral (valid, headroom 0), as llm-d."""

    type_name = "predicted-latency-producer"
    produce_stage = 2  # after the prefix producers, whose matches give the uncached tokens

    def __init__(
        self,
        name: str,
        params: PredictedLatencyProducerParams,
        *,
        clock: Callable[[], float],
        observer: SchedulerObserver | None,
    ) -> None:
        super().__init__(name)
        self.params = params
        self.predictor = PredictedLatencyScorer(
            f"{name}/model", params.model, clock=clock, observer=observer
        )
        self._dispatched: dict[str, int] = {}
        self._endpoint_of: dict[str, str] = {}

    async def start(self) -> None:
        await self.predictor.start()

    async def stop(self) -> None:
        await self.predictor.stop()

    def produce(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> None:
        p = self.params
        predictions = {cycle.key(e): self.predictor.predict(cycle, request, e) for e in endpoints}
        # The predictor remembers the features of the pick for learning (pre_request).
        cycle.write(self.predictor._cycle_key, predictions)
        if not p.predict_in_produce:
            return
        ttft_slo = _slo_ms(request, SLO_TTFT_HEADER)
        tpot_slo = _slo_ms(request, SLO_TPOT_HEADER) * p.slo_buffer_factor
        out: dict[str, LatencyPredictionInfo] = {}
        for endpoint in endpoints:
            key = cycle.key(endpoint)
            prediction = predictions[key][1]
            ttft_ms = prediction.ttft_s * 1000.0
            tpot_ms = prediction.tpot_s * 1000.0
            ttft_headroom = ttft_slo - ttft_ms if ttft_slo > 0 else 0.0
            neutral_tpot = not p.streaming_mode or (
                p.endpoint_role_label != ""
                and endpoint.labels.get(p.endpoint_role_label) == "prefill"
            )
            tpot_headroom = 0.0 if neutral_tpot or tpot_slo <= 0 else tpot_slo - tpot_ms
            out[key] = LatencyPredictionInfo(
                ttft_ms=ttft_ms,
                tpot_ms=tpot_ms,
                ttft_headroom_ms=ttft_headroom,
                tpot_headroom_ms=tpot_headroom,
                ttft_valid=ttft_slo <= 0 or ttft_ms < ttft_slo,
                tpot_valid=neutral_tpot or tpot_slo <= 0 or tpot_ms < tpot_slo,
                dispatched_requests=self._dispatched.get(key, 0),
            )
        cycle.write(LATENCY_PREDICTION_KEY, out)

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        self.predictor.pre_request(cycle, request, result)
        if result.endpoints:
            key = cycle.key(result.endpoints[0])
            self._dispatched[key] = self._dispatched.get(key, 0) + 1
            self._endpoint_of[request.request_id] = key

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        key = self._endpoint_of.pop(request.request_id, None)
        if key is not None:
            left = self._dispatched.get(key, 0) - 1
            if left > 0:
                self._dispatched[key] = left
            else:
                self._dispatched.pop(key, None)
        if self.params.streaming_mode or stats.streamed:
            self.predictor.on_response_complete(request, stats)
            return
        # Not streaming: llm-d trains the TTFT model on end-to-end latency.
        if stats.duration_s is not None:
            as_e2e = ResponseStats(
                served=stats.served,
                status=stats.status,
                streamed=True,
                started_at=stats.started_at,
                first_byte_s=stats.duration_s,
                duration_s=stats.duration_s,
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=None,
                cached_tokens=stats.cached_tokens,
                usage=stats.usage,
            )
            self.predictor.on_response_complete(request, as_e2e)
        else:
            self.predictor.on_response_complete(request, stats)


# --- registration -------------------------------------------------------------------------


def register(registry: Registry) -> None:
    def build_approx(name: str, p: PrefixParams, _ctx: BuildContext) -> Plugin:
        return ApproxPrefixCacheProducer(name, p)

    registry.register(
        PluginType(
            ApproxPrefixCacheProducer.type_name,
            ApproxPrefixCacheProducer,
            _parse_approx,
            build_approx,
            "approximate prefix matches before the profiles",
        )
    )
    registry.register(
        PluginType(
            PrecisePrefixCacheProducer.type_name,
            PrecisePrefixCacheProducer,
            _parse_precise_producer,
            _build_precise_producer,
            "KV-event prefix matches before the profiles",
        )
    )
    registry.register(
        PluginType(
            InFlightLoadProducer.type_name,
            InFlightLoadProducer,
            _parse_inflight,
            lambda name, _p, _c: InFlightLoadProducer(name),
            "in-flight requests and tokens per endpoint",
        )
    )
    registry.register(
        PluginType(
            TokenProducer.type_name,
            TokenProducer,
            _parse_token_producer,
            _build_token_producer,
            "token ids from vLLM's render endpoint",
        )
    )
    registry.register(
        PluginType(
            LegacyTokenizer.type_name,
            LegacyTokenizer,
            _parse_token_producer,
            _build_legacy_tokenizer,
            "deprecated name of token-producer",
        )
    )

    def build_latency(name: str, p: PredictedLatencyProducerParams, ctx: BuildContext) -> Plugin:
        ensure_prefix_producer(ctx)  # its uncached-token feature reads the prefix matches
        return PredictedLatencyProducer(name, p, clock=ctx.deps.clock, observer=ctx.deps.observer)

    registry.register(
        PluginType(
            PredictedLatencyProducer.type_name,
            PredictedLatencyProducer,
            _parse_latency_producer,
            build_latency,
            "per-endpoint latency predictions against the request's SLOs",
        )
    )
