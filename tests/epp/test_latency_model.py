"""The online TTFT/TPOT model and its file."""

from __future__ import annotations

import json
import pathlib
import random

import pytest

from epp.framework import CycleState, SchedulerDeps, build_scheduler, load_config
from epp.latency import LatencyModel, LatencyModelFormatError, RecursiveLeastSquares
from epp.latency.model import QuantileTracker, features
from epp.latency.store import load_model, save_model
from epp.plugins import default_registry
from epp.plugins.predicted_latency import PredictedLatencyParams, PredictedLatencyScorer
from epp.types import (
    Endpoint,
    EngineMetrics,
    LLMRequest,
    ProfileResult,
    ResponseStats,
    SchedulingResult,
)

# Known cost: TTFT = 20 ms + 100 ms per 1k uncached tokens + 50 ms per waiting request
#                    + 10 ms per running request.
TRUE_W = [0.02, 0.1, 0.05, 0.01, 0.0, 0.0, 0.0]


def sample(rng: random.Random) -> tuple[list[float], float]:
    x = features(
        uncached_tokens=rng.randint(0, 8000),
        waiting=rng.randint(0, 20),
        running=rng.randint(0, 30),
        kv_usage=rng.random(),
        prompt_tokens=rng.randint(0, 8000),
        output_tokens=rng.randint(1, 1000),
    )
    y = sum(w * v for w, v in zip(TRUE_W, x, strict=True))
    return x, y


def test_rls_converges_to_the_known_cost() -> None:
    rng = random.Random(4)
    rls = RecursiveLeastSquares(forgetting=1.0)
    for _ in range(400):
        x, y = sample(rng)
        rls.update(x, y + rng.gauss(0, 0.005))
    for got, want in zip(rls.w[:4], TRUE_W[:4], strict=True):
        assert got == pytest.approx(want, abs=0.004)
    errors = []
    for _ in range(200):
        x, y = sample(rng)
        errors.append(abs(rls.predict(x) - y))
    assert sum(errors) / len(errors) < 0.01


def test_per_endpoint_models_learn_different_costs_with_pooled_prior() -> None:
    rng = random.Random(9)
    model = LatencyModel(min_samples=10)
    for _ in range(600):
        x, y = sample(rng)
        key = rng.choice(["fast", "slow"])
        model.observe(key, "ttft", x, y * (3.0 if key == "slow" else 1.0))
    x, y = sample(rng)
    assert model.predict("fast", x).ttft_s == pytest.approx(y, rel=0.1, abs=0.01)
    assert model.predict("slow", x).ttft_s == pytest.approx(3 * y, rel=0.1, abs=0.03)
    # An endpoint never seen gets the pooled model (between the two).
    pooled = model.predict("new", x).ttft_s
    assert y * 0.9 < pooled < 3 * y * 1.1
    # The TTFT-only prediction is the same number, for learnt, blended and unseen endpoints.
    for key in ("fast", "slow", "new"):
        assert model.predict_ttft(key, x) == model.predict(key, x).ttft_s


def test_quantile_tracker_finds_the_upper_quantile() -> None:
    rng = random.Random(1)
    q = QuantileTracker(0.9)
    for _ in range(20_000):
        q.update(rng.gauss(0.0, 1.0))
    assert q.value == pytest.approx(1.2816, abs=0.15)


def test_save_and_load_round_trip(tmp_path: pathlib.Path) -> None:
    rng = random.Random(2)
    model = LatencyModel()
    for _ in range(50):
        x, y = sample(rng)
        model.observe("10.0.0.1:8000", "ttft", x, y)
        model.observe("10.0.0.1:8000", "tpot", x, y / 100)
    path = tmp_path / "sub" / "latency.json"
    save_model(path, model)
    assert [p.name for p in path.parent.iterdir()] == ["latency.json"]  # no temp files left
    loaded = load_model(path)
    assert loaded is not None
    x, _ = sample(rng)
    assert loaded.predict("10.0.0.1:8000", x) == model.predict("10.0.0.1:8000", x)
    assert loaded.samples("10.0.0.1:8000") == 50
    assert load_model(tmp_path / "missing.json") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{nope", "not JSON"),
        ('{"format": "other"}', "not an epp-latency-model file"),
        ('{"format": "epp-latency-model", "version": 99}', "format version 99"),
        ('{"format": "epp-latency-model", "version": 1, "model": {}}', "malformed model"),
    ],
)
def test_bad_model_files_are_rejected_with_reason(
    tmp_path: pathlib.Path, content: str, message: str
) -> None:
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(LatencyModelFormatError, match=message):
        load_model(path)


