"""Load, affinity and in-flight scorers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.framework import CycleState
from epp.plugins.affinity import (
    LoraAffinityScorer,
    SessionAffinityScorer,
    SessionParams,
    decode_session_token,
    encode_session_token,
)
from epp.plugins.inflight import (
    ActiveRequestParams,
    ActiveRequestScorer,
    NoHitLRUParams,
    NoHitLRUScorer,
)
from epp.plugins.load import (
    KVCacheUtilizationScorer,
    LoadAwareParams,
    LoadAwareScorer,
    QueueScorer,
    RunningRequestsSizeScorer,
)
from epp.plugins.shared import PREFIX_MATCH_KEY, PrefixMatchInfo
from epp.types import (
    Endpoint,
    EngineMetrics,
    LLMRequest,
    ProfileResult,
    ResponseStats,
    SchedulingResult,
)


def ep(i: int, **metrics: object) -> Endpoint:
    return Endpoint(f"10.0.0.{i}", 8000, pod_name=f"pod-{i}", metrics=EngineMetrics(**metrics))  # type: ignore[arg-type]


def req(rid: str = "r", **kw: object) -> LLMRequest:
    return LLMRequest(request_id=rid, path="/v1/completions", **kw)  # type: ignore[arg-type]


def decided(endpoint: Endpoint) -> SchedulingResult:
    return SchedulingResult(
        profiles={"default": ProfileResult("default", [endpoint])}, primary_profile="default"
    )


def test_queue_scorer_min_max() -> None:
    eps = [ep(1, waiting=0), ep(2, waiting=5), ep(3, waiting=10)]
    assert QueueScorer("q").score(CycleState(), req(), eps) == [1.0, 0.5, 0.0]
    assert QueueScorer("q").score(CycleState(), req(), eps[:1] * 2) == [1.0, 1.0]


def test_kv_and_running_scorers() -> None:
    eps = [ep(1, kv_usage=0.25, running=2), ep(2, kv_usage=1.0, running=6)]
    assert KVCacheUtilizationScorer("k").score(CycleState(), req(), eps) == [0.75, 0.0]
    assert RunningRequestsSizeScorer("r").score(CycleState(), req(), eps) == [1.0, 0.0]


def test_load_aware_formula_matches_llmd() -> None:
    s = LoadAwareScorer("l", LoadAwareParams(threshold=128))
    eps = [ep(1, waiting=0), ep(2, waiting=64), ep(3, waiting=128), ep(4, waiting=500)]
    assert s.score(CycleState(), req(), eps) == [0.5, 0.25, 0.0, 0.0]


@given(st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=20))
def test_load_scores_stay_in_unit_interval(waiting: list[int]) -> None:
    eps = [ep(i, waiting=w, running=w) for i, w in enumerate(waiting)]
    for scorer in (
        QueueScorer("q"),
        RunningRequestsSizeScorer("r"),
        LoadAwareScorer("l", LoadAwareParams()),
    ):
        scores = scorer.score(CycleState(), req(), eps)
        assert len(scores) == len(eps)
        assert all(0.0 <= s <= 1.0 for s in scores)


def test_lora_affinity_tiers() -> None:
    eps = [
        ep(1, running_loras=frozenset({"a"}), max_loras=1),
        ep(2, running_loras=frozenset({"b"}), max_loras=4),
        ep(3, running_loras=frozenset({"b"}), waiting_loras=frozenset({"a"}), max_loras=2),
        ep(4, running_loras=frozenset({"b"}), max_loras=1),
    ]
    scorer = LoraAffinityScorer("lora")
    assert scorer.score(CycleState(), req(lora="a"), eps) == [1.0, 0.8, 0.6, 0.0]
    assert scorer.score(CycleState(), req(), eps) == [1.0] * 4


def test_session_affinity_by_session_id_and_token() -> None:
    s = SessionAffinityScorer("s", SessionParams(max_sessions=2))
    eps = [ep(1), ep(2), ep(3)]
    first = req("1", headers={"x-session-id": "alice"})
    assert s.score(CycleState(), first, eps) == [0.0, 0.0, 0.0]
    result = decided(eps[1])
    s.pre_request(CycleState(), first, result)
    token = result.response_headers["x-session-token"]
    assert decode_session_token(token) == "10.0.0.2:8000"
    again = req("2", headers={"x-session-id": "alice"})
    assert s.score(CycleState(), again, eps) == [0.0, 1.0, 0.0]
    # The token alone routes (also llm-d's pod-name encoding).
    assert s.score(CycleState(), req("3", headers={"x-session-token": token}), eps)[1] == 1.0
    by_pod = encode_session_token("pod-3")
    assert s.score(CycleState(), req("4", headers={"x-session-token": by_pod}), eps)[2] == 1.0
    # A garbled token is counted, not fatal.
    assert s.score(CycleState(), req("5", headers={"x-session-token": "%%%"}), eps) == [0.0] * 3
    assert s.invalid_tokens == 1
    # The proxy fell back to another endpoint: the session follows where it was served.
    s.on_response_headers(again, "10.0.0.3:8000")
    assert s.score(CycleState(), again, eps) == [0.0, 0.0, 1.0]
    # LRU bound.
    for name in ("bob", "carol"):
        s.pre_request(CycleState(), req(name, headers={"x-session-id": name}), decided(eps[0]))
    assert s.sessions() == 2
    assert s.score(CycleState(), again, eps) == [0.0, 0.0, 0.0]  # alice evicted


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_active_request_tracks_picks_completions_and_timeouts() -> None:
    clock = Clock()
    s = ActiveRequestScorer("a", ActiveRequestParams(request_timeout_s=10.0), clock)
    eps = [ep(1), ep(2), ep(3)]
    assert s.score(CycleState(), req(), eps) == [1.0, 1.0, 1.0]
    for rid, e in (("a", eps[0]), ("b", eps[0]), ("c", eps[1])):
        s.pre_request(CycleState(), req(rid), decided(e))
    assert s.counts == {"10.0.0.1:8000": 2, "10.0.0.2:8000": 1}
    assert s.score(CycleState(), req(), eps) == [0.0, 0.5, 1.0]
    s.on_response_complete(req("a"), ResponseStats(served="10.0.0.1:8000"))
    assert s.counts == {"10.0.0.1:8000": 1, "10.0.0.2:8000": 1}
    clock.now = 11.0  # b and c time out
    assert s.score(CycleState(), req(), eps) == [1.0, 1.0, 1.0]
    assert s.expired == 2 and s.in_flight() == 0
    # A late completion for an expired request changes nothing.
    s.on_response_complete(req("b"), ResponseStats(served="10.0.0.1:8000"))
    assert s.counts == {}


def test_active_request_idle_threshold_and_max_busy_score() -> None:
    s = ActiveRequestScorer("a", ActiveRequestParams(idle_threshold=1, max_busy_score=0.5), Clock())
    eps = [ep(1), ep(2), ep(3)]
    for rid, e in (("a", eps[0]), ("b", eps[1]), ("c", eps[1]), ("d", eps[2])):
        s.pre_request(CycleState(), req(rid), decided(e))
    for rid in ("e", "f"):
        s.pre_request(CycleState(), req(rid), decided(eps[2]))
    # counts 1, 2, 3; idle <= 1 -> 1.0; busy: (3 - c) / 3 * 0.5
    assert s.score(CycleState(), req(), eps) == pytest.approx([1.0, 1 / 6, 0.0])


def _cycle_with_prefix(hits: dict[str, int]) -> CycleState:
    cycle = CycleState()
    cycle.write(PREFIX_MATCH_KEY, PrefixMatchInfo(100, 16, hits))
    return cycle


def test_no_hit_lru_sends_cold_requests_to_least_recently_used() -> None:
    s = NoHitLRUScorer("n", NoHitLRUParams())
    eps = [ep(1), ep(2), ep(3)]
    order = []
    for i in range(6):
        cycle = _cycle_with_prefix({})
        scores = s.score(cycle, req(str(i)), eps)
        best = eps[max(range(3), key=lambda j: scores[j])]
        order.append(best.key)
        s.pre_request(cycle, req(str(i)), decided(best))
    # Round-robin over endpoints for cold requests.
    assert order[:3] == ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
    assert order[3:] == order[:3]
    # A warm request scores neutral and does not touch the LRU.
    warm = _cycle_with_prefix({"10.0.0.2:8000": 32})
    assert s.score(warm, req("w"), eps) == [0.5, 0.5, 0.5]
    s.pre_request(warm, req("w"), decided(eps[2]))
    cold = _cycle_with_prefix({})
    assert s.score(cold, req("c"), eps) == [1.0, 0.5, 0.0]
