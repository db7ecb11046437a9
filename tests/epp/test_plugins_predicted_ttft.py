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
    scorer = _scorer(min_samples=5, per_endpoint=True)
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
    # The holder's last scrape still shows the previous turn running (the second failure in
    # tests/real_vllm: b, b, b, a): the running tie-breaker never outweighs the hit.
    holder.metrics.running = 1
    scores = scorer.score(_cycle({holder.key: 420}, total=460), _request("late"), [holder, other])
    assert scores[0] == 1.0 and scores[1] < 1.0


def test_learnt_costs_keep_their_sign_whatever_the_samples() -> None:
    scorer = _scorer(min_samples=2, per_endpoint=True)
    ep = _endpoints(1)[0]
    rng = random.Random(3)
    for i in range(300):  # durations unrelated to the features: pure noise
        _observe(scorer, ep, f"n{i}", rng.randint(0, 3000), rng.uniform(0.0, 2.0))
    floors = scorer.model.floors
    assert floors is not None
    models = [scorer.model.pooled["ttft"].model, scorer.model.endpoints[ep.key]["ttft"].model]
    for model in models:
        assert all(w >= f for w, f in zip(model.w, floors, strict=True))


def _full_and_roomy(resident: dict[str, int] | None) -> tuple[Endpoint, Endpoint, CycleState]:
    full, roomy = _endpoints()
    for ep in (full, roomy):
        ep.metrics.num_gpu_blocks, ep.metrics.block_size = 480, 16
    roomy.metrics.running = 1  # busier at this instant
    cycle = CycleState()
    cycle.write(PREFIX_MATCH_KEY, PrefixMatchInfo(2000, 16, {}, resident_blocks=resident))
    return full, roomy, cycle


def test_a_new_prefix_goes_where_it_fits_not_where_it_evicts() -> None:
    """Nobody holds the prompt: the idle engine whose cache is full would evict someone
    else's prefix for its 125 blocks; the other, one request busier, has them free."""
    full, roomy, cycle = _full_and_roomy({"10.0.0.0:8000": 480, "10.0.0.1:8000": 200})
    scorer = _scorer()
    scores = scorer.score(cycle, _request(), [full, roomy])
    assert scores[1] == 1.0 and scores[0] < 0.5


def test_a_new_prefix_goes_to_the_emptier_engine_while_both_have_room() -> None:
    """Both engines have room for the new prefix's 141 blocks, but the prefixes an engine
    holds grow with every turn: the one two-thirds full evicts sooner than the one a quarter
    full (benchmarks/RESULTS.md: four tenants on one engine of the chat open loop evicted
    their own conversations). `occupancyWeight: 0` restores the idle engine's win."""
    fuller, emptier, cycle = _full_and_roomy({"10.0.0.0:8000": 320, "10.0.0.1:8000": 120})
    scores = _scorer().score(cycle, _request(), [fuller, emptier])
    assert scores[1] == 1.0 and scores[0] < 0.5
    fuller, emptier, cycle = _full_and_roomy({"10.0.0.0:8000": 320, "10.0.0.1:8000": 120})
    scores = _scorer(occupancy_weight=0.0).score(cycle, _request(), [fuller, emptier])
    assert scores[0] == 1.0 and scores[1] > 0.9  # only the running tie-breaker left


def test_the_occupancy_charge_never_outweighs_a_cache_hit() -> None:
    """The holder is nearly full, the other engine empty: the hit still wins by far."""
    holder, other = _endpoints()
    for ep in (holder, other):
        ep.metrics.num_gpu_blocks, ep.metrics.block_size = 480, 16
    cycle = CycleState()
    resident = {holder.key: 470, other.key: 0}
    cycle.write(PREFIX_MATCH_KEY, PrefixMatchInfo(2000, 16, {holder.key: 1900}, "", None, resident))
    scores = _scorer().score(cycle, _request(), [holder, other])
    assert scores[0] == 1.0 and scores[1] < 0.2


def test_without_residency_or_capacity_the_idle_engine_wins() -> None:
    full, roomy, cycle = _full_and_roomy(None)  # a remote index: no residency
    assert _scorer().score(cycle, _request(), [full, roomy])[0] == 1.0
    full, roomy, cycle = _full_and_roomy({"10.0.0.0:8000": 480, "10.0.0.1:8000": 200})
    full.metrics.num_gpu_blocks = roomy.metrics.num_gpu_blocks = None  # no cache geometry
    assert _scorer().score(cycle, _request(), [full, roomy])[0] == 1.0


