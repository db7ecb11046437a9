"""Routing policies the simulation compares, and the picker's scorers (formulas of llm-d's
EndpointPickerConfig scorers, /work/shared/reference/endpoint-picker.md section 4).

A policy sees the cluster as the picker would: per-engine waiting queue, running requests,
KV usage and the requests it has in flight there; prefix policies add their own view of the
caches (routing history, or the real ``MemoryIndex`` fed by the engines' events).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from kvindex.index import MemoryIndex, Remove, Store, StoredBlock, Tier
from kvindex.ingest import EventApplier, IngestConfig
from kvindex.keys import ContentKey
from kvindex.wire import decode_batch
from kvtools.analyze.config import ProfileWeights
from kvtools.analyze.model import TraceRequest
from kvtools.analyze.schedulers import ExternalScheduler, SchedulerFactory

__all__ = [
    "INGEST_MODES",
    "POLICY_NAMES",
    "EngineView",
    "Policy",
    "PolicyContext",
    "make_policy",
    "score_engines",
]


@dataclass(slots=True)
class EngineView:
    """What the picker knows of one engine (metrics are read when routing: no scrape lag)."""

    name: str
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    in_flight: int = 0  # routed by this picker and not finished


class Policy(Protocol):
    name: str
    oracle: bool  # one unbounded cache shared by all engines (upper bound)
    wants_events: bool  # receives the engines' store/evict events

    def choose(self, keys: Sequence[ContentKey], engines: Sequence[EngineView]) -> int: ...

    def routed(self, engine: int, keys: Sequence[ContentKey]) -> None: ...

    def stored(
        self, now_ms: float, engine: int, request: TraceRequest, positions: Sequence[int]
    ) -> None:
        """The engine cached ``request``'s blocks at ``positions`` (ascending)."""
        ...

    def removed(self, now_ms: float, engine: int, keys: Sequence[ContentKey]) -> None: ...


# -- scorers ---------------------------------------------------------------------------------


def _min_max_low_is_good(values: Sequence[float]) -> list[float]:
    """(max - v) / (max - min); all equal: 1 for everyone (queue/running scorers)."""
    hi, lo = max(values), min(values)
    if hi == lo:
        return [1.0] * len(values)
    return [(hi - v) / (hi - lo) for v in values]


def score_engines(
    weights: ProfileWeights, engines: Sequence[EngineView], prefix: Sequence[float]
) -> list[float]:
    """sum(weight * score) per engine; ``prefix[i]`` is matched / total prompt blocks."""
    n = len(engines)
    total = [weights.prefix * p for p in prefix] if weights.prefix else [0.0] * n
    if weights.queue:
        for i, s in enumerate(_min_max_low_is_good([e.waiting for e in engines])):
            total[i] += weights.queue * s
    if weights.kv_utilization:
        for i, e in enumerate(engines):
            total[i] += weights.kv_utilization * (1.0 - e.kv_usage)
    if weights.running_requests:
        for i, s in enumerate(_min_max_low_is_good([e.running for e in engines])):
            total[i] += weights.running_requests * s
    if weights.load_aware:
        threshold = weights.load_aware_threshold
        for i, e in enumerate(engines):
            total[i] += weights.load_aware * max(0.0, 0.5 * (1.0 - e.waiting / threshold))
    if weights.active_request:
        most = max(e.in_flight for e in engines)
        for i, e in enumerate(engines):
            score = 1.0 if most == 0 else (most - e.in_flight) / most
            total[i] += weights.active_request * score
    return total