def test_file_is_versioned_json(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "m.json"
    save_model(path, LatencyModel())
    doc = json.loads(path.read_text())
    assert doc["format"] == "epp-latency-model" and doc["version"] == 1
    assert doc["model"]["features"][0] == "bias"


async def test_scorer_loads_at_start_saves_at_stop_and_survives_a_corrupt_file(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "model.json"
    path.write_text("garbage")
    params = PredictedLatencyParams(model_path=str(path))
    scorer = PredictedLatencyScorer("p", params, clock=lambda: 0.0, observer=None)
    await scorer.start()
    assert scorer.load_error is not None and "not JSON" in scorer.load_error
    rng = random.Random(3)
    for _ in range(20):
        x, y = sample(rng)
        scorer.model.observe("a", "ttft", x, y)
    await scorer.stop()
    again = PredictedLatencyScorer("p", params, clock=lambda: 0.0, observer=None)
    await again.start()
    assert again.load_error is None and again.model.samples("a") == 20


def test_slo_headers_prefer_endpoints_predicted_to_meet_them() -> None:
    scorer = PredictedLatencyScorer(
        "p", PredictedLatencyParams(min_samples=1), clock=lambda: 0.0, observer=None
    )
    rng = random.Random(5)
    eps = [
        Endpoint(f"10.0.0.{i}", 80, metrics=EngineMetrics(waiting=w))
        for i, w in [(1, 0), (2, 4), (3, 10)]
    ]
    for _ in range(300):
        e = rng.choice(eps)
        w = rng.randint(0, 12)
        x = features(
            uncached_tokens=0,
            waiting=w,
            running=0,
            kv_usage=0.0,
            prompt_tokens=0,
            output_tokens=256,
        )
        scorer.model.observe(e.key, "ttft", x, 0.1 + 0.1 * w)  # 100 ms + 100 ms per waiting

    def req(**headers: str) -> LLMRequest:
        return LLMRequest(request_id="r", path="/", prompt="", headers=headers)

    plain = scorer.score(CycleState(), req(), eps)
    assert plain[0] == 1.0 and plain[2] == 0.0 and 0 < plain[1] < 1
    # 700 ms SLO: waiting 0 (100 ms) and 4 (500 ms) meet it with 10% headroom, 10 (1.1 s) not.
    slo = scorer.score(CycleState(), req(**{"x-slo-ttft-ms": "700"}), eps)
    assert slo[2] == 0.0 and slo[0] == 1.0 and slo[1] >= 0.5
    # Nobody can meet 50 ms: plain cost order.
    assert scorer.score(CycleState(), req(**{"x-slo-ttft-ms": "50"}), eps) == plain
    # Opt-out header: neutral.
    off = scorer.score(CycleState(), req(**{"x-prediction-based-scheduling": "false"}), eps)
    assert off == [1.0, 1.0, 1.0]


async def test_slo_gate_restricts_the_pick_even_against_heavier_scorers() -> None:
    config = load_config(
        "kind: EndpointPickerConfig\nplugins:\n- type: kv-cache-utilization-scorer\n"
        "- type: predicted-latency-scorer\n  parameters: {minSamples: 1}\n"
        "schedulingProfiles:\n- name: default\n  plugins:\n"
        "  - {pluginRef: kv-cache-utilization-scorer, weight: 100}\n"
        "  - {pluginRef: predicted-latency-scorer, weight: 1}\n",
        default_registry(),
    )
    s = build_scheduler(config, SchedulerDeps(rng=random.Random(0)))
    scorer = s.plugin("predicted-latency-scorer")
    assert isinstance(scorer, PredictedLatencyScorer)
    rng = random.Random(8)
    # kv usage is what the heavy scorer prefers; waiting is what the latency model learns.
    eps = [
        Endpoint("10.0.0.1", 80, metrics=EngineMetrics(waiting=0, kv_usage=0.9)),
        Endpoint("10.0.0.2", 80, metrics=EngineMetrics(waiting=9, kv_usage=0.0)),
        Endpoint("10.0.0.3", 80, metrics=EngineMetrics(waiting=12, kv_usage=0.1)),
    ]
    for _ in range(300):
        e = rng.choice(eps)
        w = rng.randint(0, 12)
        x = features(
            uncached_tokens=0,
            waiting=w,
            running=0,
            kv_usage=0.0,
            prompt_tokens=0,
            output_tokens=256,
        )
        scorer.model.observe(e.key, "ttft", x, 0.1 + 0.1 * w)

    def req(rid: str, **headers: str) -> LLMRequest:
        return LLMRequest(request_id=rid, path="/", prompt="", headers=headers)

    assert (await s.schedule(req("a"), eps)).endpoints[0].key == "10.0.0.2:80"  # no SLO
    met = await s.schedule(req("b", **{"x-slo-ttft-ms": "500"}), eps)
    assert met.endpoints[0].key == "10.0.0.1:80"  # the only one predicted within 500 ms
    # Nobody meets 10 ms: the lowest predicted latency, not the heavy scorer's favourite.
    unmet = await s.schedule(req("c", **{"x-slo-ttft-ms": "10"}), eps)
    assert unmet.endpoints[0].key == "10.0.0.1:80"
    assert scorer.counters["slo_unmet"] == 1


def test_model_is_saved_periodically_while_learning(tmp_path: pathlib.Path) -> None:
    now = [0.0]
    path = tmp_path / "m.json"
    scorer = PredictedLatencyScorer(
        "p",
        PredictedLatencyParams(model_path=str(path), save_interval_s=10.0),
        clock=lambda: now[0],
        observer=None,
    )
    ep = Endpoint("10.0.0.1", 80, metrics=EngineMetrics())
    result = SchedulingResult(
        profiles={"default": ProfileResult("default", [ep])}, primary_profile="default"
    )
    for i in range(3):
        now[0] = 6.0 * i
        r = LLMRequest(request_id=str(i), path="/", prompt="x" * 40, max_tokens=10)
        scorer.pre_request(CycleState(), r, result)
        scorer.on_response_complete(
            r,
            ResponseStats(
                served=ep.key,
                streamed=True,
                first_byte_s=0.2,
                duration_s=1.2,
                completion_tokens=10,
            ),
        )
        assert path.exists() == (i == 2)  # first save once 10 s have passed
    assert scorer.counters["learned_ttft"] == 3 and scorer.counters["learned_tpot"] == 3
    loaded = load_model(path)
    assert loaded is not None and loaded.samples(ep.key, "tpot") == 3
    # A response from a fallback endpoint or an error status teaches nothing.
    r = LLMRequest(request_id="x", path="/", prompt="")
    scorer.pre_request(CycleState(), r, result)
    scorer.on_response_complete(
        r, ResponseStats(served="10.9.9.9:80", streamed=True, first_byte_s=1)
    )
    assert scorer.counters["skipped"] == 1
