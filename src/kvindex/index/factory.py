"""The one way to build a block index: :func:`make_index` from an :class:`IndexConfig`.

It returns what the services use, whoever calls it (``kvindex serve``, the picker's
in-process index, :class:`kvindex.Indexer`, the behaviour suite):

* the backend: ``memory`` (the C core when it is built, else pure Python with a warning),
  ``native`` (the same), ``python`` (always pure Python) or ``redis`` (a
  :class:`~kvindex.index.redis.RedisIndex` behind the service's
  :class:`~kvindex.service.redis_backend.RedisBackend`, which adds ``health()``);
* wrapped in :class:`~kvindex.index.locked.LockedIndex`, safe to share between an ingest
  thread and readers (no lock is taken for the Redis backend, which is thread-safe);
* with ``registry`` given, its size gauges (``kvindex_index_*``) and, for Redis, its health
  metrics registered there, read at scrape time.

Errors: :class:`IndexConfigError` (a :class:`kvindex.errors.ConfigError`) names the
:class:`IndexConfig` field at fault; edges such as ``kvindex serve`` map it to their flag.
The config is never modified.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvindex.errors import ConfigError
from kvindex.index.base import BlockIndex
from kvindex.index.locked import LockedIndex
from kvindex.index.memory import MemoryIndex, MemoryIndexConfig

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from kvindex.index.redis import ClientSource

__all__ = ["BACKEND_NAMES", "IndexConfig", "IndexConfigError", "make_index", "wrap_index"]

log = logging.getLogger("kvindex.index")

BACKEND_NAMES = ("memory", "native", "python", "redis")

# Keywords of RedisIndex.from_url an IndexConfig may pass through ``redis_options``.
REDIS_OPTIONS = frozenset({"cluster", "socket_timeout", "connect_timeout", "max_connections"})

_REDIS_URL_EXAMPLES = (
    "e.g. redis://host:6379/0, rediss://..., unix:///path, redis+cluster://host:7000, or host:port"
)


# The default memory bound of the in-memory backends: 1 GiB (about 17M entries with the C
# core, 3.3M in pure Python). `kvindex serve --index-memory-budget` and the picker's
# in-process index use it unless told otherwise.
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """What :func:`make_index` builds. Capacity fields apply to the in-memory backends,
    ``redis_*`` fields to ``redis`` (docs/index.md, docs/redis.md)."""

    backend: str = "memory"  # memory | native | python | redis
    max_keys: int = 100_000_000  # (content key, tier) slots kept in memory
    # bounds the in-memory index's keys and entries with the backend's entry cost (docs/
    # index.md, "Memory"); None: only max_keys
    memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET_BYTES
    evict_fraction: float = 0.01  # share of max_keys evicted in one sweep when full
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "kvi"  # key prefix (and hash tag) shared by replicas
    redis_ttl_s: int | None = 3600  # holder keys expire unless re-stored; None or 0: never
    redis_backoff_max_s: float = 5.0  # longest wait between probes of a Redis that is down
    # More RedisIndex.from_url keywords: cluster, socket_timeout, connect_timeout,
    # max_connections.
    redis_options: Mapping[str, Any] = field(default_factory=dict)
    redis_groups: int = 1  # engine groups (docs/redis.md, "Sharding")
    redis_write_queue: int = 0  # queued, pipelined writes (0: one script per batch)
    redis_pipeline: int = 128  # batches per pipeline
    # the copy clock of a group ticks at most this often whichever replica calls
    redis_copy_age_interval_s: float = 9.0

    def memory_config(self) -> MemoryIndexConfig:
        return MemoryIndexConfig(
            max_keys=self.max_keys,
            memory_budget_bytes=self.memory_budget_bytes,
            evict_fraction=self.evict_fraction,
        )


class IndexConfigError(ConfigError):
    """An :class:`IndexConfig` that cannot be built: ``field`` (its name), ``value``,
    ``detail`` (what is wrong and how to fix it)."""

    def __init__(self, field: str, value: object, detail: str) -> None:
        super().__init__(f"{field} {value!r}: {detail}")
        self.field = field
        self.value = value
        self.detail = detail


def make_index(
    config: IndexConfig | None = None,
    *,
    registry: CollectorRegistry | None = None,
    redis_client: ClientSource | None = None,
) -> LockedIndex:
    """The index ``config`` describes, as the services use it (see the module docstring).

    ``redis_client``: a redis-py client (or a factory returning one) to use instead of
    connecting to ``redis_url`` (tests, fakeredis, a client shared by several prefixes);
    :meth:`LockedIndex.close` closes it like one made here. Raises
    :class:`IndexConfigError`."""
    return wrap_index(_backend(config or IndexConfig(), redis_client), registry=registry)


def wrap_index(backend: BlockIndex, *, registry: CollectorRegistry | None = None) -> LockedIndex:
    """A backend built elsewhere (a custom :class:`BlockIndex`), wrapped and registered
    exactly as :func:`make_index` does with its own; a LockedIndex is not wrapped twice."""
    index = backend if isinstance(backend, LockedIndex) else LockedIndex(backend)
    if registry is not None:
        from kvindex.metrics import IndexStatsCollector

        registry.register(IndexStatsCollector(index.stats))
        redis = _redis_backend_of(index)
        if redis is not None:
            from kvindex.service.redis_backend import RedisHealthCollector

            registry.register(RedisHealthCollector(redis))
    return index


def _redis_backend_of(index: LockedIndex) -> Any:
    """The RedisBackend inside ``index``, if it is one (without importing redis-py)."""
    module = sys.modules.get("kvindex.service.redis_backend")
    if module is None:  # never imported: no RedisBackend exists
        return None
    return index.inner if isinstance(index.inner, module.RedisBackend) else None


def _backend(config: IndexConfig, redis_client: ClientSource | None) -> BlockIndex:
    name = config.backend
    if name not in BACKEND_NAMES:
        raise IndexConfigError("backend", name, f"unknown index backend: one of {BACKEND_NAMES}")
    if name == "redis":
        return _redis(config, redis_client)
    if config.max_keys < 1:
        raise IndexConfigError("max_keys", config.max_keys, "must be >= 1")
    if config.memory_budget_bytes is not None and config.memory_budget_bytes < 1:
        raise IndexConfigError("memory_budget_bytes", config.memory_budget_bytes, "must be >= 1")
    if not 0.0 <= config.evict_fraction < 1.0:
        raise IndexConfigError("evict_fraction", config.evict_fraction, "must be in [0, 1)")
    memory = config.memory_config()
    if name == "python":
        return MemoryIndex(memory)
    from kvindex.index import native

    if native.NATIVE_AVAILABLE:
        return native.NativeIndex(memory)
    log.warning("kvindex._native is not built; using the pure-Python MemoryIndex")
    return MemoryIndex(memory)


def _redis(config: IndexConfig, client: ClientSource | None) -> BlockIndex:
    try:
        from kvindex.index.redis import RedisIndex, RedisIndexConfig
        from kvindex.service.redis_backend import RedisBackend
    except ImportError as exc:  # redis-py missing from a trimmed install
        raise IndexConfigError("backend", "redis", f"is not available: {exc}") from exc
    options = dict(config.redis_options)  # a copy: the config is never modified
    unknown = sorted(set(options) - REDIS_OPTIONS)
    if unknown:
        raise IndexConfigError(
            "redis_options", unknown, f"unknown options: known are {sorted(REDIS_OPTIONS)}"
        )
    ttl = config.redis_ttl_s or None  # 0: never expire
    if client is not None:
        redis_config = RedisIndexConfig(
            prefix=config.redis_prefix,
            ttl_seconds=ttl,
            backoff_max_s=config.redis_backoff_max_s,
            groups=config.redis_groups,
            copy_age_interval_s=config.redis_copy_age_interval_s,
        )
        return RedisBackend(
            RedisIndex(client, redis_config),
            write_queue=config.redis_write_queue,
            pipeline=config.redis_pipeline,
        )
    try:
        index = RedisIndex.from_url(
            config.redis_url,
            prefix=config.redis_prefix,
            ttl_seconds=ttl,
            backoff_max_s=config.redis_backoff_max_s,
            groups=config.redis_groups,
            copy_age_interval_s=config.redis_copy_age_interval_s,
            **options,
        )
    except ValueError as exc:
        raise IndexConfigError(
            "redis_url", config.redis_url, f"{exc} ({_REDIS_URL_EXAMPLES})"
        ) from exc
    return RedisBackend(index, write_queue=config.redis_write_queue, pipeline=config.redis_pipeline)
