"""kvindex inside the picker: the engines' KV events feed an index in this process (ingest on
its own thread), and each request is tokenized and scored against it without a network hop.

Event sockets follow llm-d's `kvEventsConfig`: with `discoverPods` (llm-d's default), the
picker connects to `tcp://<pod ip>:<podDiscoveryConfig.socketPort>` of every endpoint it
knows (the engines bind); a `zmqEndpoint` is bound as well, and every engine's PUB may connect
to it. Without `discoverPods` one SUB socket binds `zmqEndpoint` (default `tcp://*:5557`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from prometheus_client import CollectorRegistry

from epp.framework.config import ConfigError
from epp.plugins.precise_prefix import PrecisePrefixParams
from epp.precise.options import BackendOptions
from epp.precise.query import score_query
from epp.types import Endpoint, LLMRequest
from kvindex.curve import CurveConfig, load_curve
from kvindex.discovery import EngineEntry
from kvindex.engine_blocks import unindexable_message
from kvindex.engines import DEFAULT_KV_EVENTS_ENDPOINT
from kvindex.errors import ConfigError as KVIndexConfigError
from kvindex.hostport import join_host_port
from kvindex.index import BlockIndex, IndexConfig
from kvindex.indexer import Indexer, IndexerConfig
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from kvindex.scoring import DEFAULT_TIER_WEIGHTS, TierWeights
from kvindex.service.score_api import ScoreRequestError
from kvindex.tokenize import TokenizationError
from kvindex.tokenize.uds import UdsTokenizer

log = logging.getLogger("epp.precise")


def _warn_unindexable(engine: str, size: int, canonical: int) -> None:
    log.warning(unindexable_message(engine, size, canonical))


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
                zmq_bind=_bind_endpoints(kv.zmq_endpoint, kv.discover_pods),
                topic_filter=kv.topic_filter,
                accept_any_engine=kv.accept_any_engine,
                curve=_curve(kv.curve_cert, kv.curve_clients, kv.curve_server_key),
            ),
            self.index,
            # The predicted-ttft scorer reads each engine's resident blocks (resident_blocks).
            replace(self.indexer.config.ingest_config(), track_residency=True),
            KvindexMetrics(registry),
        )
        # Entries of engines not in sync (restarted, replaying, silent) are withheld from
        # scores: kvindex.sync, docs/ingest.md "Sync state".
        sync = self.ingest.sync
        self.indexer.scorer.engine_factors = lambda: sync.factors
        # Scores round to each engine's block size as the ingest applier learns it.
        self.indexer.scorer.block_sizes = self.ingest.applier.block_sizes
        # The engines' events settle speculative entries (stored blocks, cleared caches).
        self.ingest.applier.speculative = self.indexer.scorer.speculative
        self.ingest.applier.block_sizes.on_unindexable = _warn_unindexable
        self._subscribe_endpoints = subscribe_endpoints
        self._warned: set[str] = set()
        # llm-d's tokenizer sidecar (indexerConfig.tokenizersPoolConfig.uds) for its model.
        self.uds: UdsTokenizer | None = None
        pool = options.tokenizer_pool
        if pool is not None:
            self.uds = UdsTokenizer(pool.model_name, pool.uds, registry=registry)
        self._local_models = frozenset(options.tokenizers) | frozenset(options.lora_to_base)

    def tokenization_sources(self) -> list[str]:
        """How this backend turns prompts into ids: empty means it cannot (only requests
        that arrive tokenized, e.g. by a token-producer, can be scored)."""
        sources = [f"local tokenizer for {m}" for m in sorted(self._local_models)]
        if self.uds is not None:
            sources.append(f"{self.uds.where} for {self.uds.model}")
        return sources

    async def start(self) -> None:
        self.indexer.load_tokenizers()  # a tokenizer that cannot load fails the start
        if self.uds is not None:
            try:
                await self.uds.start()  # the sidecar loads the model (retried, as llm-d)
            except TokenizationError as exc:
                await self.uds.close()
                raise ConfigError(
                    f"precise-prefix-cache-scorer: indexerConfig.tokenizersPoolConfig: {exc}"
                ) from exc
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
        if self.uds is not None:
            await self.uds.close()

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
        if request.token_ids is None and self.uds is not None and not await self._sidecar(request):
            return {}
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

    def resident_blocks(self, candidates: Sequence[str]) -> dict[str, int]:
        """GPU blocks each candidate holds per its event stream (candidates never heard
        from are left out)."""
        residency = self.ingest.applier.residency
        assert residency is not None  # this backend's ingest tracks it (__init__)
        out: dict[str, int] = {}
        for key in candidates:
            blocks = residency.get(key)
            if blocks is not None:
                out[key] = blocks
        return out

    async def _sidecar(self, request: LLMRequest) -> bool:
        """Tokenize through llm-d's sidecar when it serves the request's model (sets
        `request.token_ids`); False: the request cannot be scored (counted, warned once).
        When the sidecar fails, a local tokenizer for the model, if any, is used instead."""
        uds = self.uds
        assert uds is not None
        if (request.base_model or request.model) != uds.model:
            return True  # another model: local tokenizers, if any
        try:
            if request.messages is not None:
                ids = await uds.apply_chat_template(request.messages, tools=request.tools)
            elif request.prompt is not None:
                ids = await uds.encode(request.prompt)
            else:
                return True
        except TokenizationError as exc:
            self._warn("tokenizer_sidecar", str(exc))
            return uds.model in self._local_models
        request.token_ids = ids
        return True

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


def _bind_endpoints(zmq_endpoint: str, discover_pods: bool) -> tuple[str, ...]:
    """The configured endpoint even with discoverPods (llm-d binds it too); with neither,
    the default, so that central-mode engines still reach the picker."""
    if zmq_endpoint:
        return (zmq_endpoint,)
    return () if discover_pods else (DEFAULT_BIND,)
