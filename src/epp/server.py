"""The running picker: ext_proc gRPC (TLS by default), gRPC health, Prometheus metrics,
endpoint sources and the engine-metrics scraper, started and drained together.

Ports: ext_proc 9002, health 9003 (plaintext, for kubelet gRPC probes), metrics 9090 by
default; 0 binds a free port (the bound ports are in `PickerServer.ports` after `start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from epp import extproc, tls
from epp.discovery.pool import PoolReconciler
from epp.endpoints import Datastore, EndpointsFileSource, parse_static
from epp.engine_metrics import (
    DEFAULT_IDLE_INTERVAL_S,
    DEFAULT_INTERVAL_S,
    DEFAULT_TIMEOUT_S,
    EngineMetricsScraper,
)
from epp.h2edge.server import H2ExtProcServer, server_ssl_context
from epp.metrics import EppMetrics
from epp.objects import ObjectsFileSource, ObjectStore, PoolRef, RewriteDecision
from epp.plugins.datalayer import apply_to_scraper
from epp.requests import ModelRegistry, RequestParser
from epp.types import Scheduler

log = logging.getLogger(__name__)

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
EXTPROC_SERVERS = ("h2", "grpcio")
# A second picker on the same port must fail to bind, not share it.
_GRPC_OPTIONS = [("grpc.so_reuseport", 0)]
LIVENESS = "liveness"
READINESS = "readiness"
CHART_PROBE_SERVICE = "inference-extension"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(slots=True)
class ServeConfig:
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    health_port: int = 9003
    metrics_port: int = 9090
    secure_serving: bool = True
    cert_path: str | None = None
    key_path: str | None = None
    endpoints: str | None = None  # static "ip:port,..."
    endpoints_file: str | None = None
    endpoints_file_interval_s: float = 1.0
    pool_name: str | None = None
    pool_namespace: str = "default"
    metrics_interval_s: float = DEFAULT_INTERVAL_S
    metrics_timeout_s: float = DEFAULT_TIMEOUT_S
    # Scrape interval while no ext_proc stream is open or opened for a second (nothing reads
    # engine metrics then); the first stream brings `metrics_interval_s` back at once. Not
    # above `metrics_interval_s`: always scrape at that interval.
    metrics_idle_interval_s: float = DEFAULT_IDLE_INTERVAL_S
    max_body_bytes: int = extproc.DEFAULT_MAX_BODY_BYTES
    drain_timeout_s: float = 30.0
    header_primary_only: bool = False  # see PickerContext.header_primary_only
    # "h2": the picker's own HTTP/2 gRPC edge (epp.h2edge); "grpcio": grpc.aio's server.
    extproc_server: str = "h2"
    adapters: Mapping[str, str] = field(default_factory=dict)  # LoRA adapter -> base model
    objectives: Mapping[str, int] = field(default_factory=dict)  # objective -> priority
    # YAML file of InferenceObjective / InferenceModelRewrite objects, watched (`--objects-file`).
    objects_file: str | None = None
    objects_file_interval_s: float = 1.0
    # Flow control may evict scheduled sheddable requests for waiting higher-priority ones
    # (h2 edge only; `--no-flow-control-in-flight-eviction` turns it off).
    flow_control_in_flight_eviction: bool = True


@dataclass(slots=True)
class PickerDeps:
    """What the edge shares with the scheduler it builds: the live endpoints, the picker's
    metrics (the framework's observer writes `plugin_duration` and latency series) and the
    model registry."""

    datastore: Datastore
    metrics: EppMetrics
    registry: ModelRegistry
    # `epp serve --strict-config`: unknown plugin parameters fail the load (llm-d ignores them).
    strict_config: bool = False


class PickerServer:
    """Owns every listener and background task of one picker process."""

    def __init__(
        self,
        config: ServeConfig,
        scheduler: Scheduler,
        datastore: Datastore | None = None,
        metrics: EppMetrics | None = None,
        registry: ModelRegistry | None = None,
        kubernetes_api_client: Any = None,
    ) -> None:
        self.config = config
        self.scheduler = scheduler
        self.datastore = datastore or Datastore()
        self.metrics = metrics or EppMetrics()
        self.registry = registry or ModelRegistry(config.adapters)
        self.metrics.bind_pool(self.datastore.endpoints)
        # InferenceObjectives and InferenceModelRewrites (flag, file, Kubernetes) for our pool.
        self.objects = ObjectStore(
            PoolRef(config.pool_name, "") if config.pool_name else None,
            on_rewrite=self._count_rewrite,
        )
        self.parser = RequestParser(self.registry, config.objectives, self.objects)
        self.parser.on_unknown_objective = self.metrics.unknown_objectives.inc
        self.context = extproc.PickerContext(
            scheduler=scheduler,
            endpoints=self.datastore.endpoints,
            parser=self.parser,
            metrics=self.metrics,
            max_body_bytes=config.max_body_bytes,
            header_primary_only=config.header_primary_only,
            response_body_needed=response_body_needed(scheduler),
            evictable=config.flow_control_in_flight_eviction,
        )
        self.health = health.aio.HealthServicer()
        self.ports: dict[str, int] = {}
        self.tls_certificate: bytes | None = None
        self._grpc: grpc.aio.Server | None = None
        self._h2: H2ExtProcServer | None = None
        self._health_status: dict[str, int] = {}
        self._health_grpc: grpc.aio.Server | None = None
        self._health_h2: H2ExtProcServer | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._expected_sources: set[str] = set()
        self._pool: PoolReconciler | None = None
        self._kubernetes_api_client = kubernetes_api_client
        self._watcher: Any = None
        self._objects_watcher: Any = None
        # One per objects source (file, Kubernetes): has it delivered its objects once?
        self._objects_synced: list[Callable[[], bool]] = []
        self._draining = False
        self._scheduler_started = False
        self.scraper = EngineMetricsScraper(
            self.datastore.endpoints,
            self.metrics,
            self.registry,
            interval_s=config.metrics_interval_s,
            timeout_s=config.metrics_timeout_s,
            idle_interval_s=config.metrics_idle_interval_s,
            busy=lambda: self.context.open_streams > 0,
        )
        self.context.on_stream_open = self.scraper.wake
        # A framework scheduler's metrics-data-source / core-metrics-extractor plugins say
        # where and how to scrape (one data layer: the scraper feeds every metric scorer).
        plugins = getattr(scheduler, "plugins", None)
        if isinstance(plugins, list):
            apply_to_scraper(plugins, self.scraper)

    # -- readiness ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The scheduler started, every configured endpoint source has reported once and
        every objects source (file, Kubernetes) has delivered its InferenceObjectives and
        InferenceModelRewrites once (before that a request would be served at priority 0,
        unrewritten), and we are not draining."""
        if self._draining or not self._scheduler_started:
            return False
        if self._pool is not None and not self._pool.synced:
            return False
        if not all(synced() for synced in self._objects_synced):
            return False
        return self._expected_sources <= self.datastore.sources_reported

    async def _publish_health(self) -> None:
        status = _SERVING if self.ready else _NOT_SERVING
        await self._set_health(READINESS, status)
        await self._set_health(EXTPROC_SERVICE, status)
        # llm-d's chart probes this name (one replica); llm-d answers it as readiness.
        await self._set_health(CHART_PROBE_SERVICE, status)

    def _republish_health(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to publish to
            asyncio.get_running_loop().create_task(self._publish_health())

    # -- start -------------------------------------------------------------------------

    async def _set_health(self, service: str, status: int) -> None:
        # Mirrored for the h2 edge, which answers Health on its ports itself.
        self._health_status[service] = status
        await self.health.set(service, status)  # type: ignore[arg-type]
        for server in (self._h2, self._health_h2):
            if server is not None:
                server.notify(service)

    def _tls_pair(self) -> tuple[bytes, bytes]:
        c = self.config
        if c.cert_path or c.key_path:
            if not (c.cert_path and c.key_path):
                raise ValueError("--cert-path and --key-path must be given together")
            cert, key = tls.load_certificate(c.cert_path, c.key_path)
        else:
            cert, key = tls.self_signed_certificate()
        self.tls_certificate = cert
        return cert, key

    async def _start_extproc(self) -> None:
        c = self.config
        if c.extproc_server not in EXTPROC_SERVERS:
            raise ValueError(
                f"unknown ext_proc server {c.extproc_server!r}; choose from {EXTPROC_SERVERS}"
            )
        if c.extproc_server == "h2":
            ssl_context = server_ssl_context(*self._tls_pair()) if c.secure_serving else None
            self._h2 = H2ExtProcServer(self.context, self._health_status.get, ssl_context)
            self.ports["grpc"] = await self._h2.bind(c.host, c.grpc_port)
            return
        self._grpc = grpc.aio.server(options=_GRPC_OPTIONS)
        extproc.add_to_server(self._grpc, self.context)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        address = f"{c.host}:{c.grpc_port}"
        if c.secure_serving:
            cert, key = self._tls_pair()
            credentials = grpc.ssl_server_credentials([(key, cert)])
            self.ports["grpc"] = self._grpc.add_secure_port(address, credentials)
        else:
            self.ports["grpc"] = self._grpc.add_insecure_port(address)

    async def start(self) -> None:
        c = self.config
        self._start_sources()
        self.datastore.on_change(self._republish_health)
        self.objects.on_change(self._republish_health)

        await self._start_extproc()

        if c.extproc_server == "h2":
            # The same edge serves the health port (Check and Watch, plaintext as kubelet
            # probes it): no grpcio server runs in the picker.
            self._health_h2 = H2ExtProcServer(
                self.context, self._health_status.get, serve_process=False, port_name="health"
            )
            self.ports["health"] = await self._health_h2.bind(c.host, c.health_port)
        else:
            self._health_grpc = grpc.aio.server(options=_GRPC_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
            self.ports["health"] = self._health_grpc.add_insecure_port(f"{c.host}:{c.health_port}")

        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, c.host, c.metrics_port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.ports["metrics"] = sockets[0].getsockname()[1] if sockets else c.metrics_port

        await _lifecycle(self.scheduler, "start")
        self._scheduler_started = True
        await self._set_health(LIVENESS, _SERVING)
        await self._set_health("", _SERVING)
        await self._publish_health()
        if self._grpc is not None:
            await self._grpc.start()
        if self._h2 is not None:
            await self._h2.start_serving()
        if self._health_grpc is not None:
            await self._health_grpc.start()
        if self._health_h2 is not None:
            await self._health_h2.start_serving()
        self._tasks.append(asyncio.create_task(self.scraper.run(), name="engine-metrics"))
        log.info(
            "response bodies: %s",
            "read (a plugin needs the first byte's time or the token usage; Envoy: "
            "response_body_mode STREAMED or FULL_DUPLEX_STREAMED)"
            if self.context.response_body_needed
            else "not needed by any plugin (Envoy: response_body_mode NONE with "
            "response_trailer_mode SEND passes no response chunk through the picker)",
        )
        log.info(
            "epp listening: ext_proc %s:%d (%s), health %d, metrics %d",
            c.host,
            self.ports["grpc"],
            "TLS" if c.secure_serving else "plaintext",
            self.ports["health"],
            self.ports["metrics"],
        )

    def _count_rewrite(self, decision: RewriteDecision) -> None:
        self.metrics.model_rewrite_decisions.labels(
            decision.rewrite, decision.model, decision.target
        ).inc()

    def _start_objects(self, api_client: Any) -> None:
        c = self.config
        if c.objects_file:
            source = ObjectsFileSource(
                c.objects_file,
                self.objects,
                lambda: self.metrics.objects_source_errors.labels(source="file").inc(),
                c.objects_file_interval_s,
            )
            self._objects_synced.append(lambda: source.synced)
            if not source.poll():
                log.error(
                    "objects file %s not loaded: not ready until it is (%s)",
                    c.objects_file,
                    source.file.last_error,
                )
            self._tasks.append(asyncio.create_task(source.run(), name="objects-file"))
        if api_client is not None:
            from epp.discovery.objects_watch import KubernetesObjectsWatcher

            self._objects_watcher = KubernetesObjectsWatcher(
                c.pool_namespace,
                api_client,
                on_error=lambda what: self.metrics.objects_source_errors.labels(
                    source=f"kubernetes-{what}"
                ).inc(),
            )
            watcher = self._objects_watcher
            self._objects_synced.append(lambda: bool(watcher.synced))
            self._objects_watcher.start(asyncio.get_running_loop(), self.objects)

    def _start_sources(self) -> None:
        c = self.config
        api_client: Any = None
        if c.endpoints is not None:
            self._expected_sources.add("static")
            self.datastore.replace("static", parse_static(c.endpoints))
        if c.endpoints_file:
            self._expected_sources.add(EndpointsFileSource.SOURCE)
            source = EndpointsFileSource(
                c.endpoints_file, self.datastore, self.metrics, c.endpoints_file_interval_s
            )
            source.poll()
            self._tasks.append(asyncio.create_task(source.run(), name="endpoints-file"))
        if c.pool_name:
            from epp.discovery.kubernetes import KubernetesPoolWatcher, load_kube_config

            self._pool = PoolReconciler(self.datastore, self.metrics)
            self._expected_sources.add(PoolReconciler.SOURCE)
            api_client = self._kubernetes_api_client or load_kube_config()
            self._watcher = KubernetesPoolWatcher(
                c.pool_namespace,
                c.pool_name,
                api_client,
                on_error=lambda what: self.metrics.endpoint_source_errors.labels(
                    source=f"kubernetes-{what}"
                ).inc(),
            )
            self._watcher.start(asyncio.get_running_loop(), self._pool.apply)
        self._start_objects(api_client)

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    # -- stop --------------------------------------------------------------------------

    async def drain(self, grace_s: float | None = None) -> None:
        """Graceful stop: report NOT_SERVING, refuse new streams, let in-flight streams
        finish (up to `grace_s`, default drain_timeout_s), then stop everything."""
        grace = self.config.drain_timeout_s if grace_s is None else grace_s
        self._draining = True
        await self._publish_health()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._h2 is not None:
            await self._h2.drain(grace)
        if self._health_h2 is not None:
            await self._health_h2.drain(0.0)  # Watch streams heard NOT_SERVING; now they end
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._watcher is not None:
            self._watcher.stop()
        if self._objects_watcher is not None:
            self._objects_watcher.stop()
        if self._grpc is not None:
            await self._grpc.stop(None)
        if self._h2 is not None:
            await self._h2.stop()
        if self._health_grpc is not None:
            await self._health_grpc.stop(None)
        if self._health_h2 is not None:
            await self._health_h2.stop()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._scheduler_started:
            self._scheduler_started = False
            await _lifecycle(self.scheduler, "stop")


def response_body_needed(scheduler: Scheduler) -> bool:
    """Whether any response plugin of the scheduler reads response bodies (the first byte's
    time, the token usage: `ResponseComplete.response_data == "body"`). A scheduler that is
    not the framework's is assumed to. When none does, Envoy's ext_proc filter can run with
    `response_body_mode: NONE` (and `response_trailer_mode: SEND`): no response chunk
    passes through the picker."""
    from epp.framework.plugin import ResponseComplete

    plugins = getattr(scheduler, "plugins", None)
    if not isinstance(plugins, list):
        return True
    return any(isinstance(p, ResponseComplete) and p.response_data != "end" for p in plugins)


async def _lifecycle(scheduler: Scheduler, method: str) -> None:
    """Schedulers with background work (the framework's `start`/`stop`, e.g. a KV-event
    subscriber) get them called; the `Scheduler` protocol itself does not require them."""
    hook = getattr(scheduler, method, None)
    if callable(hook):
        result = hook()
        if asyncio.iscoroutine(result):
            await result


# (EndpointPickerConfig path or None, edge resources) -> the scheduler `epp serve` runs.
SchedulerFactory = Callable[[str | None, PickerDeps], Scheduler]
