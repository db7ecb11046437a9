"""The picker's scheduling framework as a ``kvindex analyze`` scheduler (entry point
``kvtools.analyze.schedulers: picker``): ``kvindex analyze --scheduler picker`` routes the
precise-prefix policy with the real plugins an EndpointPickerConfig names, instead of the
analysis' re-implementation of their formulas.

Engine ``i`` of the simulation is endpoint ``10.0.0.{i}:8000`` (for i >= 256, more octets);
its metrics are the engine's view at the moment of the decision (``updated_at`` = now, so
nothing counts as stale). The precise-prefix-cache-scorer's backend answers from the
analysis index through ``prefix_scores``. The framework is async; one private event loop,
reused across decisions, drives it.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from epp.framework import SchedulerDeps, build_scheduler, load_config
from epp.framework.config import DEFAULT_CONFIG_YAML
from epp.plugins.precise_prefix import PrecisePrefixParams
from epp.types import Endpoint, EngineMetrics, LLMRequest
from kvindex.keys import ContentKey
from kvtools.analyze.schedulers import PrefixScores

if TYPE_CHECKING:
    from kvtools.analyze.policies import EngineView

__all__ = ["ANALYSIS_DEFAULT_CONFIG", "PickerAnalysisScheduler", "make_scheduler"]

# The picker's defaults (epp.framework.config.DEFAULT_CONFIG_YAML) with the precise scorer in
# place of the approximate one: what the analysis' precise-prefix policy stands for.
ANALYSIS_DEFAULT_CONFIG = re.sub(
    r"(?<![\w-])prefix-cache-scorer", "precise-prefix-cache-scorer", DEFAULT_CONFIG_YAML
)

PORT = 8000


def endpoint_address(engine: int) -> str:
    return f"10.{(engine >> 16) & 255}.{(engine >> 8) & 255}.{engine & 255}"


class _Decision:
    """The request being scheduled: what the backend needs beyond the LLMRequest."""

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


class PickerAnalysisScheduler:
    """``choose(keys, engines)`` through ``FrameworkScheduler.schedule``."""

    def __init__(self, config_path: str | None, n_engines: int, prefix_scores: PrefixScores):
        source = ANALYSIS_DEFAULT_CONFIG if config_path is None else config_path
        self.config = load_config(source)
        self._decision = _Decision()
        self._addresses = [endpoint_address(i) for i in range(n_engines)]
        self._slot = {f"{a}:{PORT}": i for i, a in enumerate(self._addresses)}
        self.block_size = 16  # tokens per analysis key, as the precise scorer is configured

        def backend(params: PrecisePrefixParams) -> _AnalysisIndexBackend:
            self.block_size = params.token_processor.block_size_tokens
            return _AnalysisIndexBackend(prefix_scores, self._slot, self._decision)

        deps = SchedulerDeps(rng=random.Random(0), prefix_backend_factory=backend)
        self.scheduler = build_scheduler(self.config, deps)
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self.scheduler.start())
        # The simulation drops its policy without closing it: close the loop with it.
        weakref.finalize(self, self._loop.close)
        self._count = 0

    def choose(self, keys: Sequence[ContentKey], engines: Sequence[EngineView]) -> int:
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
        self._count += 1
        # Token values are irrelevant (the backend scores by keys); the length lets
        # prompt-length-based plugins see the prompt's size.
        request = LLMRequest(
            request_id=f"analysis-{self._count}",
            path="/v1/completions",
            token_ids=[0] * (len(keys) * self.block_size),
        )
        self._decision.keys = keys
        result = self._loop.run_until_complete(self.scheduler.schedule(request, endpoints))
        return self._slot[result.endpoints[0].key]

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.scheduler.stop())
            self._loop.close()


def make_scheduler(
    config_path: str | None, n_engines: int, prefix_scores: PrefixScores
) -> PickerAnalysisScheduler:
    return PickerAnalysisScheduler(config_path, n_engines, prefix_scores)
