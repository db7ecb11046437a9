"""kvindex inside the picker: the engines' KV events feed an index in this process (ingest on
its own thread), and each request is tokenized and scored against it without a network hop.

Event sockets follow llm-d's `kvEventsConfig`: without `discoverPods`, one SUB socket binds
`zmqEndpoint` (default `tcp://*:5557`) and every engine's PUB connects to it; with
`discoverPods`, the picker connects to `tcp://<pod ip>:<podDiscoveryConfig.socketPort>` of
every endpoint it knows (the engines bind)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry

from epp.plugins.precise_prefix import PrecisePrefixParams
from epp.precise.options import BackendOptions
from epp.precise.query import score_query
from epp.types import Endpoint, LLMRequest
from kvindex.discovery import EngineEntry
from kvindex.index import BlockIndex, MemoryIndexConfig
from kvindex.index.locked import LockedIndex
from kvindex.index.native import fastest_memory_index
from kvindex.ingest import IngestConfig
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from kvindex.scoring import Scorer, ScoringConfig, TierWeights
from kvindex.service.score_api import ScoreMetrics, ScoreRequestError, ScoreService
from kvindex.speculative import SpeculativeConfig, SpeculativeIndex
from kvindex.tokenize import TokenizerRegistry

log = logging.getLogger("epp.precise")

API = "epp"  # the label kvindex's score metrics carry for calls from the picker
DEFAULT_BIND = "tcp://*:5557"


def _index(options: BackendOptions) -> BlockIndex:
    if options.redis_address:
        from kvindex.index.redis import RedisIndex

        return RedisIndex.from_url(options.redis_address)
    return fastest_memory_index(MemoryIndexConfig(max_keys=options.in_memory_size))


class InProcessIndex:
    """`PrefixIndexBackend` over an in-process kvindex."""

    def __init__(
        self,
        params: PrecisePrefixParams,
        options: BackendOptions,
        *,
        registry: CollectorRegistry | None = None,
        subscribe_endpoints: Callable[[Callable[[Sequence[Endpoint]], None]], None] | None = None,
        index: BlockIndex | None = None,
    ) -> None:
        self.params = params
        block = params.token_processor.block_size_tokens
        self.index = LockedIndex(index if index is not None else _index(options))
        kv = params.kv_events
        self._discover = kv.discover_pods
        self._socket_port = kv.pod_discovery.socket_port
        self.ingest = IngestService(
            IngestServiceConfig(
                zmq_bind=() if kv.discover_pods else (kv.zmq_endpoint or DEFAULT_BIND,),
                topic_filter=kv.topic_filter,
            ),
            self.index,
            IngestConfig(block_size=block, default_model=options.default_model),
            KvindexMetrics(registry),
        )
        weights = params.tier_weights
        speculative = (
            SpeculativeIndex(SpeculativeConfig(ttl_s=params.speculative_ttl_s))
            if params.speculative_indexing
            else None
        )
        scorer = Scorer(
            self.index,
            ScoringConfig(
                block_size=block,
                weights=TierWeights(
                    gpu=weights.get("gpu", 1.0),
                    cpu=weights.get("cpu", 0.8),
                    storage=weights.get("storage", 0.5),
                ),
            ),
            speculative,
        )
        self.tokenizers = (
            TokenizerRegistry(options.tokenizers, options.lora_to_base)
            if options.tokenizers
            else None
        )
        self.service = ScoreService(scorer, self.tokenizers, metrics=ScoreMetrics(registry))
        self._subscribe_endpoints = subscribe_endpoints
        self._warned: set[str] = set()

    async def start(self) -> None:
        if self.tokenizers is not None:
            self.tokenizers.preload()  # a tokenizer that cannot load fails the start
        self.ingest.open()
        self.ingest.start()
        if self._discover and self._subscribe_endpoints is not None:
            self.ingest.expect_discovery()
            self._subscribe_endpoints(self._endpoints_changed)

    async def stop(self) -> None:
        self.ingest.stop()

    def _endpoints_changed(self, endpoints: Sequence[Endpoint]) -> None:
        entries: Mapping[str, EngineEntry] = {
            ep.key: EngineEntry(endpoint=ep.key, zmq=f"tcp://{ep.address}:{self._socket_port}")
            for ep in endpoints
        }
        self.ingest.update_engines(entries)

    async def score(self, request: LLMRequest, candidates: Sequence[str]) -> Mapping[str, float]:
        try:
            tokens, result = self.service.score_detailed(score_query(request, candidates), API)
        except ScoreRequestError as exc:
            # Unknown model, no tokenizer, bad prompt: counted by the score metrics; the
            # request is still scheduled on the other scorers.
            self._warn(exc.reason or exc.kind.value, str(exc))
            return {}
        ids = tokens.token_ids
        # The tokenizer returns a fresh list (or the request's own ids): no copy needed.
        request.token_ids = ids if isinstance(ids, list) else list(ids)
        return {s.engine: s.score for s in result.scores}

    def record_pick(self, request: LLMRequest, endpoint_key: str) -> None:
        if request.token_ids is None:
            return
        try:
            self.service.record_speculative(endpoint_key, score_query(request), API)
        except ScoreRequestError as exc:
            self._warn(exc.reason or exc.kind.value, str(exc))

    def _warn(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("precise prefix scoring skipped (%s): %s", reason, message)
