"""Configuration of the kvindex service: one loader for a YAML/JSON file and CLI flags.

Precedence: defaults < config file (``--config FILE``) < flags. List-valued flags
(``--zmq-bind``, ``--zmq-connect``, ``--index-groups``) replace the file's list when given;
``--replay-endpoint ENGINE=URL`` entries are merged over the file's ``replay_endpoints``.
File keys are the field names below (``-`` and ``_`` both accepted). Unknown keys are errors
(a typo would otherwise silently keep a default); errors name the file, line and field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from kvindex.curve import load_curve
from kvindex.discovery import EngineEntry
from kvindex.engines import DEFAULT_KV_EVENTS_PORT, DEFAULT_MAX_ENGINES, MAX_ENGINES_LIMIT
from kvindex.errors import ConfigError
from kvindex.keys import DEFAULT_BLOCK_SIZE
from kvindex.sources import parse_networks
from kvindex.sync import SyncConfig

__all__ = [
    "DEFAULT_HTTP_PORT",
    "ConfigError",
    "KubernetesConfig",
    "ServiceConfig",
    "load_config",
    "parse_pairs",
    "parse_replay_flags",
    "parse_size",
    "parse_tier_weights",
]


DEFAULT_HTTP_PORT = 8080  # the score API and /metrics


class KubernetesConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Pods by label selector; Ready, not terminating pods become engines."""

    label_selector: str
    namespace: str = "default"
    serving_port: int = 8000  # the port the picker routes to (endpoint = podIP:serving_port)
    # kvEventsConfig.podDiscoveryConfig.socketPort: the engines' PUB port (connect mode);
    # 0: do not connect (the engines' PUB sockets connect to --zmq-bind; discovery names the
    # engines whose topics the bind socket accepts).
    socket_port: int = DEFAULT_KV_EVENTS_PORT
    replay_port: int | None = None  # the engines' replay ROUTER port, if they run one
    model_label: str | None = None  # a pod label naming the served model


# The in-memory index's default memory bound (docs/index.md, "Memory"): about 17M entries with
# the C core, 3.3M in pure Python, before the oldest keys are evicted.
DEFAULT_INDEX_MEMORY_BUDGET = "1GiB"


class ServiceConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # ingest sockets
    zmq_bind: list[str] = msgspec.field(default_factory=list)
    zmq_connect: list[str] = msgspec.field(default_factory=list)
    topic_filter: str = "kv@"
    dp_port_stride: int = 1
    replay_endpoints: dict[str, str] = msgspec.field(default_factory=dict)
    replay_timeout_s: float = 2.0
    repair_interval_s: float = 30.0
    # a sequence break is believed after this long without a contradicting batch
    seq_confirm_s: float = 1.0
    # per-engine sync state (kvindex.sync, docs/ingest.md "Sync state"): what scores do with
    # the entries of engines not in sync, and when silent engines are withheld and dropped
    unsynced_scores: str = "withhold"  # or "downweight" (by unsynced_weight)
    unsynced_weight: float = 0.5
    engine_stale_after_s: float = 30.0
    engine_drop_after_s: float = 300.0
    degraded_for_s: float = 300.0
    # an extra physical copy of a block counts this long unless confirmed (docs/index.md)
    copy_ttl_s: float = 20.0
    # engines (topics) tracked at once; a new one beyond is refused and counted
    max_engines: int = DEFAULT_MAX_ENGINES
    # strict by default: events on a bind socket only from engines discovery names, each
    # published from its own address or from one of these networks (CIDR)
    accept_any_engine: bool = False
    allow_sources: list[str] = msgspec.field(default_factory=list)
    # a file holding the bearer token /v1/speculative, /v1/debug and gRPC RecordSpeculative
    # require (e.g. a mounted Kubernetes Secret); None: those calls are open
    api_token_file: str | None = None
    # ZMQ CURVE (kvindex.curve): this index's certificate (NAME.key_secret), the directory
    # of admitted client keys (*.key), the engines' server key for connect sockets
    zmq_curve_cert: str | None = None
    zmq_curve_clients: str | None = None
    zmq_curve_server_key: str | None = None
    # discovery
    engines_file: str | None = None
    engines_file_interval_s: float = 1.0
    engines: list[EngineEntry] = msgspec.field(default_factory=list)
    kubernetes: KubernetesConfig | None = None
    # ingest rules
    block_size: int = DEFAULT_BLOCK_SIZE
    default_model: str = ""
    index_groups: list[str] = msgspec.field(default_factory=lambda: ["full_attention"])
    # index
    backend: str = "memory"
    # --backend redis: more client options (cluster, socket_timeout, connect_timeout,
    # max_connections; kvindex.index.IndexConfig.redis_options)
    backend_options: dict[str, Any] = msgspec.field(default_factory=dict)
    index_max_keys: int = 100_000_000
    # bytes, or "4GiB", "512MB"; bounds the in-memory index (docs/index.md, "Memory")
    index_memory_budget: int | str | None = DEFAULT_INDEX_MEMORY_BUDGET
    # Redis backend (--backend redis): every replica writes, see docs/redis.md
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "kvi"
    redis_ttl_s: int | None = 3600  # holder bitmaps expire unless re-stored; None/0: never
    redis_backoff_max_s: float = 5.0  # longest wait between probes of a Redis that is down
    # Scale-out (docs/redis.md, "Sharding", "Writer model", "Writes"): engine groups spread
    # over cluster shards; all replicas write every engine, or one leased writer per engine;
    # batches queued and pipelined (0: one synchronous script per batch).
    redis_groups: int = 1
    redis_writers: str = "all"  # all | leased
    redis_lease_ttl_s: float = 10.0
    redis_write_queue: int = 0
    redis_pipeline: int = 128
    # tokenizers and scoring
    tokenizers: dict[str, str] = msgspec.field(default_factory=dict)  # model -> path / hub id
    lora_adapters: dict[str, str] = msgspec.field(default_factory=dict)  # adapter -> base
    tier_weights: dict[str, float] = msgspec.field(default_factory=dict)  # gpu, cpu, storage
    max_prompt_tokens: int = 1 << 20
    speculative_ttl_s: float = 2.0  # 0 disables speculative entries
    # serving
    http_host: str = "0.0.0.0"
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int | None = None
    log_level: str = "info"
    log_format: str = "text"

    def memory_budget_bytes(self) -> int | None:
        return None if self.index_memory_budget is None else parse_size(self.index_memory_budget)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Bytes from an int or ``"512MB"``, ``"4GiB"``, ``"1.5g"`` (``Ki/Mi/Gi/Ti``: powers of
    1024; ``k/M/G/T`` with or without ``B``: powers of 1000)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ConfigError(f"index_memory_budget: {value!r} is not a size (e.g. 4GiB, 512MB)")
    number, unit, binary = match.groups()
    base = 1024 if binary or unit == "" else 1000
    power = " kmgt".index(unit.lower() or " ")
    return int(float(number) * base**power)


# -- file loading with line numbers ------------------------------------------------------------


def _normalise_keys(data: Any) -> Any:
    if isinstance(data, dict):
        return {
            (k.replace("-", "_") if isinstance(k, str) else k): _normalise_keys(v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_normalise_keys(v) for v in data]
    return data


def _path_parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index in re.findall(r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]", path.removeprefix("$")):
        parts.append(int(index) if index else name)
    return parts


def _node_line(root: yaml.Node | None, parts: list[str | int]) -> int | None:
    node = root
    line = None if node is None else node.start_mark.line + 1
    for part in parts:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key, value in node.value:
                if str(key.value).replace("-", "_") == part:
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _describe(exc: msgspec.ValidationError, root: yaml.Node | None, origin: str) -> str:
    message = str(exc)
    text, _, path = message.rpartition(" - at `")
    if not text:
        text, path = message, "$"
    path = path.rstrip("`")
    parts = _path_parts(path)
    unknown = re.search(r"unknown field `([^`]+)`", text)
    if unknown:
        parts.append(unknown.group(1))
    line = _node_line(root, parts)
    where = f"{origin}:{line}" if line else origin
    field = ".".join(str(p) for p in parts) or "(top level)"
    return f"{where}: {field}: {text}"


def load_config_file(path: str | Path) -> tuple[dict[str, Any], yaml.Node | None]:
    origin = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read config file: {exc.strerror}") from exc
    try:
        if origin.endswith(".json"):
            data = json.loads(text)
            root = None
        else:
            data = yaml.safe_load(text)
            root = yaml.compose(text, Loader=yaml.SafeLoader)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{origin}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{origin}{line}: invalid YAML: {problem}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the config file must be a mapping of settings")
    return _normalise_keys(data), root


# Map-valued settings whose flag entries merge over the file's map (instead of replacing it).
MERGED_MAPS = frozenset({"replay_endpoints", "tokenizers", "lora_adapters", "tier_weights"})


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ServiceConfig:
    """Defaults, then the file at ``path``, then ``overrides`` (flag values; None = unset)."""
    data: dict[str, Any] = {}
    root: yaml.Node | None = None
    origin = "<flags>"
    if path is not None:
        data, root = load_config_file(path)
        origin = str(path)
        try:
            msgspec.convert(data, ServiceConfig)
        except msgspec.ValidationError as exc:
            raise ConfigError(_describe(exc, root, origin)) from exc
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name in MERGED_MAPS:
            merged = dict(data.get(name) or {})
            merged.update(value)
            data[name] = merged
        else:
            data[name] = value
    try:
        config = msgspec.convert(data, ServiceConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, None, "flags")) from exc
    _validate(config)
    return config