def test_every_engine_full_charges_what_the_old_rule_did() -> None:
    """Once every cache is full a miss evicts wherever it goes: the holder still wins by the
    prefill it saves plus its miss penalty, exactly as without residency."""
    holder, other = _endpoints()
    for ep in (holder, other):
        ep.metrics.num_gpu_blocks, ep.metrics.block_size = 480, 16
    resident = {holder.key: 480, other.key: 480}
    with_res, without = CycleState(), CycleState()
    with_res.write(
        PREFIX_MATCH_KEY, PrefixMatchInfo(2000, 16, {holder.key: 1600}, "", None, resident)
    )
    without.write(PREFIX_MATCH_KEY, PrefixMatchInfo(2000, 16, {holder.key: 1600}))
    scorer = _scorer()
    scorer.score(with_res, _request(), [holder, other])
    scorer.score(without, _request(), [holder, other])
    a, b = scorer.estimates(with_res), scorer.estimates(without)
    # Full everywhere: each engine is charged all it stores (it evicts that much), so both
    # costs rise by the same 416 tokens' prefill and the difference - all the scores see -
    # is the old rule's (the 1600 tokens the other engine would store a second copy of).
    gap_with = a[other.key].ttft_s - a[holder.key].ttft_s
    gap_without = b[other.key].ttft_s - b[holder.key].ttft_s
    assert gap_with == pytest.approx(gap_without, rel=0.01)
    assert a[holder.key].ttft_s > b[holder.key].ttft_s


def test_a_burst_of_new_prefixes_counts_the_blocks_in_flight() -> None:
    """Eight requests at once, nothing in the event stream yet: the first one's blocks are
    still being computed when the second is placed; counting them, the second (which would
    not fit beside them) goes to the other engine."""
    a, b = _endpoints()
    for ep in (a, b):
        ep.metrics.num_gpu_blocks, ep.metrics.block_size = 150, 16
    scorer = _scorer()

    def place(rid: str) -> list[float]:
        cycle = CycleState()
        cycle.write(PREFIX_MATCH_KEY, PrefixMatchInfo(1600, 16, {}, resident_blocks={}))
        request = _request(rid)
        scores = scorer.score(cycle, request, [a, b])
        picked = a if scores[0] >= scores[1] else b
        result = SchedulingResult({"default": ProfileResult("default", [picked])}, "default")
        scorer.pre_request(cycle, request, result)
        return scores

    assert place("first")[0] == 1.0  # a tie: both empty (the lower index wins here)
    assert scorer.reserved_tokens(a.key) == pytest.approx(1616)
    second = place("second")
    assert second[1] == 1.0 and second[0] < 0.5
    # Responses end: their reservations go.
    for rid, ep in (("first", a), ("second", b)):
        scorer.on_response_complete(
            _request(rid), ResponseStats(served=ep.key, status=200, duration_s=0.5)
        )
    assert scorer.reserved_tokens(a.key) == scorer.reserved_tokens(b.key) == 0.0


def test_kv_usage_and_running_are_not_learnt() -> None:
    """In a closed loop, durations rise with KV usage and the running count (a full engine
    queues inside, a miss fills the cache and holds its slot longest). A fit that learnt
    them charged the engine holding a prefix for its full cache, and sent the prefix's
    requests away from it: here, learning KV usage at 2 s per unit, the idle engine that
    holds nothing would win by 0.5 s."""
    holder, other = _endpoints()
    scorer = _scorer()
    for i in range(240):
        kv = 0.9 if i % 2 else 0.2
        uncached = 1600 if i % 4 >= 2 else 64
        holder.metrics.kv_usage = kv
        _observe(scorer, holder, f"o{i}", uncached, 2.0 * kv + 0.27 * uncached / 1000)
    holder.metrics.kv_usage, other.metrics.kv_usage = 0.95, 0.05
    scores = scorer.score(_cycle({holder.key: 1936}), _request("x"), [holder, other])
    assert scores[0] == 1.0 and scores[1] < 0.5


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
