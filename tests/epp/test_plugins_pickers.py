"""Pickers."""

from __future__ import annotations

import random
from collections import Counter

from epp.framework import CycleState, ScoredEndpoint
from epp.plugins.pickers import MaxScorePicker, PickerParams, RandomPicker, WeightedRandomPicker
from epp.types import Endpoint, LLMRequest

REQ = LLMRequest(request_id="r", path="/")


def scored(*scores: float) -> list[ScoredEndpoint]:
    return [ScoredEndpoint(Endpoint(f"10.0.0.{i}", 80), s) for i, s in enumerate(scores)]


def keys(endpoints: list[Endpoint]) -> list[str]:
    return [e.key for e in endpoints]


def test_max_score_single_and_fallback_list() -> None:
    one = MaxScorePicker("m", PickerParams(1), random.Random(0))
    assert keys(one.pick(CycleState(), REQ, scored(0.1, 0.9, 0.5))) == ["10.0.0.1:80"]
    three = MaxScorePicker("m", PickerParams(3), random.Random(0))
    assert keys(three.pick(CycleState(), REQ, scored(0.1, 0.9, 0.5, 0.7))) == [
        "10.0.0.1:80",
        "10.0.0.3:80",
        "10.0.0.2:80",
    ]
    # Fewer candidates than maxNumOfEndpoints: all of them.
    assert len(three.pick(CycleState(), REQ, scored(0.3, 0.2))) == 2


def test_max_score_breaks_ties_randomly() -> None:
    picker = MaxScorePicker("m", PickerParams(1), random.Random(3))
    seen = Counter(
        keys(picker.pick(CycleState(), REQ, scored(1.0, 1.0, 0.0, 1.0)))[0] for _ in range(300)
    )
    assert set(seen) == {"10.0.0.0:80", "10.0.0.1:80", "10.0.0.3:80"}


def test_random_picker_ignores_scores_and_returns_distinct_endpoints() -> None:
    picker = RandomPicker("r", PickerParams(2), random.Random(5))
    for _ in range(50):
        got = keys(picker.pick(CycleState(), REQ, scored(0.0, 1.0, 0.0, 0.0)))
        assert len(set(got)) == 2
    seen = Counter(
        keys(picker.pick(CycleState(), REQ, scored(0.0, 1.0, 0.0, 0.0)))[0] for _ in range(400)
    )
    assert len(seen) == 4


def test_weighted_random_is_proportional_to_score() -> None:
    picker = WeightedRandomPicker("w", PickerParams(1), random.Random(11))
    n = 20_000
    seen = Counter(keys(picker.pick(CycleState(), REQ, scored(1.0, 3.0, 0.0)))[0] for _ in range(n))
    assert "10.0.0.2:80" not in seen  # zero score never picked while others are positive
    share = seen["10.0.0.1:80"] / n
    assert 0.72 < share < 0.78  # expected 0.75; seeded, so deterministic


def test_weighted_random_fallbacks_put_zero_scores_last_and_uniform_when_all_zero() -> None:
    picker = WeightedRandomPicker("w", PickerParams(3), random.Random(2))
    got = keys(picker.pick(CycleState(), REQ, scored(0.0, 2.0, 1.0)))
    assert got[2] == "10.0.0.0:80" and set(got[:2]) == {"10.0.0.1:80", "10.0.0.2:80"}
    one = WeightedRandomPicker("w", PickerParams(1), random.Random(2))
    seen = Counter(keys(one.pick(CycleState(), REQ, scored(0.0, 0.0, 0.0)))[0] for _ in range(300))
    assert len(seen) == 3