def _pick_max(scores: Sequence[float], rng: random.Random) -> int:
    """max-score-picker: the best score, ties broken at random (as llm-d shuffles)."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


# -- policies --------------------------------------------------------------------------------


class _Base:
    name = ""
    oracle = False
    wants_events = False

    def __init__(self, n_engines: int, rng: random.Random) -> None:
        self.n = n_engines
        self.rng = rng

    def routed(self, engine: int, keys: Sequence[ContentKey]) -> None:
        return None

    def stored(
        self, now_ms: float, engine: int, request: TraceRequest, positions: Sequence[int]
    ) -> None:
        return None

    def removed(self, now_ms: float, engine: int, keys: Sequence[ContentKey]) -> None:
        return None


class RandomPolicy(_Base):
    name = "random"

    def choose(self, keys: Sequence[ContentKey], engines: Sequence[EngineView]) -> int:
        return self.rng.randrange(self.n)


class RoundRobinPolicy(_Base):
    name = "round-robin"

    def __init__(self, n_engines: int, rng: random.Random) -> None:
        super().__init__(n_engines, rng)
        self._next = 0

    def choose(self, keys: Sequence[ContentKey], engines: Sequence[EngineView]) -> int:
        engine = self._next
        self._next = (engine + 1) % self.n
        return engine


class LeastLoadedPolicy(_Base):
    """Fewest waiting + running requests, ties at random."""

    name = "least-loaded"

    def choose(self, keys: Sequence[ContentKey], engines: Sequence[EngineView]) -> int:
        return _pick_max([-(e.waiting + e.running) for e in engines], self.rng)


class OraclePolicy(LeastLoadedPolicy):
    """Least-loaded routing over one unbounded cache shared by every engine: the reuse
    ceiling of the trace (the simulation computes hits against the shared cache)."""

    name = "oracle"
    oracle = True


class ApproximatePrefixPolicy(_Base):
    """History-based prefix scoring (gateways without KV events): remembers the blocks it sent
    to each endpoint in a per-endpoint LRU of ``lruCapacityPerServer`` blocks, never learns
    of evictions."""

    name = "approximate-prefix"

    def __init__(
        self, n_engines: int, rng: random.Random, weights: ProfileWeights, block_tokens: int
    ) -> None:
        super().__init__(n_engines, rng)
        self.weights = weights
        tokens = weights.lru_capacity_per_server * weights.block_size_tokens
        self.capacity = max(1, tokens // block_tokens)
        self._lru: list[dict[ContentKey, None]] = [{} for _ in range(n_engines)]

    def choose(self, keys: Sequence[ContentKey], engines: Sequence[EngineView]) -> int:
        total = len(keys)
        prefix = [0.0] * self.n
        if total:
            for i, lru in enumerate(self._lru):
                matched = 0
                for key in keys:
                    if key not in lru:
                        break
                    matched += 1
                prefix[i] = matched / total
        return _pick_max(score_engines(self.weights, engines, prefix), self.rng)

    def routed(self, engine: int, keys: Sequence[ContentKey]) -> None:
        lru = self._lru[engine]
        for key in keys:
            lru.pop(key, None)
            lru[key] = None
        excess = len(lru) - self.capacity
        if excess > 0:
            for key in [k for _, k in zip(range(excess), lru, strict=False)]:
                del lru[key]


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs [start, end) of ascending positions."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class OpsEventSink:
    """Engine events straight into ``BlockIndex.apply`` as ``Store``/``Remove`` ops."""

    def __init__(self, index: MemoryIndex) -> None:
        self.index = index
        self.skipped: dict[str, int] = {}

    def stored(
        self, now_ms: float, engine: str, request: TraceRequest, positions: Sequence[int]
    ) -> None:
        keys = request.keys
        blocks = [StoredBlock(keys[p], (keys[p],)) for p in positions]
        self.index.apply(engine, [Store(Tier.GPU, blocks)])

    def removed(self, now_ms: float, engine: str, keys: Sequence[ContentKey]) -> None:
        self.index.apply(engine, [Remove(Tier.GPU, list(keys))])


class WireEventSink:
    """Engine events as vLLM 0.33 publishes them (msgpack batch, map-encoded events), through
    ``decode_batch`` and the real ``EventApplier``: the index learns exactly what a live
    subscriber would, including the key chaining from parent hashes."""

    def __init__(self, index: MemoryIndex, chain_block: int) -> None:
        self.index = index
        self.chain_block = chain_block
        self.applier = EventApplier(index, IngestConfig(block_size=chain_block))
        self.skipped: dict[str, int] = {}
        self._encode = msgspec.msgpack.Encoder().encode

    def _apply(self, engine: str, ts: float, events: list[dict[str, Any]], model: str) -> None:
        batch = decode_batch(self._encode([ts, events, None]))
        counts = self.applier.apply_batch(engine, batch, model)
        for reason, n in counts.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        if batch.error is not None or batch.malformed or batch.unknown:
            self.skipped["undecodable"] = self.skipped.get("undecodable", 0) + 1

    def stored(
        self, now_ms: float, engine: str, request: TraceRequest, positions: Sequence[int]
    ) -> None:
        keys, tokens, cb = request.keys, request.tokens, self.chain_block
        events: list[dict[str, Any]] = []
        for start, end in _runs(positions):
            events.append(
                {
                    "type": "BlockStored",
                    # The simulated engine's block hash is the content key itself (engine
                    # hashes are opaque per-engine ids; any injective choice behaves alike).
                    "block_hashes": list(keys[start:end]),
                    "parent_block_hash": keys[start - 1] if start else None,
                    "token_ids": list(tokens[start * cb : end * cb]),
                    "block_size": cb,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": request.lora,
                }
            )
        self._apply(engine, now_ms / 1000.0, events, request.model)

    def removed(self, now_ms: float, engine: str, keys: Sequence[ContentKey]) -> None:
        event = {"type": "BlockRemoved", "block_hashes": list(keys), "medium": "GPU"}
        self._apply(engine, now_ms / 1000.0, [event], "")


INGEST_MODES = ("wire", "ops")


class PrecisePrefixPolicy(_Base):
    """The real :class:`MemoryIndex`, fed by the simulated engines' store/evict events
    (``wire``: encoded as vLLM sends them, decoded and ingested by ``EventApplier``;
    ``ops``: ``Store``/``Remove`` ops straight into ``BlockIndex.apply``), scored with the
    profile weights, or, given a ``scheduler_factory`` (``--scheduler picker``), by that
    scheduler, which asks this index for the prefix fractions."""

    name = "precise-prefix"
    wants_events = True

    def __init__(
        self,
        n_engines: int,
        rng: random.Random,
        weights: ProfileWeights,
        chain_block: int,
        ingest: str = "wire",
        scheduler_factory: SchedulerFactory | None = None,
        scheduler_config: str | None = None,
    ) -> None:
        super().__init__(n_engines, rng)
        self.weights = weights
        self.index = MemoryIndex()
        if ingest not in INGEST_MODES:
            raise ValueError(f"unknown ingest mode {ingest!r} (one of {', '.join(INGEST_MODES)})")
        self.sink: OpsEventSink | WireEventSink = (
            WireEventSink(self.index, chain_block) if ingest == "wire" else OpsEventSink(self.index)
        )
        self._names = [f"engine-{i}" for i in range(n_engines)]
        self._slot = {name: i for i, name in enumerate(self._names)}
        self.scheduler: ExternalScheduler | None = None
        if scheduler_factory is not None:
            self.scheduler = scheduler_factory(scheduler_config, n_engines, self.prefix_scores)

    def _prefix(self, keys: Sequence[ContentKey]) -> list[float]:
        prefix = [0.0] * self.n
        if keys:
            total = len(keys)
            for name, match in self.index.lookup(keys).items():
                prefix[self._slot[name]] = match.blocks / total
        return prefix

    def prefix_scores(self, keys: Sequence[ContentKey], engines: Sequence[int]) -> list[float]:
        """The index's matched / total blocks for ``engines`` (the external scheduler's view)."""
        prefix = self._prefix(keys)
        return [prefix[i] for i in engines]

    def choose(self, keys: Sequence[ContentKey], engines: Sequence[EngineView]) -> int:
        if self.scheduler is not None:
            return self.scheduler.choose(keys, engines)
        return _pick_max(score_engines(self.weights, engines, self._prefix(keys)), self.rng)

    def stored(
        self, now_ms: float, engine: int, request: TraceRequest, positions: Sequence[int]
    ) -> None:
        self.sink.stored(now_ms, self._names[engine], request, positions)

    def removed(self, now_ms: float, engine: int, keys: Sequence[ContentKey]) -> None:
        self.sink.removed(now_ms, self._names[engine], keys)


@dataclass(frozen=True, slots=True)
class PolicyContext:
    n_engines: int
    rng: random.Random
    weights: ProfileWeights
    block_tokens: int  # tokens per key (cost model, approximate LRU size)
    chain_block: int  # TraceRequest.tokens entries per key (wire events)
    ingest: str = "wire"
    # Precise-prefix only: an external scheduler (entry point) and its config file.
    scheduler_factory: SchedulerFactory | None = None
    scheduler_config: str | None = None


PolicyFactory = Callable[[PolicyContext], Policy]

_FACTORIES: dict[str, PolicyFactory] = {
    "random": lambda c: RandomPolicy(c.n_engines, c.rng),
    "round-robin": lambda c: RoundRobinPolicy(c.n_engines, c.rng),
    "least-loaded": lambda c: LeastLoadedPolicy(c.n_engines, c.rng),
    "approximate-prefix": lambda c: ApproximatePrefixPolicy(
        c.n_engines, c.rng, c.weights, c.block_tokens
    ),
    "precise-prefix": lambda c: PrecisePrefixPolicy(
        c.n_engines,
        c.rng,
        c.weights,
        c.chain_block,
        c.ingest,
        c.scheduler_factory,
        c.scheduler_config,
    ),
    "oracle": lambda c: OraclePolicy(c.n_engines, c.rng),
}
POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_policy(name: str, context: PolicyContext) -> Policy:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {name!r} (one of {', '.join(POLICY_NAMES)})")
    return factory(context)
