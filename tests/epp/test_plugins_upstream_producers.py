"""llm-d's data producers: they run before the profiles and feed the same cycle-state data
the scorers read (prefix matches, in-flight load, latency predictions, token ids)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from epp.framework import (
    ConfigError,
    CycleState,
    RecordingObserver,
    SchedulerDeps,
    build_scheduler,
    load_config,
)
from epp.plugins import default_registry
from epp.plugins.capacity import TokenLoadScorer
from epp.plugins.precise_prefix import PREFIX_BACKEND_FACTORY, PrecisePrefixParams
from epp.plugins.producers import (
    InFlightLoadProducer,
    PredictedLatencyProducer,
    TokenProducer,
    estimate_request_tokens,
)
from epp.plugins.shared import inflight_load, latency_predictions, prefix_match
from epp.types import Endpoint, EngineMetrics, LLMRequest, ResponseStats
from kvindex.tokenize import load_tokenizer
from kvindex.tokenize import uds as uds_module
from kvtools.demo.model import write_model_dir
from tests.uds_sidecar import SidecarDouble, short_socket_path


def pod(i: int, waiting: int = 0, labels: Mapping[str, str] | None = None) -> Endpoint:
    return Endpoint(
        f"10.2.0.{i}",
        8000,
        labels=dict(labels or {}),
        metrics=EngineMetrics(waiting=waiting, updated_at=time.monotonic()),
    )


def req(rid: str, prompt: str, **kw: Any) -> LLMRequest:
    return LLMRequest(request_id=rid, path="/v1/completions", model="m", prompt=prompt, **kw)


APPROX = """\
plugins:
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 4}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: approx-prefix-cache-producer}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
"""


async def test_approx_producer_feeds_the_prefix_scorer_and_learns_the_pick() -> None:
    s = build_scheduler(
        load_config(APPROX, default_registry()), SchedulerDeps(rng=random.Random(1))
    )
    pool = [pod(1), pod(2), pod(3)]
    prompt = "abcd" * 40  # 40 tokens, 10 blocks of 4
    first = await s.schedule(req("a", prompt), pool)
    picked = first.endpoints[0].key
    second = await s.schedule(req("b", prompt), pool)
    assert second.endpoints[0].key == picked  # the producer's index remembered the pick
    scores = second.profiles["default"].scores
    assert scores[picked] == pytest.approx(1.0)
    assert all(v == 0.0 for k, v in scores.items() if k != picked)
    # One index: the scorer consumed the producer's data and kept nothing itself.
    scorer = s.plugin("prefix-cache-scorer")
    assert scorer.index.servers() == []  # type: ignore[attr-defined]


async def test_approx_producer_writes_match_info_with_endpoint_scores() -> None:
    config = load_config(APPROX, default_registry())
    s = build_scheduler(config)
    producer = s.plugin("approx-prefix-cache-producer")
    cycle = CycleState()
    pool = [pod(1), pod(2)]
    producer.produce(cycle, req("a", "x" * 64), pool)  # type: ignore[attr-defined]
    info = prefix_match(cycle)
    assert info is not None and info.source == "approx-prefix-cache-producer"
    assert info.endpoint_scores == {"10.2.0.1:8000": 0.0, "10.2.0.2:8000": 0.0}


def test_approx_producer_parameters_as_upstream() -> None:
    config = load_config(
        "plugins:\n- type: approx-prefix-cache-producer\n"
        "  parameters: {blockSizeTokens: 8, maxPrefixTokensToMatch: 64}\n",
        default_registry(),
    )
    params = config.plugin("approx-prefix-cache-producer").parameters
    assert params.block_size_tokens == 8 and params.max_prefix_blocks_to_match == 8
    default = load_config("plugins:\n- type: approx-prefix-cache-producer\n", default_registry())
    assert (
        default.plugin("approx-prefix-cache-producer").parameters.max_prefix_blocks_to_match == 256
    )
    with pytest.raises(ConfigError, match="blockSizeTokens"):
        load_config(
            "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSize: 64}\n",
            default_registry(),
        )


# --- inflight-load-producer and token-load-scorer -------------------------------------------

INFLIGHT = """\
plugins:
- type: inflight-load-producer
- type: token-load-scorer
  parameters: {queueThresholdTokens: 1000}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: token-load-scorer
  - pluginRef: max-score-picker
