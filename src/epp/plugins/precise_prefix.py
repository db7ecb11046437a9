"""precise-prefix-cache-scorer: the prefix-cache score from the KV-event index.

The scoring is delegated to a `PrefixIndexBackend` (kvindex in production, in-process or
over its sidecar service), built by the factory the caller supplies in `SchedulerDeps.extras`
under `PREFIX_BACKEND_FACTORY` (called with the parsed parameters). This
module stays pure: it parses the parameters, awaits the backend, and shares what it found
through the cycle state."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from epp.framework.config import ConfigError
from epp.framework.cycle import CycleState
from epp.framework.deps import DepKey
from epp.framework.params import Params
from epp.framework.plugin import Lifecycle, PreRequest, Scorer
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins._request import prompt_tokens
from epp.plugins.shared import PREFIX_MATCH_KEY, PrefixMatchInfo
from epp.types import Endpoint, LLMRequest, SchedulingResult
from kvindex.engines import DEFAULT_KV_EVENTS_PORT
from kvindex.keys import DEFAULT_BLOCK_SIZE
from kvindex.scoring import DEFAULT_TIER_WEIGHTS


class PrefixIndexBackend(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def score(self, request: LLMRequest, candidates: Sequence[str]) -> Mapping[str, float]:
        """Per candidate endpoint key, the cached fraction of the prompt (matched / total
        blocks, tier-weighted) in [0, 1]. May set `request.token_ids` when it tokenizes."""
        ...

    def record_pick(self, request: LLMRequest, endpoint_key: str) -> None:
        """The request was routed to `endpoint_key`: add speculative entries for its blocks
        (expire after `speculativeTTL` unless confirmed by KV events)."""
        ...


@dataclass(frozen=True)
class TokenProcessorConfig:
    block_size_tokens: int = DEFAULT_BLOCK_SIZE
    hash_seed: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexerConfig:
    in_memory_size: int = 100_000_000
    redis_address: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PodDiscoveryConfig:
    socket_port: int = DEFAULT_KV_EVENTS_PORT


@dataclass(frozen=True)
class KVEventsConfig:
    zmq_endpoint: str = ""
    topic_filter: str = "kv@"
    concurrency: int = 4
    engine_type: str = "vllm"
    discover_pods: bool = False
    pod_discovery: PodDiscoveryConfig = PodDiscoveryConfig()
    # Ours, not llm-d's: accept events on the bind socket from any topic instead of only from
    # the picker's endpoints (docs/security.md).
    accept_any_engine: bool = False
    # Ours: the engines' replay ROUTER port (vLLM's replay_endpoint tcp://*:PORT) on each
    # endpoint's address, for replays after gaps and at first contact; None: no replay.
    replay_port: int | None = None
    # Ours too: ZMQ CURVE certificate files (kvindex serve's --zmq-curve-*).
    curve_cert: str | None = None
    curve_clients: str | None = None
    curve_server_key: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrecisePrefixParams:
    token_processor: TokenProcessorConfig = TokenProcessorConfig()
    indexer: IndexerConfig = IndexerConfig()
    kv_events: KVEventsConfig = KVEventsConfig()
    speculative_indexing: bool = False
    speculative_ttl_s: float = 2.0
    tier_weights: Mapping[str, float] = field(
        default_factory=lambda: {"gpu": DEFAULT_TIER_WEIGHTS.gpu, "cpu": DEFAULT_TIER_WEIGHTS.cpu}
    )


PrefixBackendFactory = Callable[[PrecisePrefixParams], PrefixIndexBackend]

# The dependency this scorer needs: `SchedulerDeps(extras={PREFIX_BACKEND_FACTORY: factory})`.
PREFIX_BACKEND_FACTORY: DepKey[PrefixBackendFactory] = DepKey("prefix-backend-factory")


def parse_precise_params(params: Params) -> PrecisePrefixParams:
    """Top-level names are strict; inside the three nested configs, names this module does
    not interpret are kept in `extra` for the backend (kvindex owns their meaning)."""
    tp = params.nested("tokenProcessorConfig")
    block = tp.integer("blockSizeTokens", DEFAULT_BLOCK_SIZE, min=1)
    if not tp.has("blockSizeTokens"):
        block = tp.integer("blockSize", DEFAULT_BLOCK_SIZE, min=1)  # llm-d's README spelling
    else:
        tp.ignore("blockSize")
    token_processor = TokenProcessorConfig(block, tp.string("hashSeed", ""), tp.remaining())

    ix = params.nested("indexerConfig")
    mem = ix.nested("inMemoryConfig")
    size = mem.integer("size", 100_000_000, min=1)
    mem.finish()
    redis = ix.nested("redisConfig")
    redis_address = ix.string("redisAddr", redis.string("address", ""))
    redis.finish()
    indexer = IndexerConfig(size, redis_address, ix.remaining())

    kv = params.nested("kvEventsConfig")
    disc = kv.nested("podDiscoveryConfig")
    socket_port = disc.integer("socketPort", DEFAULT_KV_EVENTS_PORT, min=1, max=65535)
    pod_discovery = PodDiscoveryConfig(socket_port)
    disc.finish()
    curve = kv.nested("curve")
    kv_events = KVEventsConfig(
        zmq_endpoint=kv.string("zmqEndpoint", ""),
        topic_filter=kv.string("topicFilter", "kv@"),
        concurrency=kv.integer("concurrency", 4, min=1),
        engine_type=kv.string("engineType", "vllm", choices=("vllm", "sglang")),
        # llm-d's default is true (connect to every pod's socketPort); a config that names a
        # zmqEndpoint without saying is in central mode (the engines connect to it), the
        # only mode llm-d had before discoverPods existed.
        discover_pods=kv.boolean("discoverPods", not kv.has("zmqEndpoint")),
        pod_discovery=pod_discovery,
        accept_any_engine=kv.boolean("acceptAnyEngine", False),
        replay_port=kv.integer("replayPort", 0, min=0, max=65535) or None,
        curve_cert=curve.string("certFile", "") or None,
        curve_clients=curve.string("clientsDir", "") or None,
        curve_server_key=curve.string("serverKeyFile", "") or None,
        extra=kv.remaining(),
    )
    curve.finish()
    tiers = params.nested("tierWeights")
    tier_weights = {
        "gpu": tiers.number("gpu", DEFAULT_TIER_WEIGHTS.gpu, min=0.0, max=1.0),
        "cpu": tiers.number("cpu", DEFAULT_TIER_WEIGHTS.cpu, min=0.0, max=1.0),
    }
    for tier in list(tiers.remaining()):
        tier_weights[tier] = tiers.number(tier, 0.0, min=0.0, max=1.0)
    return PrecisePrefixParams(
        token_processor=token_processor,
        indexer=indexer,
        kv_events=kv_events,
        speculative_indexing=params.boolean("speculativeIndexing", False),
        speculative_ttl_s=params.duration("speculativeTTL", 2.0),
        tier_weights=tier_weights,
    )


class PrecisePrefixCacheScorer(Scorer, PreRequest, Lifecycle):
    type_name = "precise-prefix-cache-scorer"

    def __init__(self, name: str, params: PrecisePrefixParams, backend: PrefixIndexBackend) -> None:
        super().__init__(name)
        self.params = params
        self.backend = backend
        # Plugins of the config that put token ids on requests before the profiles run
        # (token-producer / tokenizer); filled in once every plugin is built.
        self.token_producers: tuple[str, ...] = ()
        # The backend's resident_blocks, looked up once (not per request); None: it has none.
        resident = getattr(backend, "resident_blocks", None)
        self._resident_blocks: Callable[[Sequence[str]], dict[str, int]] | None = (
            resident if callable(resident) else None
        )

    async def start(self) -> None:
        # A backend that says how it tokenizes and has no way, with no token producer in
        # the config: every text request would score 0. Fail now, not in silence.
        sources = getattr(self.backend, "tokenization_sources", None)
        if callable(sources) and not self.token_producers and not sources():
            raise ConfigError(
                f"{self.type_name} {self.name!r} has no way to tokenize prompts, so every "
                "score would be 0: give it tokenizer files (tokenProcessorConfig.tokenizers: "
                "{MODEL: PATH}), llm-d's tokenizer sidecar (indexerConfig.tokenizersPoolConfig: "
                "{modelName, uds: {socketFile}}), or add a token-producer plugin"
            )
        await self.backend.start()

    async def stop(self) -> None:
        await self.backend.stop()

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Any:
        return self._score(cycle, request, endpoints)

    async def _score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[float]:
        keys = cycle.keys(endpoints)
        fractions = await self.backend.score(request, keys)
        # Returned as the backend gave them: the framework clamps scores to [0, 1] (and
        # NaN to 0) when it weighs them; the match lengths below clamp their own.
        get = fractions.get
        scores = [get(k, 0.0) for k in keys]
        total = prompt_tokens(request)
        block = self.params.token_processor.block_size_tokens
        cycle.write(
            PREFIX_MATCH_KEY,
            PrefixMatchInfo(
                prompt_tokens=total,
                block_size_tokens=block,
                matched_tokens={
                    k: round(min(s, 1.0) * total)
                    for k, s in zip(keys, scores, strict=True)
                    if s > 0.0
                },
                source=self.type_name,
                resident_blocks=self._resident(keys),
            ),
        )
        return scores

    def _resident(self, keys: Sequence[str]) -> dict[str, int] | None:
        """The blocks each candidate holds, when the backend follows the event streams
        itself (the in-process index; a remote kvindex does not say)."""
        return self._resident_blocks(keys) if self._resident_blocks is not None else None

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        if not self.params.speculative_indexing:
            return
        for profile in result.profiles.values():
            if profile.endpoints:
                self.backend.record_pick(request, cycle.key(profile.endpoints[0]))


def build_precise(name: str, params: PrecisePrefixParams, ctx: BuildContext) -> Scorer:
    factory = ctx.deps.get(PREFIX_BACKEND_FACTORY)
    if factory is None:
        raise ConfigError(
            "precise-prefix-cache-scorer needs a KV-event index backend; none is available "
            "(SchedulerDeps.extras has no PREFIX_BACKEND_FACTORY)"
        )
    scorer = PrecisePrefixCacheScorer(name, params, factory(params))

    def find_token_producers() -> None:
        scorer.token_producers = tuple(
            n for n, p in ctx.plugins.items() if getattr(p, "produces_token_ids", False)
        )

    ctx.defer(find_token_producers)
    return scorer


def register(registry: Registry) -> None:
    registry.register(
        PluginType(
            PrecisePrefixCacheScorer.type_name,
            PrecisePrefixCacheScorer,
            parse_precise_params,
            build_precise,
            "prefix score from the KV-event index",
        )
    )
