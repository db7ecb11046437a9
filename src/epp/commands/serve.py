"""`epp serve`: run the endpoint picker (ext_proc gRPC, health, metrics) until SIGTERM/SIGINT,
then drain: stop accepting streams, finish in-flight ones, exit 0."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from epp import framework
from epp.commands import upstream_flags
from epp.metrics import PrometheusFlowControlObserver, PrometheusObserver
from epp.plugins import default_registry
from epp.plugins.flow_control import FLOW_CONTROL_OBSERVER
from epp.plugins.precise_prefix import (
    PREFIX_BACKEND_FACTORY,
    PrecisePrefixParams,
    PrefixBackendFactory,
    PrefixIndexBackend,
)
from epp.server import EXTPROC_SERVERS, PickerDeps, PickerServer, SchedulerFactory, ServeConfig
from epp.types import Endpoint, Scheduler
from kvindex.tokenize.local import default_to_calling_thread

log = logging.getLogger("epp.serve")

_DEFAULTS = ServeConfig()  # the flags' defaults are ServeConfig's, written there only


def prefix_backend_factory(deps: PickerDeps) -> PrefixBackendFactory:
    """The precise-prefix-cache-scorer's index: kvindex in this process (its metrics on the
    picker's registry; with `discoverPods`, fed the endpoints the picker knows) or a kvindex
    sidecar over gRPC (`indexerConfig.remoteIndex`)."""

    def subscribe(callback: Callable[[Sequence[Endpoint]], None]) -> None:
        deps.datastore.on_change(lambda: callback(deps.datastore.endpoints()))
        callback(deps.datastore.endpoints())

    def build(params: PrecisePrefixParams) -> PrefixIndexBackend:
        from epp.precise import build_backend

        return build_backend(params, registry=deps.metrics.registry, subscribe_endpoints=subscribe)

    return build


def framework_scheduler(config_path: str | None, deps: PickerDeps) -> Scheduler:
    """The scheduling framework from an EndpointPickerConfig file (its defaults without one),
    reporting plugin timings and latency predictions to the picker's metrics."""
    try:
        config = framework.load_config(config_path, default_registry(), strict=deps.strict_config)
        log.info("scheduler config: %s", framework.describe_config(config).replace(chr(10), "; "))
        for unknown in config.unknown_parameters:
            deps.metrics.config_unknown_parameters.labels(
                plugin_type=unknown.plugin_type, parameter=unknown.parameter
            ).inc()
        for section in config.inactive_sections:
            # Parsed and validated, kept on the config, not acted on (as llm-d without the gate).
            log.warning(
                "config section %r is parsed and validated but not acted on: its feature "
                "gate is off (featureGates: [%s]), as llm-d ignores it",
                section,
                section,
            )
        return framework.build_scheduler(
            config,
            framework.SchedulerDeps(
                observer=PrometheusObserver(deps.metrics),
                extras={
                    PREFIX_BACKEND_FACTORY: prefix_backend_factory(deps),
                    FLOW_CONTROL_OBSERVER: PrometheusFlowControlObserver(deps.metrics),
                },
            ),
        )
    except framework.ConfigError as exc:
        raise SystemExit(f"epp serve: --config: {exc}") from None


# The one place `epp serve` gets its scheduler; tests and embedders pass their own.
SCHEDULER_FACTORY: SchedulerFactory = framework_scheduler


