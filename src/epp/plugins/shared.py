"""What plugin families share through the `CycleState`: each shared value's key and type,
declared here with the plugins that write and read them (the framework knows none of them).

The prefix scorers (approximate and precise) write a `PrefixMatchInfo`; the P/D decider,
the in-flight load scorer and the latency predictor read it with `prefix_match(cycle)`."""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.framework.cycle import CycleState


@dataclass(slots=True)
class PrefixMatchInfo:
    """What a prefix scorer found for this request. `matched_tokens[key]` is the length of
    the cached prefix on that endpoint (0 when absent); `prompt_tokens` the prompt length in
    tokens (estimated from characters when the request is not tokenized)."""

    prompt_tokens: int
    block_size_tokens: int
    matched_tokens: dict[str, int] = field(default_factory=dict)
    source: str = ""  # plugin type that wrote it
    # Set by the prefix producers (approx-/precise-prefix-cache-producer): the score a
    # `prefix-cache-scorer` gives each endpoint key when it consumes this info instead of
    # keeping its own index (llm-d's scorer reads its producer's PrefixCacheMatchInfo).
    endpoint_scores: dict[str, float] | None = None
    # Set by the precise producer/scorer when its index follows the engines' event streams:
    # the GPU blocks (in each engine's own block size) each endpoint holds, stores minus
    # removals. With the engine's capacity (metrics' num_gpu_blocks) it says where a new
    # prefix fits without evicting another (kvindex.engine_blocks.EngineResidency).
    resident_blocks: dict[str, int] | None = None

    def hit_tokens(self, endpoint_key: str) -> int:
        return self.matched_tokens.get(endpoint_key, 0)

    def uncached_tokens(self, endpoint_key: str) -> int:
        return max(0, self.prompt_tokens - self.hit_tokens(endpoint_key))

    def any_hit(self) -> bool:
        return any(v > 0 for v in self.matched_tokens.values())


PREFIX_MATCH_KEY = "prefix-match"


def prefix_match(cycle: CycleState) -> PrefixMatchInfo | None:
    """This cycle's `PrefixMatchInfo`, or None when no prefix scorer ran (yet)."""
    return cycle.read(PREFIX_MATCH_KEY, PrefixMatchInfo)


@dataclass(slots=True, frozen=True)
class InFlightLoad:
    """Requests and estimated tokens the picker has sent to one endpoint and not yet seen
    finish (llm-d's InFlightLoad attribute)."""

    requests: int = 0
    tokens: int = 0


INFLIGHT_LOAD_KEY = "inflight-load"


def inflight_load(cycle: CycleState) -> dict[str, InFlightLoad] | None:
    """This cycle's in-flight load per endpoint key (written by the in-flight producer)."""
    return cycle.read(INFLIGHT_LOAD_KEY, dict)


@dataclass(slots=True, frozen=True)
class LatencyPredictionInfo:
    """One endpoint's predicted latency for this request against its SLOs (llm-d's
    LatencyPredictionInfo): milliseconds; headroom = SLO - prediction (0 when no SLO of that
    kind applies, so the prediction counts as within it)."""

    ttft_ms: float
    tpot_ms: float
    ttft_headroom_ms: float
    tpot_headroom_ms: float
    ttft_valid: bool
    tpot_valid: bool
    dispatched_requests: int = 0

    @property
    def valid(self) -> bool:
        return self.ttft_valid and self.tpot_valid


LATENCY_PREDICTION_KEY = "latency-prediction"


def latency_predictions(cycle: CycleState) -> dict[str, LatencyPredictionInfo] | None:
    """This cycle's latency predictions per endpoint key (written by the
    predicted-latency-producer), or None when no producer ran."""
    return cycle.read(LATENCY_PREDICTION_KEY, dict)
