"""The picker's own scheduling framework choosing for the analysis' prefix policies.

Engine ``i`` of the simulation is endpoint ``10.x.y.z:8000`` (the address spells ``i``); its
metrics are the engine's view at the moment of the decision (``updated_at`` = now, so nothing
counts as stale). A request's prompt is one token per prompt token, each analysis block's
tokens all equal to its content key: the approximate ``prefix-cache-scorer`` then hashes
exactly the prefix structure of the trace (chained hashes of equal blocks, in its own block
size), and prompt-length-based plugins see the prompt's real size. The
``precise-prefix-cache-scorer``'s backend answers from the analysis index (fed by the
simulated engines' events) through ``prefix_scores``. The framework is async; one private
event loop, reused across decisions, drives it.
"""

from __future__ import annotations

import asyncio
import random
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from epp import (
    Endpoint,
    EngineMetrics,
    LLMRequest,
    PickerConfig,
    ResponseStats,
    SchedulerDeps,
    build_scheduler,
)
from epp.plugins.precise_prefix import PREFIX_BACKEND_FACTORY, PrecisePrefixParams
from kvindex.keys import ContentKey

__all__ = ["PORT", "EngineLoad", "PickerScheduler", "PrefixScores", "endpoint_address"]

PORT = 8000

PrefixScores = Callable[[Sequence[ContentKey], Sequence[int]], Sequence[float]]
"""``(request keys, engine indices) -> matched / total blocks`` per listed engine, from the
analysis index."""


class EngineLoad(Protocol):
    """What the picker reads of one engine (metrics at the decision: no scrape lag)."""

    @property
    def waiting(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def kv_usage(self) -> float: ...


def endpoint_address(engine: int) -> str:
    return f"10.{(engine >> 16) & 255}.{(engine >> 8) & 255}.{engine & 255}"


class _Decision:
    """The request being scheduled: what the precise backend needs beyond the LLMRequest."""

    keys: Sequence[ContentKey] = ()


class _AnalysisIndexBackend:
    """PrefixIndexBackend over the analysis index (no sockets: the simulation feeds it)."""

    def __init__(
        self, prefix_scores: PrefixScores, slot: Mapping[str, int], decision: _Decision
    ) -> None:
        self._prefix_scores = prefix_scores
        self._slot = slot
        self._decision = decision

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def score(self, request: LLMRequest, candidates: Sequence[str]) -> Mapping[str, float]:
        known = [c for c in candidates if c in self._slot]
        fractions = self._prefix_scores(self._decision.keys, [self._slot[c] for c in known])
        return dict(zip(known, fractions, strict=True))

    def record_pick(self, request: LLMRequest, endpoint_key: str) -> None:
        # The simulated engines announce their stores as events; nothing speculative to add.
        return None


class PickerScheduler:
    """``choose(keys, engines)`` through ``FrameworkScheduler.schedule`` for ``config``."""

    def __init__(
        self,
        config: PickerConfig,
        n_engines: int,
        block_tokens: int,
        rng: random.Random,
        prefix_scores: PrefixScores | None = None,
    ) -> None:
        self.block_tokens = block_tokens
        self._decision = _Decision()
        self._addresses = [endpoint_address(i) for i in range(n_engines)]
        self._slot = {f"{a}:{PORT}": i for i, a in enumerate(self._addresses)}
        extras: dict[Any, object] = {}
        if prefix_scores is not None:
            scores = prefix_scores

            def backend(params: PrecisePrefixParams) -> _AnalysisIndexBackend:
                return _AnalysisIndexBackend(scores, self._slot, self._decision)

            extras[PREFIX_BACKEND_FACTORY] = backend
        deps = SchedulerDeps(rng=random.Random(rng.random()), extras=extras)
        self.scheduler = build_scheduler(config, deps)
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self.scheduler.start())
        # The simulation drops its policy without closing it: close the loop with it.
        weakref.finalize(self, self._loop.close)
        self._open: dict[int, LLMRequest] = {}

    def choose(
        self, request_id: int, keys: Sequence[ContentKey], engines: Sequence[EngineLoad]
    ) -> int:
        """The engine for trace request ``request_id``; ``finished`` tells when it is done."""
        now = time.monotonic()
        endpoints = [
            Endpoint(
                self._addresses[i],
                PORT,
                metrics=EngineMetrics(
                    waiting=e.waiting, running=e.running, kv_usage=e.kv_usage, updated_at=now
                ),
            )
            for i, e in enumerate(engines)
        ]
        tokens: list[int] = []
        for key in keys:
            tokens += [key] * self.block_tokens
        request = LLMRequest(
            request_id=f"analysis-{request_id}", path="/v1/completions", token_ids=tokens
        )
        self._decision.keys = keys
        result = self._loop.run_until_complete(self.scheduler.schedule(request, endpoints))
        self._open[request_id] = request
        return self._slot[result.endpoints[0].key]

    def finished(self, request_id: int, engine: int) -> None:
        """The request's response ended: plugins that track requests in flight learn it."""
        request = self._open.pop(request_id, None)
        if request is not None:
            served = f"{self._addresses[engine]}:{PORT}"
            self.scheduler.on_response_complete(request, ResponseStats(served=served))

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.scheduler.stop())
            self._loop.close()