"""


def test_token_estimate_is_upstreams_body_bytes_over_four_plus_one_and_a_half() -> None:
    assert estimate_request_tokens(req("a", "", raw_body=b"x" * 400)) == 100 + 150
    assert estimate_request_tokens(req("a", "y" * 40)) == 10 + 15
    assert estimate_request_tokens(req("a", "")) == 0


async def test_inflight_producer_counts_picks_until_completion_and_token_load_spreads() -> None:
    s = build_scheduler(
        load_config(INFLIGHT, default_registry()), SchedulerDeps(rng=random.Random(3))
    )
    producer = s.plugin("inflight-load-producer")
    scorer = s.plugin("token-load-scorer")
    assert isinstance(producer, InFlightLoadProducer) and isinstance(scorer, TokenLoadScorer)
    assert scorer.tracker is producer  # the configured producer's counters are shared
    pool = [pod(1), pod(2)]
    big = req("a", "", raw_body=b"x" * 800)  # 200 + 300 tokens
    first = await s.schedule(big, pool)
    busy = first.endpoints[0].key
    assert producer.load(busy).requests == 1 and producer.load(busy).tokens == 500
    second = await s.schedule(req("b", "", raw_body=b"x" * 40), pool)
    assert second.endpoints[0].key != busy  # 1 - 500/1000 = 0.5 against 1.0
    assert second.profiles["default"].scores[busy] == pytest.approx(0.5)
    s.on_response_complete(big, ResponseStats(served=busy))
    assert producer.load(busy).requests == 0


async def test_inflight_producer_snapshot_is_in_the_cycle_and_prefill_released_at_headers() -> None:
    producer = InFlightLoadProducer("inflight")
    from epp.types import ProfileResult, SchedulingResult

    a, b = pod(1), pod(2)
    request = req("r", "z" * 40)
    result = SchedulingResult(
        profiles={
            "decode": ProfileResult("decode", [a]),
            "prefill": ProfileResult("prefill", [b]),
        },
        primary_profile="decode",
    )
    producer.pre_request(CycleState(), request, result)
    cycle = CycleState()
    producer.produce(cycle, req("other", ""), [a, b])
    snapshot = inflight_load(cycle)
    assert snapshot is not None and snapshot[a.key].requests == 1 and snapshot[b.key].requests == 1
    producer.on_response_headers(request, a.key)
    assert producer.load(b.key).requests == 0 and producer.load(a.key).requests == 1
    producer.on_response_complete(request, ResponseStats(served=a.key))
    assert producer.load(a.key).requests == 0


async def test_token_load_scorer_without_a_producer_gets_the_default_one() -> None:
    text = INFLIGHT.replace("- type: inflight-load-producer\n", "")
    s = build_scheduler(load_config(text, default_registry()), SchedulerDeps(rng=random.Random(0)))
    scorer = s.plugin("token-load-scorer")
    producer = s.plugin("inflight-load-producer")  # added, as llm-d's default producer
    assert isinstance(scorer, TokenLoadScorer) and scorer.tracker is producer
    pool = [pod(1), pod(2)]
    first = await s.schedule(req("a", "", raw_body=b"x" * 4000), pool)
    assert scorer.tracker.load(first.endpoints[0].key).tokens == 2500


# --- predicted-latency-producer -------------------------------------------------------------


def test_latency_producer_headroom_against_slo_headers() -> None:
    config = load_config(
        "plugins:\n- type: predicted-latency-producer\n  parameters: {streamingMode: true}\n",
        default_registry(),
    )
    s = build_scheduler(config)
    producer = s.plugin("predicted-latency-producer")
    assert isinstance(producer, PredictedLatencyProducer)
    cycle = CycleState()
    pool = [pod(1), pod(2, waiting=10)]
    request = req("a", "hello", headers={"x-slo-ttft-ms": "100000", "x-slo-tpot-ms": "1"})
    for endpoint in pool:  # teach the model a 50 ms TPOT everywhere
        x, _ = producer.predictor.predict(cycle, request, endpoint)
        for _ in range(20):
            producer.predictor.model.observe(endpoint.key, "tpot", x, 0.05)
    producer.produce(cycle, request, pool)
    predictions = latency_predictions(cycle)
    assert predictions is not None and set(predictions) == {pool[0].key, pool[1].key}
    info = predictions[pool[0].key]
    assert info.ttft_valid and info.ttft_headroom_ms == pytest.approx(100000 - info.ttft_ms)
    assert info.tpot_ms == pytest.approx(50, rel=0.2)
    assert info.tpot_headroom_ms == pytest.approx(1 - info.tpot_ms) and not info.tpot_valid


def test_latency_producer_without_streaming_neutralises_tpot() -> None:
    config = load_config("plugins:\n- type: predicted-latency-producer\n", default_registry())
    producer = build_scheduler(config).plugin("predicted-latency-producer")
    cycle = CycleState()
    request = req("a", "hello", headers={"x-slo-tpot-ms": "0.000001"})
    producer.produce(cycle, request, [pod(1)])  # type: ignore[attr-defined]
    info = (latency_predictions(cycle) or {})["10.2.0.1:8000"]
    assert info.tpot_valid and info.tpot_headroom_ms == 0.0


def test_latency_producer_parameters_as_upstream() -> None:
    config = load_config(
        "plugins:\n- type: predicted-latency-producer\n  parameters:\n"
        "    samplingMean: 500\n    sloBufferFactor: 1.2\n    contextTTL: 1m\n"
        "    endpointRoleLabel: llm-d.ai/role\n    predictInProduce: false\n",
        default_registry(),
    )
    p = config.plugin("predicted-latency-producer").parameters
    assert p.sampling_mean == 500 and p.slo_buffer_factor == 1.2 and p.context_ttl_s == 60
    assert not p.predict_in_produce
    with pytest.raises(ConfigError, match="samplingMean"):
        load_config(
            "plugins:\n- type: predicted-latency-producer\n  parameters: {samplingMean: 0}\n",
            default_registry(),
        )


def test_predicted_latency_scorer_accepts_upstream_parameters() -> None:
    config = load_config(
        "plugins:\n- type: predicted-latency-scorer\n  parameters:\n"
        "    samplingMean: 1000.0\n    sloBufferFactor: 2\n    headroomSelectionStrategy: least\n"
        "    maxDecodeTokenSamplesForPrediction: 5\n",
        default_registry(),
    )
    assert config.plugin("predicted-latency-scorer").parameters.slo_buffer_factor == 2.0


async def test_latency_producer_learns_end_to_end_latency_when_not_streaming() -> None:
    config = load_config("plugins:\n- type: predicted-latency-producer\n", default_registry())
    s = build_scheduler(config, SchedulerDeps(observer=RecordingObserver()))
    producer = s.plugin("predicted-latency-producer")
    assert isinstance(producer, PredictedLatencyProducer)
    pool = [pod(1)]
    request = req("a", "hello")
    await s.schedule(request, pool)
    s.on_response_complete(
        request, ResponseStats(served=pool[0].key, streamed=False, first_byte_s=2.0, duration_s=2.0)
    )
    assert producer.predictor.counters["learned_ttft"] == 1


# --- token-producer ---------------------------------------------------------------------------


async def test_token_producer_tokenizes_through_vllm_render() -> None:
    seen: list[dict[str, Any]] = []

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response([{"token_ids": [1, 2, 3]}])

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response({"token_ids": [9, 8]})

    app = web.Application()
    app.router.add_post("/v1/completions/render", completions)
    app.router.add_post("/v1/chat/completions/render", chat)
    async with TestServer(app) as server:
        url = str(server.make_url("")).rstrip("/")
        config = load_config(
            "plugins:\n- type: token-producer\n  parameters:\n"
            f"    modelName: org/model\n    vllm: {{url: '{url}'}}\n",
            default_registry(),
        )
        s = build_scheduler(config)
        await s.start()
        try:
            completion = req("a", "hello")
            await s.schedule(completion, [pod(1)])
            assert completion.token_ids == [1, 2, 3]
            chat_request = LLMRequest(
                request_id="b",
                path="/v1/chat/completions",
                model="m",
                messages=[{"role": "user", "content": "hi"}],
            )
            await s.schedule(chat_request, [pod(1)])
            assert chat_request.token_ids == [9, 8]
            tokenized = req("c", "x", token_ids=[5])
            await s.schedule(tokenized, [pod(1)])  # already tokenized: not asked again
            assert len(seen) == 2 and seen[0]["model"] == "org/model"
        finally:
            await s.stop()


async def test_token_producer_failure_is_counted_and_the_request_still_scheduled() -> None:
    config = load_config(
        "plugins:\n- type: token-producer\n  parameters:\n"
        "    modelName: m\n    vllm: {http: 'http://127.0.0.1:9', timeout: 100ms}\n",
        default_registry(),
    )
    s = build_scheduler(config)
    await s.start()
    try:
        result = await s.schedule(req("a", "hello"), [pod(1)])
        assert result.endpoints[0].key == "10.2.0.1:8000"
        assert s.stats.errors.get("token-producer", 0) == 1
    finally:
        await s.stop()


async def test_token_producer_over_the_tokenizer_sidecar_socket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # llm-d's tokenizer sidecar protocol on a real Unix socket (a double, tests/uds_sidecar.py).
    model_dir = write_model_dir(tmp_path / "model")
    sidecar = SidecarDouble({"m": model_dir})
    await sidecar.start(short_socket_path())
    config = load_config(
        "plugins:\n- type: tokenizer\n  parameters:\n    modelName: m\n"
        f"    udsTokenizerConfig: {{socketFile: {sidecar.socket_file}}}\n",
        default_registry(),
    )
    with caplog.at_level(logging.WARNING):
        s = build_scheduler(config)
    assert "deprecated" in caplog.text
    assert isinstance(s.plugin("tokenizer"), TokenProducer)
    await s.start()
    try:
        request = req("a", "hello sidecar")
        await s.schedule(request, [pod(1)])
        assert request.token_ids == load_tokenizer(model_dir).encode("hello sidecar", True)
        assert [r.prompt for r in sidecar.rpcs("RenderCompletion")] == ["hello sidecar"]
    finally:
        await s.stop()
        await sidecar.stop()


async def test_token_producer_without_its_sidecar_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(uds_module, "_INIT_BACKOFF_S", 0.01)
    missing = short_socket_path()
    config = load_config(
        "plugins:\n- type: token-producer\n  parameters:\n    modelName: m\n"
        f"    udsTokenizerConfig: {{socketFile: {missing}}}\n",
        default_registry(),
    )
    s = build_scheduler(config)
    with pytest.raises(ConfigError, match=f"token-producer.*socket {missing} does not exist"):
        await s.start()


def test_token_producer_parameters() -> None:
    with pytest.raises(ConfigError, match="modelName"):
        load_config("plugins:\n- type: token-producer\n", default_registry())
    with pytest.raises(ConfigError, match="only one of"):
        load_config(
            "plugins:\n- type: token-producer\n  parameters:\n    modelName: m\n"
            "    vllm: {http: 'http://x'}\n    udsTokenizerConfig: {socketFile: /s}\n",
            default_registry(),
        )
    default = load_config(
        "plugins:\n- type: token-producer\n  parameters: {modelName: m}\n", default_registry()
    ).plugin("token-producer")
    assert default.parameters.render_url == "http://localhost:8000"
    assert default.parameters.timeout_s == 5.0 and default.parameters.multimodal_timeout_s == 30.0


# --- precise-prefix-cache-producer ------------------------------------------------------------


class FractionBackend:
    def __init__(self, fractions: Mapping[str, float]) -> None:
        self.fractions = dict(fractions)
        self.picks: list[str] = []
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None: ...

    async def score(self, request: LLMRequest, candidates: Sequence[str]) -> Mapping[str, float]:
        return {k: v for k, v in self.fractions.items() if k in candidates}

    def record_pick(self, request: LLMRequest, endpoint_key: str) -> None:
        self.picks.append(endpoint_key)


async def test_precise_producer_feeds_the_prefix_scorer() -> None:
    backend = FractionBackend({"10.2.0.2:8000": 0.75})
    text = """\
plugins:
- type: precise-prefix-cache-producer
  parameters: {speculativeIndexing: true, tokenProcessorConfig: {blockSize: 64}}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer}]
"""

    def factory(params: PrecisePrefixParams) -> FractionBackend:
        return backend

    s = build_scheduler(
        load_config(text, default_registry()),
        SchedulerDeps(extras={PREFIX_BACKEND_FACTORY: factory}),
    )
    await s.start()
    assert backend.started
    result = await s.schedule(req("a", "p" * 400), [pod(1), pod(2)])
    assert result.endpoints[0].key == "10.2.0.2:8000"
    assert result.profiles["default"].scores["10.2.0.2:8000"] == pytest.approx(0.75)
    assert backend.picks == ["10.2.0.2:8000"]


def test_precise_producer_needs_a_backend() -> None:
    config = load_config("plugins:\n- type: precise-prefix-cache-producer\n", default_registry())
    with pytest.raises(ConfigError, match="KV-event index backend"):
        build_scheduler(config)
