"""The complete sidecar service that ``kvindex serve`` runs: :class:`IndexService` (backend,
ingest, discovery, ``/metrics`` ``/healthz`` ``/readyz``) plus the tokenizer registry, the
scorer with speculative entries, the HTTP score routes, the gRPC services (served once
ready), the doctor's event statistics and, for ``--backend redis``, the Redis fault wiring
(the backend itself and its health metrics come from :func:`kvindex.index.make_index`).

Everything is built from one :class:`~kvindex.config.ServiceConfig` (flags and file share
its loader) and all metrics land on the service's one registry::

    server = build_service(config)     # raises AssemblyError (a tokenizer cannot load, ...)
    await server.start(); ...; await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from grpc_health.v1 import health_pb2

from kvindex.config import ServiceConfig, read_token_file
from kvindex.discovery import EngineDiscovery
from kvindex.doctor import EngineEventStats
from kvindex.engine_blocks import unindexable_message
from kvindex.errors import KVIndexError
from kvindex.index.redis_lease import EngineLeases
from kvindex.ingest_service import IngestService
from kvindex.metrics import TokenizerCacheCollector
from kvindex.scoring import Scorer, ScoringConfig, TierWeights
from kvindex.service.app import IndexService
from kvindex.service.grpc_server import HealthServicer, add_grpc_services, mark_serving
from kvindex.service.redis_backend import RedisBackend
from kvindex.service.redis_backend import RegistryBridge as _RegistryBridge
from kvindex.service.score_api import ScoreMetrics, ScoreService, ScoreServiceConfig
from kvindex.service.score_http import add_score_routes
from kvindex.speculative import SpeculativeConfig, SpeculativeIndex
from kvindex.tokenize import TokenizerLoadError, TokenizerRegistry

__all__ = ["AssemblyError", "KvindexServer", "build_service", "event_stats", "load_tokenizers"]

log = logging.getLogger("kvindex.service")

HEALTH_SYNC_INTERVAL_S = 0.5  # how often gRPC health follows /readyz


class AssemblyError(KVIndexError):
    """The service cannot be built; the message names the fix (``kvindex serve`` exits 2)."""


def load_tokenizers(config: ServiceConfig) -> TokenizerRegistry | None:
    """The registry of ``--tokenizer`` / ``--lora``, every tokenizer loaded now (fail fast:
    a typo in a path should stop the start, not the first request)."""
    if not config.tokenizers:
        if config.lora_adapters:
            raise AssemblyError("--lora needs the base model's --tokenizer MODEL=PATH_OR_ID")
        return None
    fix = (
        "fix --tokenizer MODEL=PATH_OR_ID: a tokenizer.json, a model directory holding one, "
        "or a Hugging Face model id present in the local cache"
    )
    try:
        registry = TokenizerRegistry(config.tokenizers, config.lora_adapters)
        registry.preload()
    except TokenizerLoadError as exc:
        raise AssemblyError(f"{exc}\n{fix}") from exc
    return registry


def _warn_unindexable(engine: str, size: int, canonical: int) -> None:
    log.warning(
        "event=engine_block_size_unindexable engine=%s block_size=%d canonical=%d fix=%r",
        engine,
        size,
        canonical,
        unindexable_message(engine, size, canonical),
    )


def event_stats(ingest: IngestService) -> list[EngineEventStats]:
    """The ingest service's per-engine facts as the doctor's records."""
    sizes = ingest.applier.block_sizes
    unindexable = sizes.incompatible()
    return [
        EngineEventStats(
            engine=record.engine,
            model=record.model,
            discovered=record.discovered,
            batches=record.batches,
            events=record.events,
            skipped=record.skipped,
            last_seq=record.last_seq,
            last_batch_time=record.last_batch_time,
            sync=record.sync,
            block_size=unindexable.get(record.engine) or sizes.get(record.engine),
            block_size_indexable=record.engine not in unindexable,
        )
        for record in ingest.engine_activity()
    ]


def _scoring_config(config: ServiceConfig) -> ScoringConfig:
    try:
        weights = TierWeights(**config.tier_weights)
    except ValueError as exc:
        raise AssemblyError(f"{exc} (--tier-weight)") from exc
    return ScoringConfig(
        block_size=config.block_size,  # one value for ingest and scoring
        weights=weights,
        max_prompt_tokens=config.max_prompt_tokens,
    )


class KvindexServer:
    """One ``kvindex serve`` process's parts; ``await start()`` / ``await stop()``."""

    def __init__(
        self,
        config: ServiceConfig,
        discovery: list[EngineDiscovery] | None = None,
        tokenizers: TokenizerRegistry | None = None,
    ) -> None:
        self.config = config
        self.tokenizers = tokenizers if tokenizers is not None else load_tokenizers(config)
        scoring = _scoring_config(config)
        self.service = IndexService(config, discovery=discovery)
        speculative = (
            SpeculativeIndex(SpeculativeConfig(ttl_s=config.speculative_ttl_s))
            if config.speculative_ttl_s > 0
            else None
        )
        block_sizes = self.service.ingest.applier.block_sizes
        block_sizes.on_unindexable = _warn_unindexable
        self.service.metrics.watch_block_sizes(block_sizes)
        self.scorer = Scorer(self.service.index, scoring, speculative, block_sizes=block_sizes)
        # The engines' events settle speculative entries (stored blocks, cleared caches).
        self.service.ingest.applier.speculative = speculative
        # Entries of engines not in sync are withheld (or down-weighted): kvindex.sync.
        sync = self.service.ingest.sync
        self.scorer.engine_factors = lambda: sync.factors
        self.score = ScoreService(
            self.scorer,
            self.tokenizers,
            ScoreServiceConfig(),
            ScoreMetrics(self.service.metrics.registry),
            engine_known=self.service.ingest.knows,
            write_token=(
                None
                if config.api_token_file is None
                else read_token_file(config.api_token_file, "--api-token-file")
            ),
        )
        self.service.add_routes(
            lambda app, _service: add_score_routes(app, self.score, stats_provider=self.events)
        )
        self.health: Any = HealthServicer()
        self.service.grpc_servicers.append(
            lambda server, _service: add_grpc_services(server, self.score, self.health)
        )
        if self.tokenizers is not None:
            self.service.metrics.registry.register(TokenizerCacheCollector(self._cache_stats))
        self.redis: RedisBackend | None = None
        backend = self.service.index.inner
        if isinstance(backend, RedisBackend):
            self.redis = backend
            ingest = self.service.ingest
            # Rule 2 of docs/redis.md: Redis lost its data -> replay every engine in full.
            backend.on_reset(lambda _old, _new: ingest.request_full_replay())
            self.service.metrics.registry.register(_RegistryBridge(backend.metrics.registry))
            if config.redis_writers == "leased":
                # One writer per engine stream (docs/redis.md, "Writer model").
                leases = EngineLeases(backend.redis, ttl_s=config.redis_lease_ttl_s)
                backend.redis.set_fencing_owner(leases.owner, per_engine=True)
                metrics = backend.metrics
                leases.listener = lambda result, owned: metrics.observe_leases(
                    owned, result.members, len(result.gained)
                )
                ingest.set_writer_leases(leases)
        self._health_task: asyncio.Task[None] | None = None
        self._serving: bool | None = None

    def _cache_stats(self) -> dict[str, object]:
        registry = self.tokenizers
        if registry is None:
            return {}
        out: dict[str, object] = {}
        for model in registry.models:
            stats = getattr(registry.get(model), "cache_stats", None)
            if stats is not None:
                out[model] = stats()
        return out

    # -- the doctor --------------------------------------------------------------------------

    def events(self) -> list[EngineEventStats]:
        return event_stats(self.service.ingest)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def http_port(self) -> int | None:
        return self.service.http_port

    @property
    def grpc_port(self) -> int | None:
        return self.service.grpc_port

    async def start(self) -> None:
        # NOT_SERVING (not "unknown service") from the first moment the port answers.
        await mark_serving(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._serving = False
        await self.service.start()
        if self.service.grpc_port is not None:
            await self._sync_health_once()
            self._health_task = asyncio.create_task(self._sync_health())

    async def _sync_health_once(self) -> None:
        failing = await asyncio.to_thread(self.service.readiness)
        serving = not failing
        if serving != self._serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await mark_serving(self.health, status)
            log.info("event=grpc_health serving=%s failing=%s", serving, failing or "")
            self._serving = serving

    async def _sync_health(self) -> None:
        """gRPC health follows /readyz (NOT_SERVING while e.g. Redis is down)."""
        while True:
            await asyncio.sleep(HEALTH_SYNC_INTERVAL_S)
            try:
                await self._sync_health_once()
            except Exception:  # never let a probe kill the task
                log.exception("event=grpc_health_sync_failed")

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
            await self.health.enter_graceful_shutdown()
        await self.service.stop()
        if self.redis is not None:
            self.redis.close()


def build_service(
    config: ServiceConfig, discovery: list[EngineDiscovery] | None = None
) -> KvindexServer:
    return KvindexServer(config, discovery)
