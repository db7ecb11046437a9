"""prefix-cache-scorer (approximate): which endpoints probably hold this prompt's prefix,
learned from this picker's own routing history.

The prompt is cut into blocks and hashed as a chain (each block's hash is seeded by the one
before, the first by model and cache_salt), so a block hash stands for the whole prefix up
to it. After each pick the chosen endpoints' per-endpoint LRU learns the chain; scoring
walks the chain and counts, per endpoint, the blocks matched before the first miss.

Blocks are `blockSizeTokens` tokens of `request.token_ids` when the request is tokenized,
otherwise `blockSizeTokens * 4` characters of the prompt text (llm-d's 4 characters per
token estimate). Only whole blocks are hashed, at most `maxPrefixBlocksToMatch`."""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import PreRequest, Scorer, Scores
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins._request import CHARS_PER_TOKEN, prompt_text
from epp.plugins.precise_prefix import PrecisePrefixParams, build_precise, parse_precise_params
from epp.plugins.shared import PREFIX_MATCH_KEY, PrefixMatchInfo, prefix_match
from epp.types import Endpoint, LLMRequest, SchedulingResult

_HASHES_KEY = "prefix-cache-scorer/hashes/"
_CONSUMED_KEY = "prefix-cache-scorer/consumed/"


@dataclass(frozen=True)
class PrefixParams:
    block_size_tokens: int = 16
    max_prefix_blocks_to_match: int = 2048
    lru_capacity_per_server: int = 31250


