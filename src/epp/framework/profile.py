"""One scheduling profile: filters, then weighted scorers, then a picker."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from epp.framework import observer as ext
from epp.framework.cycle import CycleState
from epp.framework.observer import SchedulerObserver
from epp.framework.plugin import Filter, Picker, Plugin, ScoredEndpoint, Scorer
from epp.types import Endpoint, LLMRequest, ProfileResult


@dataclass
class WeightedScorer:
    scorer: Scorer
    weight: float


class PluginCallStats:
    """Counts plugin failures the framework survived (exported by whoever holds it)."""

    def __init__(self) -> None:
        self.errors: dict[str, int] = {}

    def error(self, plugin: Plugin) -> None:
        self.errors[plugin.name] = self.errors.get(plugin.name, 0) + 1


class SchedulingProfile:
    def __init__(
        self,
        name: str,
        filters: Sequence[Filter],
        scorers: Sequence[WeightedScorer],
        picker: Picker,
        *,
        observer: SchedulerObserver | None,
        timer: Callable[[], float],
        stats: PluginCallStats,
    ) -> None:
        self.name = name
        self.filters = list(filters)
        # Stable sort: config order within a stage.
        self.scorers = sorted(scorers, key=lambda ws: ws.scorer.stage)
        self._gates = [ws.scorer for ws in self.scorers if ws.scorer.gates]
        self.picker = picker
        self._observer = observer
        self._timer = timer
        self._stats = stats

    def _failed(self, point: str, plugin: Plugin) -> None:
        self._stats.error(plugin)
        if self._observer is not None:
            self._observer.plugin_error(point, plugin.type_name, plugin.name)

    async def run(
        self, cycle: CycleState, request: LLMRequest, candidates: list[Endpoint]
    ) -> ProfileResult | None:
        """The profile's pick plus fallbacks, or None when the filters leave nothing."""
        obs, timer = self._observer, self._timer
        endpoints = candidates
        for f in self.filters:
            t0 = timer() if obs else 0.0
            endpoints = f.filter(cycle, request, endpoints)
            if obs:
                obs.plugin_duration(ext.FILTER, f.type_name, f.name, timer() - t0)
            if not endpoints:
                return None
        n = len(endpoints)
        totals = [0.0] * n
        for ws in self.scorers:
            scorer = ws.scorer
            t0 = timer() if obs else 0.0
            try:
                result = scorer.score(cycle, request, endpoints)
                if inspect.isawaitable(result):
                    result = await result
            except Exception:
                # A failing scorer (a remote index down) contributes nothing; the request
                # is still placed by the others.
                self._failed(ext.SCORER, scorer)
                continue
            if obs:
                obs.plugin_duration(ext.SCORER, scorer.type_name, scorer.name, timer() - t0)
            if len(result) != n:
                self._failed(ext.SCORER, scorer)
                continue
            w = ws.weight
            # Clamped to [0, 1]; NaN compares False, so it scores 0. Weights are finite
            # (the config loader checks), so totals are never NaN.
            totals = [
                (t + w * (s if s < 1.0 else 1.0)) if s > 0.0 else t
                for t, s in zip(totals, result, strict=True)
            ]
        scored = list(map(ScoredEndpoint, endpoints, totals))
        if self._gates:
            # Gates narrow what the picker sees; each applies only if it leaves someone.
            keep = [True] * n
            for gate in self._gates:
                mask = gate.eligible(cycle, endpoints)
                if mask is not None and len(mask) == n:
                    narrowed = [a and bool(b) for a, b in zip(keep, mask, strict=True)]
                    if any(narrowed):
                        keep = narrowed
            if not all(keep):
                scored = [se for se, ok in zip(scored, keep, strict=True) if ok]
        t0 = timer() if obs else 0.0
        picked = self.picker.pick(cycle, request, scored)
        if obs:
            obs.plugin_duration(ext.PICKER, self.picker.type_name, self.picker.name, timer() - t0)
        if not picked:
            return None
        scores = dict(zip(cycle.keys(endpoints), totals, strict=True))
        return ProfileResult(name=self.name, endpoints=picked, scores=scores)
