"""What the precise scorer's parameters mean for kvindex: the names llm-d defines are parsed
by `epp.plugins.precise_prefix`; the ones only kvindex interprets (kept in `.extra`) are
read here, each with a clear error."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from epp.framework.config import ConfigError
from epp.plugins.precise_prefix import PrecisePrefixParams
from kvindex.config import ConfigError as KVIndexConfigError
from kvindex.config import read_token_file
from kvindex.tokenize.uds import UdsTokenizerConfig

PLUGIN = "precise-prefix-cache-scorer"
log = logging.getLogger("epp.precise")


@dataclass(frozen=True, slots=True)
class TokenizerPool:
    """llm-d's `indexerConfig.tokenizersPoolConfig`: the model whose prompts llm-d's
    tokenizer sidecar tokenizes, over the socket of `uds`."""

    model_name: str
    uds: UdsTokenizerConfig


@dataclass(frozen=True, slots=True)
class BackendOptions:
    # model name -> tokenizer spec (tokenizer.json, model dir, HF cache id)
    tokenizers: Mapping[str, str] = field(default_factory=dict)
    lora_to_base: Mapping[str, str] = field(default_factory=dict)
    remote_address: str = ""  # host:port of a kvindex sidecar's gRPC port
    remote_timeout_s: float = 0.05
    # the sidecar's bearer token (its --api-token-file), read from remoteIndex.tokenFile
    remote_token: str | None = None
    default_model: str = ""  # model of engines whose topic names none
    redis_address: str = ""  # redis://... (or host:port): the index lives in Redis
    in_memory_size: int = 100_000_000
    tokenizer_pool: TokenizerPool | None = None  # llm-d's tokenizer sidecar


def _mapping(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ConfigError(f"{PLUGIN}: {where} must map names to strings")
    return dict(raw)


def backend_options(params: PrecisePrefixParams) -> BackendOptions:
    tp = dict(params.token_processor.extra)
    ix = dict(params.indexer.extra)
    kv = dict(params.kv_events.extra)
    redis_address, in_memory_size = _block_index(
        ix.pop("kvBlockIndexConfig", None),
        params.indexer.redis_address,
        params.indexer.in_memory_size,
    )
    pool = _tokenizer_pool(ix.pop("tokenizersPoolConfig", None))
    if ix.pop("speculativeIndexing", None) is not None:
        # llm-d's guide sets it here, where llm-d's indexer config has no such field: the
        # plugin-level `speculativeIndexing` is the one that counts, upstream and here.
        log.warning(
            "%s: indexerConfig.speculativeIndexing has no effect (as in llm-d); set "
            "speculativeIndexing at the plugin's top level",
            PLUGIN,
        )
    options = BackendOptions(
        tokenizer_pool=pool,
        tokenizers=_mapping(tp.pop("tokenizers", None), "tokenProcessorConfig.tokenizers"),
        lora_to_base=_mapping(tp.pop("loraAdapters", None), "tokenProcessorConfig.loraAdapters"),
        default_model=str(kv.pop("defaultModel", "")),
        redis_address=redis_address,
        in_memory_size=in_memory_size,
    )
    remote = ix.pop("remoteIndex", None)
    if remote is not None:
        if not isinstance(remote, Mapping) or not isinstance(remote.get("address"), str):
            raise ConfigError(f"{PLUGIN}: indexerConfig.remoteIndex needs an 'address' host:port")
        timeout = remote.get("timeoutMs", 50)
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"{PLUGIN}: indexerConfig.remoteIndex.timeoutMs must be > 0")
        unknown = set(remote) - {"address", "timeoutMs", "tokenFile"}
        if unknown:
            raise ConfigError(f"{PLUGIN}: indexerConfig.remoteIndex: unknown {sorted(unknown)}")
        token_file = remote.get("tokenFile")
        token = None
        if token_file is not None:
            try:
                token = read_token_file(str(token_file), "indexerConfig.remoteIndex.tokenFile")
            except KVIndexConfigError as exc:
                raise ConfigError(f"{PLUGIN}: {exc}") from None
        options = dataclasses.replace(
            options,
            remote_address=remote["address"],
            remote_timeout_s=float(timeout) / 1000.0,
            remote_token=token,
        )
    for where, rest in (
        ("tokenProcessorConfig", tp),
        ("indexerConfig", ix),
        ("kvEventsConfig", kv),
    ):
        if "tokenizersPoolConfig" in rest:
            raise ConfigError(
                f"{PLUGIN}: {where}.tokenizersPoolConfig: llm-d reads it under indexerConfig"
            )
        if rest:
            raise ConfigError(f"{PLUGIN}: {where}: unknown parameters {sorted(rest)}")
    return options


def _block_index(raw: Any, redis_address: str, size: int) -> tuple[str, int]:
    """llm-d-kv-cache's nested form: kvBlockIndexConfig.{redisConfig.address,
    inMemoryConfig.size}, beside the flat forms the plugin parses itself."""
    if raw is None:
        return redis_address, size
    where = "indexerConfig.kvBlockIndexConfig"
    # llm-d's index metrics switches: kvindex's index metrics are always exported.
    known = {"redisConfig", "inMemoryConfig", "enableMetrics", "metricsLoggingInterval"}
    if not isinstance(raw, Mapping) or set(raw) - known:
        raise ConfigError(f"{PLUGIN}: {where}: only {', '.join(sorted(known))}")
    redis = raw.get("redisConfig") or {}
    memory = raw.get("inMemoryConfig") or {}
    address = redis.get("address", redis_address) if isinstance(redis, Mapping) else None
    new_size = memory.get("size", size) if isinstance(memory, Mapping) else None
    if not isinstance(address, str) or not isinstance(new_size, int) or new_size < 1:
        raise ConfigError(
            f"{PLUGIN}: {where}: redisConfig.address must be a string, inMemoryConfig.size > 0"
        )
    return address, new_size


def _tokenizer_pool(raw: Any) -> TokenizerPool | None:
    """llm-d-kv-cache's tokenization.Config: modelName, workersCount, uds. Without
    `uds.socketFile` llm-d fails the plugin ("UDS tokenizer config must be enabled")."""
    if raw is None:
        return None
    where = f"{PLUGIN}: indexerConfig.tokenizersPoolConfig"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = sorted(set(raw) - {"modelName", "workersCount", "uds"})
    if unknown:
        raise ConfigError(f"{where}: unknown {unknown} (known: modelName, workersCount, uds)")
    model = raw.get("modelName")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: modelName is required (the model the sidecar tokenizes)")
    workers = raw.get("workersCount", 5)
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{where}: workersCount must be an integer >= 1")
    uds = raw.get("uds")
    if not isinstance(uds, Mapping) or not uds.get("socketFile"):
        raise ConfigError(
            f"{where}: uds.socketFile is required (llm-d's tokenizer sidecar socket, e.g. "
            "/tmp/tokenizer/tokenizer-uds.socket); for tokenizer files in the picker use "
            "tokenProcessorConfig.tokenizers"
        )
    try:
        config = UdsTokenizerConfig.from_mapping(uds)
    except ValueError as exc:
        raise ConfigError(f"{where}.uds: {exc}") from None
    return TokenizerPool(model, config)
