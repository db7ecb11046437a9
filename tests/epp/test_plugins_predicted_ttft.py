"""predicted-ttft-scorer (ours): uncached tokens, queue, learnt speed, spreading when an engine
saturates; and, in a small deterministic discrete-event simulation of engines with a few
slots each, a hot shared prefix spreads over the engines instead of piling on one."""

from __future__ import annotations

import heapq
import random

import pytest
import yaml

from epp.framework import SchedulerDeps, build_scheduler, load_config
from epp.framework.cycle import CycleState
from epp.framework.params import Params
from epp.plugins import default_registry
from epp.plugins.precise_profile import precise_profile_config
from epp.plugins.predicted_ttft import PredictedTTFTParams, PredictedTTFTScorer, _parse
from epp.plugins.shared import PREFIX_MATCH_KEY, PrefixMatchInfo
from epp.types import (
    Endpoint,
    EngineMetrics,
    LLMRequest,
    ProfileResult,
    ResponseStats,
    SchedulingResult,
)


def _endpoints(n: int = 2) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}", 8000, metrics=EngineMetrics()) for i in range(n)]


def _request(rid: str = "r", max_tokens: int = 16) -> LLMRequest:
    return LLMRequest(request_id=rid, path="/v1/completions", model="m", max_tokens=max_tokens)


def _cycle(matched: dict[str, int], total: int = 2000) -> CycleState:
    cycle = CycleState()
    cycle.write(PREFIX_MATCH_KEY, PrefixMatchInfo(total, 16, dict(matched)))
    return cycle


def _scorer(**kw: object) -> PredictedTTFTScorer:
    return PredictedTTFTScorer("t", PredictedTTFTParams(**kw))  # type: ignore[arg-type]


def test_uncached_tokens_decide_between_idle_engines() -> None:
    a, b = _endpoints()
    scorer = _scorer()
    cycle = _cycle({a.key: 1600})
    scores = scorer.score(cycle, _request(), [a, b])
    est = scorer.estimates(cycle)
    assert est[a.key].uncached_tokens == 400 and est[b.key].uncached_tokens == 2000
    assert scores[0] == 1.0 and scores[1] < 0.5


def test_queue_position_costs_and_cap_is_learnt_from_metrics() -> None:
    a, b = _endpoints()
    a.metrics.running, a.metrics.waiting = 4, 3  # saturated: 4 is its cap
    b.metrics.running = 2
    scorer = _scorer(max_queue_position=0)
    cycle = _cycle({})
    scores = scorer.score(cycle, _request(), [a, b])
    est = scorer.estimates(cycle)
    assert scorer.caps == {a.key: 4}
    assert est[a.key].queue_position == 4 and est[a.key].running == 4
    assert est[b.key].queue_position == 0
    assert scores[1] == 1.0 and scores[0] < scores[1]


def test_in_flight_picks_count_before_the_next_scrape() -> None:
    config = yaml.safe_dump(
        {
            "kind": "EndpointPickerConfig",
            "plugins": [{"type": "predicted-ttft-scorer", "parameters": {"maxRunningRequests": 1}}],
        }
    )
    scheduler = build_scheduler(load_config(config, default_registry()), SchedulerDeps())
    eps = _endpoints(2)
    import asyncio

    async def run() -> list[str]:
        picks = []
        for i in range(4):  # metrics never change: only the picker's own counters do
            result = await scheduler.schedule(_request(str(i)), eps)
            picks.append(result.endpoints[0].key)
        return picks

    picks = asyncio.run(run())
    assert sorted(picks.count(e.key) for e in eps) == [2, 2]


def _observe(scorer: PredictedTTFTScorer, ep: Endpoint, rid: str, uncached: int, s: float) -> None:
    cycle = _cycle({ep.key: 2000 - uncached})
    request = _request(rid)
    scorer.score(cycle, request, [ep])
    result = SchedulingResult({"default": ProfileResult("default", [ep])}, "default")
    scorer.pre_request(cycle, request, result)
    scorer.on_response_complete(
        request, ResponseStats(served=ep.key, status=200, duration_s=s, completion_tokens=16)
    )


