"""Assembly of the kvindex service: index backend, ingest thread, discovery, and the aiohttp
app serving ``/metrics``, ``/healthz`` and ``/readyz``.

The index comes from :func:`kvindex.index.make_index` (``--backend memory|native|python|redis``
and the capacity and ``--redis-*`` flags, via :func:`index_config`; ``backend_options`` are
more Redis client options), locked and with its metrics on the service's registry; its
errors are reported with the flag to fix. ``IndexService(config, index=...)`` takes any
other :class:`BlockIndex` instead, wrapped the same way. A backend may implement
``health() -> str | None`` (None = healthy); ``/readyz`` reports it as ``index``.

Extension points (small on purpose):

* :meth:`IndexService.add_routes`: ``installer(app, service)`` adds routes (``/v1/score``,
  ``/v1/debug``) to :attr:`IndexService.http_app` before :meth:`IndexService.start`.
* :attr:`IndexService.grpc_servicers`: ``installer(server, service)`` callables; when any are
  registered and ``grpc_port`` is set, a ``grpc.aio`` server is started on that port.
* :meth:`IndexService.add_readiness_check`: more ``/readyz`` conditions.

Handlers read the index through :attr:`IndexService.index` (a lock-guarded wrapper: the ingest
thread writes concurrently); for an I/O backend call it via ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvindex.config import ConfigError, ServiceConfig, sync_config
from kvindex.curve import load_curve
from kvindex.discovery import DiscoveryHub, EngineDiscovery, FileDiscovery, StaticDiscovery
from kvindex.index.base import BlockIndex
from kvindex.index.factory import IndexConfig, IndexConfigError, make_index, wrap_index
from kvindex.ingest import IngestConfig
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics

__all__ = ["GrpcInstaller", "IndexService", "RouteInstaller", "index_config"]

log = logging.getLogger("kvindex.service")

RouteInstaller = Callable[[web.Application, "IndexService"], None]
GrpcInstaller = Callable[[Any, "IndexService"], None]  # (grpc.aio.Server, service)
ReadinessCheck = Callable[[], str | None]


# IndexConfig field -> the ServiceConfig flag (or file key) that sets it.
_INDEX_FLAGS = {
    "backend": "--backend",
    "max_keys": "--index-max-keys",
    "memory_budget_bytes": "--index-memory-budget",
    "redis_url": "--redis-url",
    "redis_prefix": "--redis-prefix",
    "redis_ttl_s": "--redis-ttl",
    "redis_backoff_max_s": "redis_backoff_max_s",
    "redis_options": "backend_options",
    "redis_groups": "--redis-groups",
    "redis_write_queue": "--redis-write-queue",
}


def index_config(config: ServiceConfig) -> IndexConfig:
    return IndexConfig(
        backend=config.backend,
        max_keys=config.index_max_keys,
        memory_budget_bytes=config.memory_budget_bytes(),
        redis_url=config.redis_url,
        redis_prefix=config.redis_prefix,
        redis_ttl_s=config.redis_ttl_s,
        redis_backoff_max_s=config.redis_backoff_max_s,
        redis_options=dict(config.backend_options),
        redis_groups=config.redis_groups,
        redis_write_queue=config.redis_write_queue,
        redis_pipeline=config.redis_pipeline,
        redis_copy_age_interval_s=config.copy_ttl_s / 2 * 0.9,
    )


def ingest_config(config: ServiceConfig) -> IngestConfig:
    return IngestConfig(
        block_size=config.block_size,
        indexed_kinds=frozenset(config.index_groups),
        default_model=config.default_model,
    )


def ingest_service_config(config: ServiceConfig) -> IngestServiceConfig:
    return IngestServiceConfig(
        zmq_bind=tuple(config.zmq_bind),
        zmq_connect=tuple(config.zmq_connect),
        topic_filter=config.topic_filter,
        dp_port_stride=config.dp_port_stride,
        replay_endpoints=dict(config.replay_endpoints),
        replay_timeout_s=config.replay_timeout_s,
        repair_interval_s=config.repair_interval_s,
        max_engines=config.max_engines,
        accept_any_engine=config.accept_any_engine,
        allow_sources=tuple(config.allow_sources),
        seq_confirm_s=config.seq_confirm_s,
        sync=sync_config(config),
        copy_ttl_s=config.copy_ttl_s,
        curve=load_curve(
            config.zmq_curve_cert, config.zmq_curve_clients, config.zmq_curve_server_key
        ),
    )


def discovery_sources(config: ServiceConfig) -> list[EngineDiscovery]:
    """Static entries, the engines file (validated now: a bad file fails startup) and
    Kubernetes, in that order (later sources win for the same endpoint)."""
    sources: list[EngineDiscovery] = []
    if config.engines:
        sources.append(StaticDiscovery(config.engines))
    if config.engines_file:
        file_source = FileDiscovery(config.engines_file, config.engines_file_interval_s)
        file_source.load_now()
        sources.append(file_source)
    if config.kubernetes is not None:
        from kvindex.discovery_k8s import KubernetesDiscovery

        sources.append(KubernetesDiscovery.from_config(config.kubernetes))
    return sources


class IndexService:
    """One kvindex service process. ``await start()`` / ``await stop()``."""

    def __init__(
        self,
        config: ServiceConfig,
        index: BlockIndex | None = None,
        discovery: list[EngineDiscovery] | None = None,
    ) -> None:
        self.config = config
        self.metrics = KvindexMetrics()
        registry = self.metrics.registry
        if index is not None:
            self.index = wrap_index(index, registry=registry)
        else:
            try:
                self.index = make_index(index_config(config), registry=registry)
            except IndexConfigError as exc:
                flag = _INDEX_FLAGS.get(exc.field, exc.field)
                raise ConfigError(f"{flag} {exc.value!r}: {exc.detail}") from exc
        self.ingest = IngestService(
            ingest_service_config(config), self.index, ingest_config(config), self.metrics
        )
        sources = discovery_sources(config) if discovery is None else discovery
        self.discovery = DiscoveryHub(sources, self.ingest.update_engines, self._discovery_error)
        if sources:
            self.ingest.expect_discovery()
        self.http_app = web.Application()
        self.http_app.router.add_get("/metrics", self._metrics)
        self.http_app.router.add_get("/healthz", self._healthz)
        self.http_app.router.add_get("/readyz", self._readyz)
        self.grpc_servicers: list[GrpcInstaller] = []
        self._readiness: dict[str, ReadinessCheck] = {
            "ingest": self.ingest.readiness,
            "index": self.index.health,
        }
        self._runner: web.AppRunner | None = None
        self._grpc_server: Any = None
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self.zmq_bound: list[str] = []

    # -- extension points --------------------------------------------------------------------

    def add_routes(self, installer: RouteInstaller) -> None:
        if self._runner is not None:
            raise RuntimeError("add_routes must be called before start()")
        installer(self.http_app, self)

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        self._readiness[name] = check

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind everything, then start ingest and discovery. Raises zmq.ZMQError (ZMQ bind)
        or OSError (HTTP/gRPC port) for the caller to report."""
        self.zmq_bound = self.ingest.open()
        try:
            self._runner = web.AppRunner(self.http_app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.config.http_host, self.config.http_port)
            await site.start()
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            self.http_port = sockets[0].getsockname()[1] if sockets else self.config.http_port
            if self.grpc_servicers and self.config.grpc_port is not None:
                await self._start_grpc()
        except BaseException:
            await self.stop()
            raise
        self.ingest.start()
        self.discovery.start()
        log.info(
            "event=service_started http_port=%s grpc_port=%s zmq_bind=%s zmq_connect=%s",
            self.http_port,
            self.grpc_port,
            ",".join(self.zmq_bound),
            ",".join(self.config.zmq_connect),
        )

    async def _start_grpc(self) -> None:
        import grpc

        # No SO_REUSEPORT: a second process on the same port must fail, not share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        for installer in self.grpc_servicers:
            installer(server, self)
        address = f"{self.config.http_host}:{self.config.grpc_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:  # newer grpcio raises instead of returning 0
            port = 0
        if port == 0:
            await server.stop(None)
            raise OSError(errno.EADDRINUSE, f"gRPC port {self.config.grpc_port} is in use")
        await server.start()
        self._grpc_server = server
        self.grpc_port = port

    async def stop(self) -> None:
        self.discovery.stop()
        self.ingest.stop()
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=1.0)
            self._grpc_server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers ----------------------------------------------------------------------------

    def _discovery_error(self, source: str, message: str) -> None:
        self.metrics.discovery_errors.labels(source).inc()
        log.warning("event=discovery_error source=%s error=%r", source, message)

    async def _metrics(self, request: web.Request) -> web.Response:
        # Off the loop: collectors may do I/O (the Redis backend's stats and health).
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def readiness(self) -> dict[str, str]:
        """Failing checks: name -> reason (empty when ready)."""
        failing: dict[str, str] = {}
        for name, check in self._readiness.items():
            try:
                reason = check()
            except Exception as exc:  # a broken check is a failing check
                reason = f"check failed: {exc}"
            if reason is not None:
                failing[name] = reason
        return failing

    async def _readyz(self, request: web.Request) -> web.Response:
        failing = await asyncio.to_thread(self.readiness)  # checks may do I/O (Redis PING)
        # Engines not in sync: their entries are withheld from scores (or down-weighted), so
        # the service stays ready; the detail says which and why (kvindex.sync).
        engines = self.ingest.sync_summary()
        if failing:
            return web.Response(
                status=503,
                text=json.dumps({"ready": False, "failing": failing, "engines": engines}) + "\n",
                content_type="application/json",
            )
        return web.Response(
            text=json.dumps({"ready": True, "engines": engines}) + "\n",
            content_type="application/json",
        )
