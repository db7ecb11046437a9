"""Whether an endpoint has room for this request: llm-d's `context-length-aware` (context
length ranges advertised by pod labels) and `token-load-scorer` (estimated tokens in
flight)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import Filter, Plugin, Scorer, Scores
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.producers import InFlightLoadConsumer
from epp.types import Endpoint, LLMRequest

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH_LABEL = "llm-d.ai/context-length-range"
# Outside its range an endpoint scores at most this (llm-d's maxFallbackScore).
_OUT_OF_RANGE_MAX = 0.3


def parse_context_range(text: str) -> tuple[int, int]:
    """`"min-max"` (inclusive, min <= max) -> (min, max); ValueError otherwise."""
    bounds = text.split("-")
    if len(bounds) != 2:
        raise ValueError(f"invalid range format: {text!r} (expected 'min-max')")
    low, high = int(bounds[0].strip()), int(bounds[1].strip())
    if low > high:
        raise ValueError(f"min ({low}) cannot be greater than max ({high})")
    return low, high


def range_score(context_length: int, low: int, high: int) -> float:
    """llm-d's range score: inside the range 0.3 + 0.7 * (0.7 * narrowness + 0.3 *
    headroom), narrowness = 1 / (1 + width / 10000), headroom = (max - length) / width;
    a zero-width range that fits scores 1. Outside: 0.3 / (1 + distance / 1000)."""
    if low <= context_length <= high:
        width = high - low
        if width == 0:
            return 1.0
        narrowness = 1.0 / (1.0 + width / 10000.0)
        headroom = (high - context_length) / width
        return _OUT_OF_RANGE_MAX + (0.7 * narrowness + 0.3 * headroom) * (1.0 - _OUT_OF_RANGE_MAX)
    distance = context_length - high if context_length > high else low - context_length
    return _OUT_OF_RANGE_MAX / (1.0 + distance / 1000.0)


def context_length(request: LLMRequest) -> int:
    """Token ids when the request is tokenized; else llm-d's estimate: a quarter of the
    characters of the message contents (string contents only) plus the completion prompt."""
    if request.token_ids:
        return len(request.token_ids)
    chars = 0
    for message in request.messages or ():
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
    if request.prompt is not None:
        chars += len(request.prompt)
    return int(chars * 0.25)


@dataclass(frozen=True)
class ContextLengthParams:
    label: str = DEFAULT_CONTEXT_LENGTH_LABEL
    enable_filtering: bool = False


def _parse_context_length(params: Params) -> ContextLengthParams:
    label = params.string("label", DEFAULT_CONTEXT_LENGTH_LABEL)
    if not label:
        raise params.fail("label", "must be specified")
    # Newer llm-d: a producer of reusable (cached) tokens to subtract; not available here.
    params.ignore("reusableTokensProducerName")
    return ContextLengthParams(label, params.boolean("enableFiltering", False))


class ContextLengthAware(Scorer, Filter):
    """Endpoints advertise the context lengths they serve in a label (`min-max`). Scorer:
    `range_score` for labelled endpoints, 0.5 for unlabelled ones, 0 for an unparsable
    label. Filter (only with `enableFiltering`): unlabelled endpoints and those whose range
    holds the request's length stay; unparsable labels are dropped."""

    type_name = "context-length-aware"

    def __init__(self, name: str, params: ContextLengthParams) -> None:
        super().__init__(name)
        self.params = params

    def _range(self, endpoint: Endpoint) -> tuple[int, int] | ValueError | None:
        text = endpoint.labels.get(self.params.label)
        if text is None:
            return None
        try:
            return parse_context_range(text)
        except ValueError as exc:
            return exc

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        if not self.params.enable_filtering:
            return endpoints
        length = context_length(request)
        kept = []
        for e in endpoints:
            bounds = self._range(e)
            if bounds is None:
                kept.append(e)
            elif isinstance(bounds, ValueError):
                log.debug("%s: endpoint %s: %s", self.name, e.key, bounds)
            elif bounds[0] <= length <= bounds[1]:
                kept.append(e)
        return kept

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        length = context_length(request)
        out = []
        for e in endpoints:
            bounds = self._range(e)
            if bounds is None:
                out.append(0.5)
            elif isinstance(bounds, ValueError):
                out.append(0.0)
            else:
                out.append(range_score(length, *bounds))
        return out


# --- token-load-scorer --------------------------------------------------------------------

DEFAULT_QUEUE_THRESHOLD_TOKENS = 4_194_304  # llm-d: 128 requests of 32K tokens


def _parse_token_load(params: Params) -> int:
    threshold = params.integer("queueThresholdTokens", DEFAULT_QUEUE_THRESHOLD_TOKENS)
    # llm-d replaces a non-positive threshold with the default rather than failing.
    return threshold if threshold > 0 else DEFAULT_QUEUE_THRESHOLD_TOKENS


class TokenLoadScorer(Scorer, InFlightLoadConsumer):
    """`1 - min(tokens in flight, queueThresholdTokens) / queueThresholdTokens`; 1.0 for an
    endpoint with nothing in flight. Tokens in flight are the `inflight-load-producer`'s
    estimate (one is added when the config has none)."""

    type_name = "token-load-scorer"

    def __init__(self, name: str, queue_threshold_tokens: int) -> None:
        super().__init__(name)
        self.threshold = float(queue_threshold_tokens)

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        out = []
        for e in endpoints:
            tokens = float(self.load(cycle, e).tokens)
            out.append(1.0 if tokens <= 0 else 1.0 - min(tokens, self.threshold) / self.threshold)
        return out


def register(registry: Registry) -> None:
    def build_context(name: str, p: ContextLengthParams, _ctx: BuildContext) -> Plugin:
        return ContextLengthAware(name, p)

    registry.register(
        PluginType(
            ContextLengthAware.type_name,
            ContextLengthAware,
            _parse_context_length,
            build_context,
            "context length ranges from pod labels",
        )
    )

    def build_token_load(name: str, threshold: int, ctx: BuildContext) -> Plugin:
        scorer = TokenLoadScorer(name, threshold)
        scorer.bind(ctx)
        return scorer

    registry.register(
        PluginType(
            TokenLoadScorer.type_name,
            TokenLoadScorer,
            _parse_token_load,
            build_token_load,
            "fewer estimated tokens in flight scores higher",
        )
    )