def test_prefill_speed_is_learnt_per_engine() -> None:
    slow, fast = _endpoints()
    scorer = _scorer(min_samples=5)
    rng = random.Random(1)
    for i in range(200):
        uncached = rng.randint(0, 2000)
        _observe(scorer, slow, f"s{i}", uncached, 0.05 + 1.0 * uncached / 1000)
        _observe(scorer, fast, f"f{i}", uncached, 0.05 + 0.1 * uncached / 1000)
    assert scorer.counters["learned"] == 400
    assert scorer.prefill_seconds_per_ktoken(slow.key) == pytest.approx(1.0, rel=0.1)
    assert scorer.prefill_seconds_per_ktoken(fast.key) == pytest.approx(0.1, rel=0.2)
    # The same cold prompt: the fast engine wins even though it is busier.
    fast.metrics.running = 2
    scores = scorer.score(_cycle({}), _request("x"), [slow, fast])
    assert scores[1] == 1.0 and scores[0] < 0.1


def test_a_slow_cache_hit_never_teaches_that_misses_are_faster() -> None:
    """What moved a real vLLM conversation off its engine (tests/real_vllm): a tiny model
    prefills 400 tokens in a few ms, so durations are decode and noise; a cold first turn that
    happened to be faster than the cached second turn fitted a negative prefill cost, and the
    third turn went to the engine that did not hold the conversation."""
    holder, other = _endpoints()
    scorer = _scorer()
    _observe(scorer, holder, "turn0", 400, 0.20)  # cold
    _observe(scorer, holder, "turn1", 40, 0.35)  # cached, slower: noise
    floor = 1.0 / scorer.params.max_prefill_tokens_per_second * 1000.0
    assert scorer.prefill_seconds_per_ktoken(holder.key) >= floor
    assert scorer.prefill_seconds_per_ktoken(other.key) >= floor
    for i in range(20):
        cycle = _cycle({holder.key: 420}, total=460)
        scores = scorer.score(cycle, _request(f"t{i}"), [holder, other])
        assert scores[0] == 1.0 and scores[1] < 1.0


def test_learnt_costs_keep_their_sign_whatever_the_samples() -> None:
    scorer = _scorer(min_samples=2)
    ep = _endpoints(1)[0]
    rng = random.Random(3)
    for i in range(300):  # durations unrelated to the features: pure noise
        _observe(scorer, ep, f"n{i}", rng.randint(0, 3000), rng.uniform(0.0, 2.0))
    floors = scorer.model.floors
    assert floors is not None
    models = [scorer.model.pooled["ttft"].model, scorer.model.endpoints[ep.key]["ttft"].model]
    for model in models:
        assert all(w >= f for w, f in zip(model.w, floors, strict=True))


def test_hot_prefix_spreads_when_its_engine_saturates() -> None:
    holder, other = _endpoints()
    holder.metrics.running, holder.metrics.waiting = 4, 12
    scorer = _scorer(max_queue_position=0, queue_wait_s=0.1, prefill_tokens_per_second=10_000)
    # Queue of 13 x 0.1 s against a 2000-token prefill (0.2 s, doubled by missPenalty).
    scores = scorer.score(_cycle({holder.key: 2000}), _request(), [holder, other])
    assert scores[1] == 1.0 and scores[0] < scores[1]
    # Not saturated: the prefix holder wins.
    holder.metrics.running, holder.metrics.waiting = 2, 0
    scores = scorer.score(_cycle({holder.key: 2000}), _request(), [holder, other])
    assert scores[0] == 1.0 and scores[1] < scores[0]


def test_max_queue_position_gates_a_saturated_engine() -> None:
    holder, other = _endpoints()
    holder.metrics.running, holder.metrics.waiting = 4, 1
    scorer = _scorer(max_queue_position=1, queue_wait_s=0.001)
    cycle = _cycle({holder.key: 2000})
    scorer.score(cycle, _request(), [holder, other])
    assert scorer.eligible(cycle, [holder, other]) == [False, True]
    assert scorer.counters["gated"] == 1


