"""Routing policies the simulation compares.

Baselines (random, round-robin, least-loaded, the oracle) are plain rules. The two prefix
policies are the picker itself (``kvtools.analyze.picker``) with the EndpointPickerConfig of
``kvtools.analyze.config``: approximate-prefix with the picker's ``prefix-cache-scorer``
(learns from its own routing, never of evictions), precise-prefix with the
``precise-prefix-cache-scorer`` over the real ``MemoryIndex`` fed by the simulated engines'
store/evict events.
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
from kvtools.analyze.config import PickerSetup, PrefixKind
from kvtools.analyze.model import TraceRequest
from kvtools.analyze.picker import PickerScheduler, PrefixScores

__all__ = [
    "INGEST_MODES",
    "POLICY_NAMES",
    "EngineView",
    "Policy",
    "PolicyContext",
    "make_policy",
]


@dataclass(slots=True)
class EngineView:
    """What the picker knows of one engine (metrics are read when routing: no scrape lag)."""

    name: str
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0


class Policy(Protocol):
    name: str
    oracle: bool  # one unbounded cache shared by all engines (upper bound)
    wants_events: bool  # receives the engines' store/evict events

    def choose(
        self, request: int, keys: Sequence[ContentKey], engines: Sequence[EngineView]
    ) -> int:
        """The engine for trace request ``request`` (its index in the trace)."""
        ...

    def finished(self, request: int, engine: int) -> None:
        """``request``'s response ended on ``engine``."""
        ...

    def stored(
        self, now_ms: float, engine: int, request: TraceRequest, positions: Sequence[int]
    ) -> None:
        """The engine cached ``request``'s blocks at ``positions`` (ascending)."""
        ...

    def removed(self, now_ms: float, engine: int, keys: Sequence[ContentKey]) -> None: ...


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

    def finished(self, request: int, engine: int) -> None:
        return None

    def stored(
        self, now_ms: float, engine: int, request: TraceRequest, positions: Sequence[int]
    ) -> None:
        return None

    def removed(self, now_ms: float, engine: int, keys: Sequence[ContentKey]) -> None:
        return None


class RandomPolicy(_Base):
    name = "random"

    def choose(
        self, request: int, keys: Sequence[ContentKey], engines: Sequence[EngineView]
    ) -> int:
        return self.rng.randrange(self.n)


class RoundRobinPolicy(_Base):
    name = "round-robin"

    def __init__(self, n_engines: int, rng: random.Random) -> None:
        super().__init__(n_engines, rng)
        self._next = 0

    def choose(
        self, request: int, keys: Sequence[ContentKey], engines: Sequence[EngineView]
    ) -> int:
        engine = self._next
        self._next = (engine + 1) % self.n
        return engine


class LeastLoadedPolicy(_Base):
    """Fewest waiting + running requests, ties at random."""

    name = "least-loaded"

    def choose(
        self, request: int, keys: Sequence[ContentKey], engines: Sequence[EngineView]
    ) -> int:
        return _pick_max([-(e.waiting + e.running) for e in engines], self.rng)


class OraclePolicy(LeastLoadedPolicy):
    """Least-loaded routing over one unbounded cache shared by every engine: the reuse
    ceiling of the trace (the simulation computes hits against the shared cache)."""

    name = "oracle"
    oracle = True


class _PickerPolicy(_Base):
    """The picker's framework with ``setup``'s config for ``kind``'s prefix scorer."""

    kind: PrefixKind = "approximate"

    def __init__(
        self,
        n_engines: int,
        rng: random.Random,
        setup: PickerSetup,
        block_tokens: int,
        prefix_scores: PrefixScores | None = None,
    ) -> None:
        super().__init__(n_engines, rng)
        self.picker = PickerScheduler(
            setup.load(self.kind, block_tokens), n_engines, block_tokens, rng, prefix_scores
        )

    def choose(
        self, request: int, keys: Sequence[ContentKey], engines: Sequence[EngineView]
    ) -> int:
        return self.picker.choose(request, keys, engines)

    def finished(self, request: int, engine: int) -> None:
        self.picker.finished(request, engine)


class ApproximatePrefixPolicy(_PickerPolicy):
    """The picker with its approximate ``prefix-cache-scorer`` (gateways without KV events):
    remembers the blocks it sent to each endpoint in a per-endpoint LRU, never learns of
    evictions."""

    name = "approximate-prefix"
    kind = "approximate"


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


class PrecisePrefixPolicy(_PickerPolicy):
    """The picker with its ``precise-prefix-cache-scorer``, whose backend is the real
    :class:`MemoryIndex` fed by the simulated engines' store/evict events (``wire``: encoded
    as vLLM sends them, decoded and ingested by ``EventApplier``; ``ops``: ``Store``/``Remove``
    ops straight into ``BlockIndex.apply``)."""

    name = "precise-prefix"
    kind = "precise"
    wants_events = True

    def __init__(
        self,
        n_engines: int,
        rng: random.Random,
        setup: PickerSetup,
        block_tokens: int,
        chain_block: int,
        ingest: str = "wire",
    ) -> None:
        self.index = MemoryIndex()
        if ingest not in INGEST_MODES:
            raise ValueError(f"unknown ingest mode {ingest!r} (one of {', '.join(INGEST_MODES)})")
        self.sink: OpsEventSink | WireEventSink = (
            WireEventSink(self.index, chain_block) if ingest == "wire" else OpsEventSink(self.index)
        )
        self._names = [f"engine-{i}" for i in range(n_engines)]
        self._slot = {name: i for i, name in enumerate(self._names)}
        super().__init__(n_engines, rng, setup, block_tokens, self.prefix_scores)

    def prefix_scores(self, keys: Sequence[ContentKey], engines: Sequence[int]) -> list[float]:
        """The index's matched / total blocks for ``engines``."""
        prefix = [0.0] * self.n
        if keys:
            total = len(keys)
            for name, match in self.index.lookup(keys).items():
                prefix[self._slot[name]] = match.blocks / total
        return [prefix[i] for i in engines]

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
    picker: PickerSetup
    block_tokens: int  # prompt tokens per key
    chain_block: int  # TraceRequest.tokens entries per key (wire events)
    ingest: str = "wire"


PolicyFactory = Callable[[PolicyContext], Policy]

_FACTORIES: dict[str, PolicyFactory] = {
    "random": lambda c: RandomPolicy(c.n_engines, c.rng),
    "round-robin": lambda c: RoundRobinPolicy(c.n_engines, c.rng),
    "least-loaded": lambda c: LeastLoadedPolicy(c.n_engines, c.rng),
    "approximate-prefix": lambda c: ApproximatePrefixPolicy(
        c.n_engines, c.rng, c.picker, c.block_tokens
    ),
    "precise-prefix": lambda c: PrecisePrefixPolicy(
        c.n_engines, c.rng, c.picker, c.block_tokens, c.chain_block, c.ingest
    ),
    "oracle": lambda c: OraclePolicy(c.n_engines, c.rng),
}
POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_policy(name: str, context: PolicyContext) -> Policy:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {name!r} (one of {', '.join(POLICY_NAMES)})")
    return factory(context)