def _key_values(items: list[str], flag: str, convert: type = str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"epp serve: {flag} expects NAME=VALUE, got {item!r}")
        try:
            out[key] = convert(value)
        except ValueError:
            raise SystemExit(
                f"epp serve: {flag} {item!r}: value must be {convert.__name__}"
            ) from None
    return out


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the ext_proc endpoint picker",
        description="Serve envoy.service.ext_proc.v3.ExternalProcessor for Envoy (or any "
        "gateway speaking the endpoint picker protocol).",
    )
    p.add_argument("--config", help="EndpointPickerConfig YAML (default: built-in profile)")
    p.add_argument(
        "--strict-config",
        action="store_true",
        help="fail on plugin parameters a plugin type does not read (llm-d ignores them; "
        "by default they are logged once and counted)",
    )
    p.add_argument("--host", default=_DEFAULTS.host, help="listen address (default %(default)s)")
    p.add_argument(
        "--grpc-port", type=int, default=_DEFAULTS.grpc_port, help="ext_proc port (%(default)s)"
    )
    p.add_argument(
        "--health-port",
        "--grpc-health-port",
        type=int,
        default=_DEFAULTS.health_port,
        help="gRPC health port (%(default)s)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_DEFAULTS.metrics_port,
        help="Prometheus port (%(default)s)",
    )
    p.add_argument(
        "--secure-serving",
        nargs="?",
        const=True,
        default=True,
        type=upstream_flags.go_bool,
        help="TLS on the ext_proc port (default on; self-signed unless --cert-path/--key-path; "
        "--secure-serving=false or --no-secure-serving turns it off)",
    )
    p.add_argument("--no-secure-serving", dest="secure_serving", action="store_false")
    p.add_argument(
        "--extproc-server",
        choices=EXTPROC_SERVERS,
        default="h2",
        help="what serves the ext_proc and health ports: h2, the picker's own HTTP/2 gRPC "
        "edge (default; a third of the CPU per stream), or grpcio, grpc.aio's servers",
    )
    p.add_argument(
        "--cert-path",
        help="PEM certificate for the ext_proc port, or (llm-d) a directory with tls.crt and "
        "tls.key",
    )
    p.add_argument("--key-path", help="PEM private key for the ext_proc port")
    p.add_argument("--endpoints", help="static endpoints: ip:port,ip:port,...")
    p.add_argument("--endpoints-file", help="YAML/JSON endpoints file, watched for changes")
    p.add_argument("--pool-name", help="InferencePool to watch (Kubernetes)")
    p.add_argument(
        "--pool-namespace",
        help="InferencePool namespace (default: $NAMESPACE, else default)",
    )
    p.add_argument(
        "--metrics-interval",
        type=float,
        default=_DEFAULTS.metrics_interval_s,
        help="engine /metrics scrape tick in seconds (%(default)s)",
    )
    p.add_argument(
        "--metrics-idle-interval",
        type=float,
        default=_DEFAULTS.metrics_idle_interval_s,
        help="engine /metrics scrape tick in seconds while the picker has no traffic "
        "(%(default)s; a value not above --metrics-interval turns this off)",
    )
    p.add_argument(
        "--metrics-timeout",
        type=float,
        default=_DEFAULTS.metrics_timeout_s,
        help="per-scrape timeout in seconds (%(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=_DEFAULTS.max_body_bytes,
        help=f"largest request body accepted, else 413 ({_DEFAULTS.max_body_bytes >> 20} MiB)",
    )
    p.add_argument(
        "--destination-header",
        choices=("list", "primary"),
        default="list",
        help="x-gateway-destination-endpoint carries pick + fallbacks (list, the protocol) "
        "or only the pick (primary: for Envoy ORIGINAL_DST clusters, which parse one "
        "address); dynamic metadata always carries the list",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=_DEFAULTS.drain_timeout_s,
        help="seconds to finish streams on SIGTERM (%(default)s)",
    )
    p.add_argument(
        "--lora-adapter",
        action="append",
        default=[],
        metavar="ADAPTER=BASE",
        help="a LoRA adapter name and the base model serving it (repeatable)",
    )
    p.add_argument(
        "--objective",
        action="append",
        default=[],
        metavar="NAME=PRIORITY",
        help="InferenceObjective priority for header x-gateway-inference-objective "
        "(repeatable; negative = sheddable)",
    )
    p.add_argument(
        "--objects-file",
        help="YAML file of InferenceObjective / InferenceModelRewrite objects (the CRDs' "
        "shapes), watched for changes; for runs without Kubernetes",
    )
    p.add_argument(
        "--flow-control-in-flight-eviction",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.flow_control_in_flight_eviction,
        help="with flow control, evict a scheduled sheddable request (429 evicted; Envoy "
        "resets the engine's request) when a higher-priority request waits for room "
        "(default on; llm-d tracks such requests but never evicts them)",
    )
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    upstream_flags.add_upstream_flags(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    upstream = upstream_flags.resolve(args)
    if not (args.endpoints or args.endpoints_file or args.pool_name):
        raise SystemExit(
            "epp serve: no endpoint source: give --endpoints, --endpoints-file or --pool-name"
        )
    if args.max_body_bytes <= 0:
        raise SystemExit("epp serve: --max-body-bytes must be positive")
    metrics_interval = upstream.metrics_interval_s or args.metrics_interval
    if metrics_interval <= 0:
        raise SystemExit("epp serve: --metrics-interval must be positive")
    cert_path, key_path = upstream_flags.tls_files(args.cert_path, args.key_path)
    return ServeConfig(
        host=args.host,
        grpc_port=args.grpc_port,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        secure_serving=args.secure_serving,
        cert_path=cert_path,
        key_path=key_path,
        endpoints=args.endpoints,
        endpoints_file=args.endpoints_file,
        pool_name=args.pool_name,
        pool_namespace=upstream.pool_namespace,
        metrics_interval_s=metrics_interval,
        metrics_timeout_s=args.metrics_timeout,
        metrics_idle_interval_s=args.metrics_idle_interval,
        max_body_bytes=args.max_body_bytes,
        drain_timeout_s=args.drain_timeout,
        header_primary_only=args.destination_header == "primary",
        extproc_server=args.extproc_server,
        adapters=_key_values(args.lora_adapter, "--lora-adapter"),
        objectives=_key_values(args.objective, "--objective", int),
        objects_file=args.objects_file,
        flow_control_in_flight_eviction=args.flow_control_in_flight_eviction,
    )


async def serve(
    config: ServeConfig,
    config_path: str | None,
    factory: SchedulerFactory,
    ready_line: bool = True,
    strict_config: bool = False,
) -> int:
    """Start, print the bound ports, wait for SIGTERM/SIGINT, drain."""
    from epp.endpoints import Datastore
    from epp.metrics import EppMetrics
    from epp.requests import ModelRegistry

    deps = PickerDeps(
        Datastore(), EppMetrics(), ModelRegistry(config.adapters), strict_config=strict_config
    )
    scheduler = factory(config_path, deps)
    server = PickerServer(
        config, scheduler, datastore=deps.datastore, metrics=deps.metrics, registry=deps.registry
    )
    try:
        await server.start()
    except Exception as exc:
        await server.close()
        raise SystemExit(f"epp serve: cannot start: {exc}") from None
    # What start-up built (modules, plugins, tokenizers, templates) lives as long as the
    # process: moved out of the collector's generations, a full collection no longer walks
    # it, and each request pays only for the objects it makes.
    gc.freeze()
    if ready_line:
        # One machine-readable line with the bound ports (useful with port 0).
        ports = " ".join(f"{name}={port}" for name, port in server.ports.items())
        print(f"epp serving {ports}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (up to %.0fs)", config.drain_timeout_s)
    await server.drain()
    log.info("stopped")
    return 0


def run(args: argparse.Namespace, factory: SchedulerFactory | None = None) -> int:
    upstream = upstream_flags.resolve(args)
    handler = logging.StreamHandler(sys.stderr)
    if upstream.json_logs:
        handler.setFormatter(upstream_flags.JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=upstream.log_level, handlers=[handler])
    default_to_calling_thread()
    config = config_from_args(args)
    for note in upstream.not_acted_on:
        log.warning("accepted but not acted on: %s", note)
    return asyncio.run(
        serve(
            config,
            upstream.config_source,
            factory or SCHEDULER_FACTORY,
            strict_config=args.strict_config,
        )
    )