def parse_prefix_params(params: Params) -> PrefixParams | PrecisePrefixParams:
    # Old llm-d configs select precise scoring on this type with `mode: cache_tracking`.
    mode = params.string("mode", "estimate", choices=("estimate", "cache_tracking"))
    if mode == "cache_tracking":
        params.ignore("kvCacheRedisAddr")
        return parse_precise_params(params)
    block = params.integer("blockSizeTokens", 16, min=1)
    for legacy in ("blockSize", "hashBlockSize"):  # characters, deprecated
        if params.has(legacy) and not params.has("blockSizeTokens"):
            chars = params.integer(legacy, 64, min=1)
            block = max(1, chars // CHARS_PER_TOKEN)
        else:
            params.ignore(legacy)
    # autoTune infers the block size and capacity from engine metrics in llm-d; here the
    # configured values always apply. prefixMatchInfoProducerName (newer llm-d) names the
    # producer whose match info the scorer reads; this scorer reads whichever producer ran.
    params.ignore("autoTune", "prefixMatchInfoProducerName")
    return PrefixParams(
        block_size_tokens=block,
        max_prefix_blocks_to_match=params.integer("maxPrefixBlocksToMatch", 2048, min=1),
        lru_capacity_per_server=params.integer("lruCapacityPerServer", 31250, min=1),
    )


def block_hashes(request: LLMRequest, block_size_tokens: int, max_blocks: int) -> list[int]:
    """The chained hashes of the request's whole prompt blocks."""
    seed = xxhash.xxh3_64_intdigest(
        f"{request.base_model or request.model}\x00{request.cache_salt or ''}".encode()
    )
    hashes: list[int] = []
    h = seed
    digest = xxhash.xxh3_64_intdigest
    if request.token_ids is not None:
        tokens = request.token_ids
        n = min(len(tokens) // block_size_tokens, max_blocks)
        packed = array("Q", tokens[: n * block_size_tokens]).tobytes()
        step = block_size_tokens * 8
        for i in range(n):
            h = digest(packed[i * step : (i + 1) * step], seed=h)
            hashes.append(h)
        return hashes
    text = prompt_text(request)
    step = block_size_tokens * CHARS_PER_TOKEN
    n = min(len(text) // step, max_blocks)
    for i in range(n):
        h = digest(text[i * step : (i + 1) * step].encode("utf-8", "surrogatepass"), seed=h)
        hashes.append(h)
    return hashes


class PrefixIndex:
    """Per-endpoint LRU of block hashes plus the reverse map hash -> endpoints."""

    def __init__(self, capacity_per_server: int) -> None:
        self.capacity = capacity_per_server
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}

    def record(self, server: str, hashes: list[int]) -> None:
        lru = self._lru.get(server)
        if lru is None:
            lru = self._lru[server] = OrderedDict()
        holders = self._holders
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                holders.setdefault(h, set()).add(server)
        while len(lru) > self.capacity:
            old, _ = lru.popitem(last=False)
            owners = holders.get(old)
            if owners is not None:
                owners.discard(server)
                if not owners:
                    del holders[old]

    def forget(self, server: str) -> None:
        """Drop an endpoint that left the pool."""
        lru = self._lru.pop(server, None)
        for h in lru or ():
            owners = self._holders.get(h)
            if owners is not None:
                owners.discard(server)
                if not owners:
                    del self._holders[h]

    def match(self, hashes: list[int], candidates: set[str]) -> dict[str, int]:
        """Blocks matched from the start, per candidate with at least one."""
        matched: dict[str, int] = {}
        holders = self._holders
        active: set[str] | None = None
        depth = 0
        for h in hashes:
            owners = holders.get(h)
            if not owners:
                now: set[str] = set()
            elif active is None:
                now = owners & candidates
            else:
                now = active & owners
            if active is not None:
                for s in active - now:
                    matched[s] = depth
            active = now
            if not active:
                break
            depth += 1
        if active:
            for s in active:
                matched[s] = depth
        return matched

    def servers(self) -> list[str]:
        return list(self._lru)

    def size(self, server: str) -> int:
        lru = self._lru.get(server)
        return len(lru) if lru is not None else 0


# Endpoints not among the candidates of this many consecutive decisions are dropped from the
# index (they left the pool; llm-d prunes inactive pods periodically too).
SWEEP_EVERY = 1024


class PrefixCacheScorer(Scorer, PreRequest):
    type_name = "prefix-cache-scorer"

    def __init__(self, name: str, params: PrefixParams) -> None:
        super().__init__(name)
        self.params = params
        self.index = PrefixIndex(params.lru_capacity_per_server)
        self._hashes_key = _HASHES_KEY + name
        self._consumed_key = _CONSUMED_KEY + name
        self._recent: set[str] = set()
        self._decisions = 0
        self.forgotten = 0

    def _sweep(self, keys: list[str]) -> None:
        self._recent.update(keys)
        self._decisions += 1
        if self._decisions < SWEEP_EVERY:
            return
        for server in self.index.servers():
            if server not in self._recent:
                self.index.forget(server)
                self.forgotten += 1
        self._recent = set()
        self._decisions = 0

    def _hashes(self, cycle: CycleState, request: LLMRequest) -> list[int]:
        cached = cycle.read(self._hashes_key, list)
        if cached is None:
            p = self.params
            cached = block_hashes(request, p.block_size_tokens, p.max_prefix_blocks_to_match)
            cycle.write(self._hashes_key, cached)
        return cached

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        keys = cycle.keys(endpoints)
        produced = prefix_match(cycle)
        if produced is not None and produced.endpoint_scores is not None:
            # A prefix producer ran for this request: score from its data (one data layer,
            # as llm-d's scorer consumes PrefixCacheMatchInfo) and learn nothing here.
            cycle.write(self._consumed_key, True)
            get = produced.endpoint_scores.get
            return [get(k, 0.0) for k in keys]
        hashes = self._hashes(cycle, request)
        self._sweep(keys)
        block = self.params.block_size_tokens
        total = len(hashes)
        matched = self.index.match(hashes, set(keys)) if total else {}
        if request.token_ids is not None:
            tokens = len(request.token_ids)
        else:
            tokens = len(prompt_text(request)) // CHARS_PER_TOKEN
        cycle.write(
            PREFIX_MATCH_KEY,
            PrefixMatchInfo(
                prompt_tokens=tokens,
                block_size_tokens=block,
                matched_tokens={k: n * block for k, n in matched.items()},
                source=self.type_name,
            ),
        )
        if not matched:
            return [0.0] * len(keys)
        return [matched.get(k, 0) / total for k in keys]

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        if cycle.read(self._consumed_key, bool):
            return  # the producer whose data was used learns from the pick
        hashes = self._hashes(cycle, request)
        if not hashes:
            return
        # The primary pick (decode) and, under P/D, the prefill pick both hold the prefix.
        for profile in result.profiles.values():
            if profile.endpoints:
                self.index.record(cycle.key(profile.endpoints[0]), hashes)


def _build(name: str, params: PrefixParams | PrecisePrefixParams, ctx: BuildContext) -> Scorer:
    if isinstance(params, PrecisePrefixParams):
        return build_precise(name, params, ctx)
    return PrefixCacheScorer(name, params)


def register(registry: Registry) -> None:
    registry.register(
        PluginType(
            PrefixCacheScorer.type_name,
            PrefixCacheScorer,
            parse_prefix_params,
            _build,
            "approximate prefix-cache affinity from routing history",
        ),
        aliases=("prefix-cache",),
    )
