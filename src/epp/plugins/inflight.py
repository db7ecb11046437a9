"""Scorers that keep their own per-endpoint state from picks and completions:
active-request-scorer (in-flight counts) and no-hit-lru-scorer (cold-request spreading)."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.framework.plugin import PreRequest, ResponseComplete, Scorer, Scores
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.shared import prefix_match
from epp.types import Endpoint, LLMRequest, ResponseStats, SchedulingResult


@dataclass(frozen=True)
class ActiveRequestParams:
    request_timeout_s: float = 120.0
    idle_threshold: int = 0
    max_busy_score: float = 1.0


def _parse_active(params: Params) -> ActiveRequestParams:
    return ActiveRequestParams(
        request_timeout_s=params.duration("requestTimeout", 120.0),
        idle_threshold=params.integer("idleThreshold", 0, min=0),
        max_busy_score=params.number("maxBusyScore", 1.0, min=0.0, max=1.0),
    )


class ActiveRequestScorer(Scorer, PreRequest, ResponseComplete):
    """In-flight requests per endpoint, counted by this picker: +1 per pick (every profile's
    first endpoint), -1 at response completion, or when `requestTimeout` passes without one.
    Endpoints at or below `idleThreshold` score 1; busier ones
    (max - count) / max * maxBusyScore."""

    type_name = "active-request-scorer"
    response_data = "end"  # releases at the end of the response; reads no body

    def __init__(self, name: str, params: ActiveRequestParams, clock: Callable[[], float]) -> None:
        super().__init__(name)
        self.params = params
        self._clock = clock
        self.counts: dict[str, int] = {}
        self._requests: dict[str, tuple[float, list[str]]] = {}
        self._deadlines: list[tuple[float, str]] = []
        self.expired = 0

    def _expire(self, now: float) -> None:
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, rid = heapq.heappop(heap)
            entry = self._requests.get(rid)
            if entry is not None and entry[0] == deadline:
                del self._requests[rid]
                self._release(entry[1])
                self.expired += 1

    def _release(self, keys: list[str]) -> None:
        for k in keys:
            c = self.counts.get(k, 0) - 1
            if c <= 0:
                self.counts.pop(k, None)
            else:
                self.counts[k] = c

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        self._expire(self._clock())
        counts = self.counts
        if not counts:
            return [1.0] * len(endpoints)
        high = max(counts.values())
        idle, busy = self.params.idle_threshold, self.params.max_busy_score
        out: list[float] = []
        for k in cycle.keys(endpoints):
            c = counts.get(k, 0)
            out.append(1.0 if c <= idle else (high - c) / high * busy)
        return out

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        now = self._clock()
        keys = [cycle.key(p.endpoints[0]) for p in result.profiles.values() if p.endpoints]
        old = self._requests.pop(request.request_id, None)
        if old is not None:  # rescheduled under the same id: the old entry is void
            self._release(old[1])
        deadline = now + self.params.request_timeout_s
        self._requests[request.request_id] = (deadline, keys)
        heapq.heappush(self._deadlines, (deadline, request.request_id))
        for k in keys:
            self.counts[k] = self.counts.get(k, 0) + 1

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        entry = self._requests.pop(request.request_id, None)
        if entry is not None:
            self._release(entry[1])
        self._expire(self._clock())

    def in_flight(self) -> int:
        return len(self._requests)


@dataclass(frozen=True)
class NoHitLRUParams:
    lru_size: int = 1024


def _parse_no_hit(params: Params) -> NoHitLRUParams:
    # Which prefix plugin to read: here whichever wrote the cycle's prefix match info.
    params.ignore("prefixPluginType", "prefixPluginName")
    return NoHitLRUParams(params.integer("lruSize", 1024, min=1))


_COLD_KEY = "no-hit-lru/cold/"


class NoHitLRUScorer(Scorer, PreRequest):
    """Cold requests (no endpoint has any prefix hit per the prefix scorer that ran before
    it) go to the endpoint least recently given a cold request: never-used endpoints first
    (1.0 down), then used ones oldest first, linearly to 0. Warm requests score 0.5
    everywhere. Runs after stage-0 scorers, so it sees this cycle's prefix match."""

    type_name = "no-hit-lru-scorer"
    stage = 1

    def __init__(self, name: str, params: NoHitLRUParams) -> None:
        super().__init__(name)
        self.lru_size = params.lru_size
        self._lru: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._cold_key = _COLD_KEY + name

    def score(self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]) -> Scores:
        info = prefix_match(cycle)
        cold = info is None or not info.any_hit()
        cycle.write(self._cold_key, cold)
        n = len(endpoints)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        keys = cycle.keys(endpoints)
        position = {k: i for i, k in enumerate(self._lru)}
        never = [k for k in keys if k not in position]
        rank: dict[str, int] = {k: i for i, k in enumerate(never)}
        used = sorted((k for k in keys if k in position), key=position.__getitem__)
        for i, k in enumerate(used):
            rank[k] = len(never) + i
        return [max(0.0, 1.0 - rank[k] / (n - 1)) for k in keys]

    def pre_request(self, cycle: CycleState, request: LLMRequest, result: SchedulingResult) -> None:
        if cycle.read(self._cold_key, bool) is not True:
            return
        for profile in result.profiles.values():
            if profile.endpoints:
                key = cycle.key(profile.endpoints[0])
                self._lru.pop(key, None)
                self._lru[key] = None
                while len(self._lru) > self.lru_size:
                    self._lru.popitem(last=False)


def register(registry: Registry) -> None:
    def build_active(name: str, p: ActiveRequestParams, ctx: BuildContext) -> Scorer:
        return ActiveRequestScorer(name, p, ctx.deps.clock)

    registry.register(
        PluginType(
            ActiveRequestScorer.type_name,
            ActiveRequestScorer,
            _parse_active,
            build_active,
            "in-flight requests tracked by the picker",
        )
    )

    def build_no_hit(name: str, p: NoHitLRUParams, _ctx: BuildContext) -> Scorer:
        return NoHitLRUScorer(name, p)

    registry.register(
        PluginType(
            NoHitLRUScorer.type_name,
            NoHitLRUScorer,
            _parse_no_hit,
            build_no_hit,
            "cold prompts to the least recently used endpoint",
        )
    )
