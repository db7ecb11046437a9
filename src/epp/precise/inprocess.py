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

from epp.framework.config import ConfigError
from epp.plugins.precise_prefix import PrecisePrefixParams
from epp.precise.options import BackendOptions
from epp.precise.query import score_query
from epp.types import Endpoint, LLMRequest
from kvindex.curve import CurveConfig, load_curve
from kvindex.discovery import EngineEntry
from kvindex.engines import DEFAULT_KV_EVENTS_ENDPOINT
from kvindex.errors import ConfigError as KVIndexConfigError
from kvindex.hostport import join_host_port
from kvindex.index import BlockIndex, IndexConfig
from kvindex.indexer import Indexer, IndexerConfig
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from kvindex.scoring import DEFAULT_TIER_WEIGHTS, TierWeights
from kvindex.service.score_api import ScoreRequestError

log = logging.getLogger("epp.precise")

API = "epp"  # the label kvindex's score metrics carry for calls from the picker
DEFAULT_BIND = DEFAULT_KV_EVENTS_ENDPOINT


def _curve(cert: str | None, clients: str | None, server_key: str | None) -> CurveConfig | None:
    try:
        return load_curve(cert, clients, server_key)
    except KVIndexConfigError as exc:
        raise ConfigError(f"precise-prefix-cache-scorer: kvEventsConfig.curve: {exc}") from None


def _index_config(options: BackendOptions) -> IndexConfig:
    if options.redis_address:
        return IndexConfig(backend="redis", redis_url=options.redis_address)
    return IndexConfig(max_keys=options.in_memory_size)


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
        weights = params.tier_weights
        self.indexer = Indexer(
            IndexerConfig(
                index=_index_config(options),
                block_size=params.token_processor.block_size_tokens,
                default_model=options.default_model,
                tokenizers=options.tokenizers,
                lora_adapters=options.lora_to_base,
                weights=TierWeights(
                    gpu=weights.get("gpu", DEFAULT_TIER_WEIGHTS.gpu),
                    cpu=weights.get("cpu", DEFAULT_TIER_WEIGHTS.cpu),
                    storage=weights.get("storage", DEFAULT_TIER_WEIGHTS.storage),
                ),
                speculative_ttl_s=params.speculative_ttl_s if params.speculative_indexing else 0,
            ),
            registry=registry,
            index=index,
        )
        self.index = self.indexer.index
        self.service = self.indexer.service
        kv = params.kv_events
        self._discover = kv.discover_pods
        self._socket_port = kv.pod_discovery.socket_port
        self._replay_port = kv.replay_port
        self.ingest = IngestService(
            IngestServiceConfig(
                zmq_bind=() if kv.discover_pods else (kv.zmq_endpoint or DEFAULT_BIND,),
                topic_filter=kv.topic_filter,
                accept_any_engine=kv.accept_any_engine,
                curve=_curve(kv.curve_cert, kv.curve_clients, kv.curve_server_key),
            ),
            self.index,
            self.indexer.config.ingest_config(),
            KvindexMetrics(registry),
        )
        self._subscribe_endpoints = subscribe_endpoints
        self._warned: set[str] = set()

    async def start(self) -> None:
        self.indexer.load_tokenizers()  # a tokenizer that cannot load fails the start
        self.ingest.open()
        self.ingest.start()
        if self._subscribe_endpoints is not None:
            # The picker's endpoints are the engines the index knows: with discoverPods it
            # connects to each; on the bind socket only their topics are accepted.
            self.ingest.expect_discovery()
            self._subscribe_endpoints(self._endpoints_changed)

    async def stop(self) -> None:
        self.ingest.stop()
        self.indexer.close()

    def _endpoints_changed(self, endpoints: Sequence[Endpoint]) -> None:
        replay_port = self._replay_port
        entries: Mapping[str, EngineEntry] = {
            ep.key: EngineEntry(
                endpoint=ep.key,
                zmq=(
                    f"tcp://{join_host_port(ep.address, self._socket_port)}"
                    if self._discover
                    else None
                ),
                replay=(
                    f"tcp://{join_host_port(ep.address, replay_port)}" if replay_port else None
                ),
            )
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