def read_token_file(path: str | Path, flag: str) -> str:
    """The token in ``path`` (surrounding whitespace dropped); ConfigError naming ``flag``
    when it cannot be read or is empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read the token: {exc}") from None
    if not token:
        raise ConfigError(f"{flag} {path}: the file is empty")
    return token


def _has_discovery(config: ServiceConfig) -> bool:
    return bool(config.engines or config.engines_file or config.kubernetes is not None)


def _validate(config: ServiceConfig) -> None:
    def bad(field: str, flag: str, why: str) -> ConfigError:
        return ConfigError(f"{field} (--{flag}): {why}")

    if config.block_size <= 0:
        raise bad("block_size", "block-size", "must be a positive number of tokens")
    if config.dp_port_stride < 0:
        raise bad("dp_port_stride", "dp-port-stride", "must be >= 0")
    if config.zmq_bind and not config.accept_any_engine and not _has_discovery(config):
        raise bad(
            "accept_any_engine",
            "accept-any-engine",
            "--zmq-bind accepts events only from engines discovery names (strict by default) "
            "and no discovery is configured, so every event would be dropped: name the "
            "engines (engines in the config file, --engines-file, Kubernetes) or pass "
            "--accept-any-engine to accept any topic (docs/security.md)",
        )
    load_curve(config.zmq_curve_cert, config.zmq_curve_clients, config.zmq_curve_server_key)
    try:
        parse_networks(config.allow_sources)
    except ValueError as exc:
        raise bad("allow_sources", "zmq-allow-source", str(exc)) from None
    if config.seq_confirm_s <= 0:
        raise ConfigError(f"seq_confirm_s: {config.seq_confirm_s} must be > 0 (seconds)")
    try:
        sync_config(config)
    except ValueError as exc:
        raise ConfigError(f"engine sync settings: {exc}") from None
    if not 1 <= config.max_engines <= MAX_ENGINES_LIMIT:
        raise bad("max_engines", "max-engines", f"must be in [1, {MAX_ENGINES_LIMIT}]")
    if not 0 <= config.http_port < 65536:
        raise bad("http_port", "http-port", f"{config.http_port} is not a port")
    if config.grpc_port is not None and not 0 <= config.grpc_port < 65536:
        raise bad("grpc_port", "grpc-port", f"{config.grpc_port} is not a port")
    if config.log_format not in ("text", "json"):
        raise bad("log_format", "log-format", "must be text or json")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise bad("log_level", "log-level", "must be debug, info, warning or error")
    if config.index_max_keys <= 0:
        raise bad("index_max_keys", "index-max-keys", "must be positive")
    config.memory_budget_bytes()  # raises ConfigError for a bad size
    if config.max_prompt_tokens <= 0:
        raise bad("max_prompt_tokens", "max-prompt-tokens", "must be a positive token count")
    if config.speculative_ttl_s < 0:
        raise bad("speculative_ttl_s", "speculative-ttl", "must be >= 0 seconds (0: off)")
    if config.redis_ttl_s is not None and config.redis_ttl_s < 0:
        raise bad("redis_ttl_s", "redis-ttl", "must be >= 0 seconds (0: never expire)")
    if not 1 <= config.redis_groups <= 1024:
        raise bad("redis_groups", "redis-groups", "must be in [1, 1024]")
    if config.redis_writers not in ("all", "leased"):
        raise bad("redis_writers", "redis-writers", "must be all or leased")
    if config.redis_lease_ttl_s <= 0:
        raise bad("redis_lease_ttl_s", "redis-lease-ttl", "must be > 0 seconds")
    if config.redis_write_queue < 0 or config.redis_pipeline < 1:
        raise bad("redis_write_queue", "redis-write-queue", "must be >= 0 (pipeline >= 1)")
    if config.redis_backoff_max_s <= 0:
        raise bad("redis_backoff_max_s", "redis-backoff-max", "must be > 0 seconds")
    if not config.redis_prefix or any(c in config.redis_prefix for c in "{}"):
        raise bad("redis_prefix", "redis-prefix", "must be non-empty, without '{' or '}'")
    for tier, weight in config.tier_weights.items():
        if tier not in ("gpu", "cpu", "storage"):
            raise bad("tier_weights", "tier-weight", f"unknown tier {tier!r}: gpu, cpu, storage")
        if not 0.0 <= weight <= 1.0:
            raise bad("tier_weights", "tier-weight", f"{tier}={weight} is not in [0, 1]")
    for adapter, base in config.lora_adapters.items():
        if config.tokenizers and base not in config.tokenizers:
            raise bad(
                "lora_adapters",
                "lora",
                f"{adapter}={base}: base model {base!r} has no --tokenizer "
                f"(configured: {', '.join(sorted(config.tokenizers))})",
            )
    for endpoint in [*config.zmq_bind, *config.zmq_connect]:
        if "://" not in endpoint:
            raise ConfigError(
                f"ZMQ endpoint {endpoint!r} (--zmq-bind/--zmq-connect): expected "
                "tcp://host:port or ipc:///path"
            )
    for engine, url in config.replay_endpoints.items():
        if "://" not in url:
            raise bad("replay_endpoints", "replay-endpoint", f"{engine}={url!r} is not a ZMQ URL")


def parse_pairs(values: list[str] | None, flag: str, example: str) -> dict[str, str] | None:
    """Repeated ``KEY=VALUE`` flags -> mapping (None when the flag was not given)."""
    if not values:
        return None
    out: dict[str, str] = {}
    for value in values:
        key, sep, item = value.partition("=")
        key, item = key.strip(), item.strip()
        if not sep or not key or not item:
            raise ConfigError(f"{flag} {value!r}: expected KEY=VALUE, e.g. {flag} {example}")
        if key in out and out[key] != item:
            raise ConfigError(f"{flag}: {key!r} is given twice ({out[key]!r}, {item!r})")
        out[key] = item
    return out


def parse_tier_weights(values: list[str] | None) -> dict[str, float] | None:
    """``--tier-weight gpu=1.0,cpu=0.8`` (repeatable, comma separated) -> {tier: weight}."""
    if not values:
        return None
    items = [item for value in values for item in value.split(",") if item.strip()]
    pairs = parse_pairs(items, "--tier-weight", "gpu=1.0,cpu=0.8,storage=0.5") or {}
    out: dict[str, float] = {}
    for tier, raw in pairs.items():
        try:
            out[tier] = float(raw)
        except ValueError:
            raise ConfigError(
                f"--tier-weight {tier}={raw!r}: the weight must be a number"
            ) from None
    return out


def parse_replay_flags(values: list[str] | None) -> dict[str, str] | None:
    """``["10.0.0.1:8000=tcp://10.0.0.1:5558", ...]`` -> mapping."""
    if not values:
        return None
    out: dict[str, str] = {}
    for value in values:
        engine, sep, url = value.partition("=")
        if not sep or not engine or not url:
            raise ConfigError(
                f"--replay-endpoint {value!r}: expected ENGINE=URL, e.g. "
                "10.0.0.1:8000=tcp://10.0.0.1:5558"
            )
        out[engine] = url
    return out


def sync_config(config: ServiceConfig) -> SyncConfig:
    """The per-engine sync settings (kvindex.sync); raises ValueError when out of range."""
    return SyncConfig(
        unsynced_scores=config.unsynced_scores,
        unsynced_weight=config.unsynced_weight,
        stale_after_s=config.engine_stale_after_s,
        drop_after_s=config.engine_drop_after_s,
        degraded_for_s=config.degraded_for_s,
    )