def test_parameters_parse() -> None:
    p = _parse(Params({"maxQueuePosition": 2, "missPenalty": 0.5, "queueWaitSeconds": "50ms"}))
    assert p.max_queue_position == 2 and p.miss_penalty == 0.5 and p.queue_wait_s == 0.05


def test_precise_profile_builds_with_the_scorer_by_default() -> None:
    doc = precise_profile_config(tokenizers={"m": "/x"}, events_endpoint="tcp://127.0.0.1:1")
    refs = [r["pluginRef"] for r in doc["schedulingProfiles"][0]["plugins"]]
    assert refs == ["predicted-ttft-scorer", "max-score-picker"]
    weighted = precise_profile_config(
        tokenizers={"m": "/x"}, events_endpoint="tcp://127.0.0.1:1", variant="weighted"
    )
    types = [p["type"] for p in weighted["plugins"]]
    assert "precise-prefix-cache-scorer" in types and "queue-scorer" in types


# -- a hot prefix on simulated engines ------------------------------------------------------

HOT = """\
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
- type: predicted-ttft-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: predicted-ttft-scorer
"""

SLOTS = 4
PREFIX_WORDS = 1600  # ~2000 tokens of shared system prompt


class _Engine:
    """A FIFO engine with SLOTS running requests and an LRU-free prefix cache (it keeps the
    one hot prefix once it has computed it): prefill 0.3 ms per uncached token, 4 ms a token."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.has_prefix = False
        self.running: list[float] = []  # end times
        self.queue: list[tuple[float, float]] = []  # (prefill, decode)
        self.served = 0


async def test_hot_prefix_spreads_over_simulated_engines() -> None:
    clock = [0.0]
    scheduler = build_scheduler(
        load_config(HOT, default_registry()),
        SchedulerDeps(clock=lambda: clock[0], rng=random.Random(3)),
    )
    engines = [_Engine(e) for e in _endpoints(4)]
    by_key = {e.endpoint.key: e for e in engines}
    prefix = " ".join(f"w{i}" for i in range(PREFIX_WORDS))
    events: list[tuple[float, int, str, str]] = []  # (end, seq, request id, engine key)
    requests: dict[str, LLMRequest] = {}
    seq = 0

    def start(engine: _Engine, now: float, rid: str) -> None:
        nonlocal seq
        uncached = 40 if engine.has_prefix else 2040
        engine.has_prefix = True
        end = now + 0.0003 * uncached + 0.004 * 16
        engine.running.append(end)
        seq += 1
        heapq.heappush(events, (end, seq, rid, engine.endpoint.key))

    def refresh() -> None:
        for e in engines:
            m = e.endpoint.metrics
            m.running, m.waiting = len(e.running), len(e.queue)

    pending: dict[str, list[str]] = {k: [] for k in by_key}
    clients = 32  # closed loop: each client sends its next request when one ends
    now = 0.0
    total = 0

    async def send(rid: str) -> None:
        nonlocal total
        total += 1
        refresh()
        request = LLMRequest(
            request_id=rid,
            path="/v1/completions",
            model="m",
            prompt=f"{prefix} user {rid}",
            max_tokens=16,
        )
        requests[rid] = request
        result = await scheduler.schedule(request, [e.endpoint for e in engines])
        engine = by_key[result.endpoints[0].key]
        engine.served += 1
        if len(engine.running) < SLOTS:
            start(engine, now, rid)
        else:
            pending[engine.endpoint.key].append(rid)
            engine.queue.append((0.0, 0.0))

    for c in range(clients):
        await send(f"c{c}-0")
    rounds = 0
    while events and total < 400:  # bounded: 400 requests
        rounds += 1
        end, _s, rid, key = heapq.heappop(events)
        now = clock[0] = end
        engine = by_key[key]
        engine.running.remove(end)
        stats = ResponseStats(served=key, status=200, duration_s=0.1, completion_tokens=16)
        scheduler.on_response_complete(requests.pop(rid), stats)
        if pending[key]:
            engine.queue.pop()
            start(engine, now, pending[key].pop(0))
        await send(f"{rid}+")
    served = [e.served for e in engines]
    mean = sum(served) / len(served)
    assert total == 400
    assert max(served) / mean <= 1.5, served
    assert all(e.has_prefix for e in engines)
