"""`kvindex serve`: run the index service: ZMQ ingest and discovery into the index (memory or
Redis), tokenizers, the score APIs over HTTP (/v1/score, /v1/speculative, /v1/debug next to
/metrics, /healthz, /readyz) and gRPC (kvindex.v1, llm-d indexer.v1, grpc.health.v1).

Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM), 2 for a configuration problem (bad
config file or flag, port in use, a tokenizer that cannot be loaded) with a message naming
the fix."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import signal
import sys
from typing import Any

import zmq

from kvindex.config import (
    DEFAULT_HTTP_PORT,
    ConfigError,
    ServiceConfig,
    load_config,
    parse_pairs,
    parse_replay_flags,
    parse_tier_weights,
)
from kvindex.discovery import EnginesFileError
from kvindex.engines import DEFAULT_KV_EVENTS_PORT, DEFAULT_MAX_ENGINES
from kvindex.keys import DEFAULT_BLOCK_SIZE
from kvindex.service.logs import configure_logging
from kvindex.tokenize.local import default_to_calling_thread

EXIT_CONFIG = 2


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    """The service flags (shared with any command that embeds the service). Every default is
    None so that only flags actually given override the config file."""
    add = parser.add_argument
    add("--config", metavar="FILE", help="YAML or JSON config file (flags override it)")
    add(
        "--zmq-bind",
        action="append",
        metavar="ENDPOINT",
        help="bind a SUB socket that engines connect to, e.g. tcp://*:5557 (repeatable)",
    )
    add(
        "--zmq-connect",
        action="append",
        metavar="ENDPOINT",
        help="connect a SUB socket to an engine's PUB endpoint (repeatable)",
    )
    add("--engines-file", metavar="FILE", help="watched YAML/JSON list of engines")
    add(
        "--replay-endpoint",
        action="append",
        metavar="ENGINE=URL",
        help="replay ROUTER of an engine, e.g. 10.0.0.1:8000=tcp://10.0.0.1:5558 (repeatable)",
    )
    add("--topic-filter", help="SUB topic prefix (default kv@)")
    add("--dp-port-stride", type=int, help="port step between DP ranks (default 1; 0: same)")
    add(
        "--accept-any-engine",
        action="store_true",
        default=None,
        help="accept events on --zmq-bind from any topic, not only from engines discovery "
        "names (anyone who reaches the port can then add engines; docs/security.md)",
    )
    add(
        "--api-token-file",
        metavar="FILE",
        help="bearer token required by /v1/speculative, /v1/debug and gRPC RecordSpeculative "
        "(e.g. a mounted Secret; default: open)",
    )
    add(
        "--zmq-curve-cert",
        metavar="FILE",
        help="ZMQ CURVE: this index's certificate (NAME.key_secret); bind sockets become "
        "CURVE servers (docs/security.md)",
    )
    add(
        "--zmq-curve-clients",
        metavar="DIR",
        help="ZMQ CURVE: directory of admitted client public keys (*.key)",
    )
    add(
        "--zmq-curve-server-key",
        metavar="FILE",
        help="ZMQ CURVE: the engines' public key, for connect and replay sockets",
    )
    add(
        "--zmq-allow-source",
        action="append",
        metavar="CIDR",
        help="network whose hosts may publish for any discovered engine on --zmq-bind "
        "(repeatable; default: each engine only from its own address)",
    )
    add(
        "--max-engines",
        type=int,
        help=f"engines tracked at once; events of a new one beyond are dropped and counted "
        f"(default {DEFAULT_MAX_ENGINES})",
    )
    add(
        "--block-size",
        type=int,
        help=f"canonical block size in tokens (default {DEFAULT_BLOCK_SIZE})",
    )
    add("--default-model", help="model of engines whose topic names none")
    add(
        "--index-groups",
        action="append",
        metavar="KIND",
        help="KV-cache group kinds to index (default full_attention; repeatable)",
    )
    add(
        "--backend",
        help="index backend: memory (default: the C core when built, else pure Python), native, "
        "python or redis",
    )
    add("--redis-url", metavar="URL", help="Redis of --backend redis (redis://host:port/db)")
    add("--redis-prefix", metavar="PREFIX", help="key prefix shared by replicas (default kvi)")
    add("--redis-ttl", type=int, metavar="SECONDS", help="holder key TTL (default 3600; 0: none)")
    add(
        "--redis-groups",
        type=int,
        metavar="N",
        help="engine groups spread over Redis Cluster shards (default 1; docs/redis.md)",
    )
    add(
        "--redis-writers",
        choices=("all", "leased"),
        help="all: every replica writes every engine (default); leased: one writer per engine",
    )
    add("--redis-lease-ttl", type=float, metavar="SECONDS", help="engine lease TTL (default 10)")
    add(
        "--redis-write-queue",
        type=int,
        metavar="N",
        help="batches queued for pipelined Redis writes (default 0: synchronous writes)",
    )
    add(
        "--tokenizer",
        action="append",
        metavar="MODEL=PATH_OR_ID",
        help="tokenizer of a model for prompt/chat scoring (repeatable)",
    )
    add(
        "--lora",
        action="append",
        metavar="ADAPTER=BASE",
        help="a LoRA adapter name and its base model (repeatable)",
    )
    add(
        "--tier-weight",
        action="append",
        metavar="TIER=W[,...]",
        help="score weight per cache tier, e.g. gpu=1.0,cpu=0.8,storage=0.5",
    )
    add("--max-prompt-tokens", type=int, help="longer prompts are refused with 413")
    add(
        "--speculative-ttl",
        type=float,
        metavar="SECONDS",
        help="lifetime of speculative entries (default 2; 0: off)",
    )
    add("--index-max-keys", type=int, help="capacity bound in (key, tier) slots")
    add(
        "--index-memory-budget",
        metavar="SIZE",
        help="memory bound of the in-memory index, e.g. 4GiB (default 1GiB)",
    )
    add(
        "--unsynced-scores",
        choices=("withhold", "downweight"),
        help="entries of engines not in sync (unsynced, replaying): withhold (default) or "
        "down-weight by --unsynced-weight",
    )
    add("--unsynced-weight", type=float, metavar="F", help="down-weight factor (default 0.5)")
    add(
        "--engine-stale-after",
        type=float,
        metavar="SECONDS",
        help="an engine silent this long is probed by replay, or withheld (default 30)",
    )
    add(
        "--engine-drop-after",
        type=float,
        metavar="SECONDS",
        help="an engine silent this long has its entries dropped (default 300)",
    )
    add(
        "--degraded-for",
        type=float,
        metavar="SECONDS",
        help="how long an unrepairable loss is reported as degraded (default 300)",
    )
    add("--http-host", help="HTTP listen address (default 0.0.0.0)")
    add(
        "--http-port",
        type=int,
        help=f"HTTP port of the score API and /metrics (default {DEFAULT_HTTP_PORT})",
    )
    add("--grpc-port", type=int, help="gRPC port of the score API (default: no gRPC)")
    add("--k8s-selector", metavar="LABELS", help="discover engine pods by label selector")
    add("--k8s-namespace", help="namespace of the engine pods (default default)")
    add("--k8s-serving-port", type=int, help="engine serving port (default 8000)")
    add(
        "--k8s-socket-port",
        type=int,
        help=f"engine ZMQ PUB port to connect to (default {DEFAULT_KV_EVENTS_PORT}; 0: do not "
        "connect, the engines connect to --zmq-bind)",
    )
    add("--k8s-replay-port", type=int, help="engine replay ROUTER port (default none)")
    add("--log-level", help="debug, info, warning, error (default info)")
    add("--log-format", choices=["text", "json"], help="key=value text or JSON lines")


_K8S_FLAGS = {
    "k8s_selector": "label_selector",
    "k8s_namespace": "namespace",
    "k8s_serving_port": "serving_port",
    "k8s_socket_port": "socket_port",
    "k8s_replay_port": "replay_port",
}


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "zmq_bind",
            "zmq_connect",
            "engines_file",
            "topic_filter",
            "dp_port_stride",
            "max_engines",
            "accept_any_engine",
            "api_token_file",
            "zmq_curve_cert",
            "zmq_curve_clients",
            "zmq_curve_server_key",
            "block_size",
            "default_model",
            "index_groups",
            "backend",
            "index_max_keys",
            "index_memory_budget",
            "http_host",
            "http_port",
            "grpc_port",
            "log_level",
            "log_format",
            "redis_url",
            "redis_prefix",
            "max_prompt_tokens",
        )
    }
    overrides["allow_sources"] = args.zmq_allow_source
    overrides["unsynced_scores"] = args.unsynced_scores
    overrides["unsynced_weight"] = args.unsynced_weight
    overrides["engine_stale_after_s"] = args.engine_stale_after
    overrides["engine_drop_after_s"] = args.engine_drop_after
    overrides["degraded_for_s"] = args.degraded_for
    overrides["redis_ttl_s"] = args.redis_ttl
    overrides["redis_groups"] = args.redis_groups
    overrides["redis_writers"] = args.redis_writers
    overrides["redis_lease_ttl_s"] = args.redis_lease_ttl
    overrides["redis_write_queue"] = args.redis_write_queue
    overrides["speculative_ttl_s"] = args.speculative_ttl
    overrides["replay_endpoints"] = parse_replay_flags(args.replay_endpoint)
    overrides["tokenizers"] = parse_pairs(args.tokenizer, "--tokenizer", "my-model=/models/m")
    overrides["lora_adapters"] = parse_pairs(args.lora, "--lora", "my-adapter=my-model")
    overrides["tier_weights"] = parse_tier_weights(args.tier_weight)
    k8s = {field: getattr(args, flag) for flag, field in _K8S_FLAGS.items()}
    if any(v is not None for v in k8s.values()):
        if k8s["label_selector"] is None:
            raise ConfigError("--k8s-* flags need --k8s-selector LABELS")
        overrides["kubernetes"] = {k: v for k, v in k8s.items() if v is not None}
    return load_config(args.config, overrides)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the index service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_service_flags(parser)
    parser.set_defaults(func=run)


def fail(message: str) -> int:
    print(f"kvindex serve: {message}", file=sys.stderr)
    return EXIT_CONFIG


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        return fail(str(exc))
    configure_logging(config.log_level, config.log_format)
    default_to_calling_thread()
    try:
        return asyncio.run(serve(config))
    except ConfigError as exc:
        return fail(str(exc))


async def serve(config: ServiceConfig) -> int:
    from kvindex.service.assembly import AssemblyError, build_service

    try:
        service = build_service(config)
    except AssemblyError as exc:
        return fail(str(exc))
    except (EnginesFileError, OSError, ValueError) as exc:
        return fail(
            f"{exc} (fix the file or --engines-file)"
            if isinstance(exc, EnginesFileError | OSError)
            else str(exc)
        )
    try:
        await service.start()
    except zmq.ZMQError as exc:
        await service.stop()
        hint = "choose another endpoint with --zmq-bind"
        if exc.errno == zmq.EADDRINUSE:
            return fail(f"ZMQ endpoint {_bind_target(config)} is in use: {hint}")
        return fail(f"cannot open ZMQ sockets ({exc}): check --zmq-bind / --zmq-connect")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            if config.grpc_port is not None and "gRPC" in str(exc):
                return fail(f"gRPC port {config.grpc_port} is in use: change it with --grpc-port")
            return fail(f"HTTP port {config.http_port} is in use: change it with --http-port")
        return fail(f"cannot listen on {config.http_host}:{config.http_port}: {exc.strerror}")
    # What start-up built (modules, tokenizers, templates) lives as long as the process:
    # moved out of the collector's generations, full collections no longer walk it.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await service.stop()
    return 0


def _bind_target(config: ServiceConfig) -> str:
    return ", ".join(config.zmq_bind) or "(none)"
