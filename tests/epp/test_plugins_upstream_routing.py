"""llm-d's routing plugins: E/P/D disaggregation (disagg-profile-handler, its multimodal
decider, encode-filter), data-parallel-profile-handler, context-length-aware, and the
conformance-test plugins (header-based-testing-filter, destination-endpoint-served-verifier)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pytest

from epp.endpoints import make_endpoint
from epp.framework import ConfigError, CycleState, SchedulerDeps, build_scheduler, load_config
from epp.plugins import default_registry
from epp.plugins.capacity import (
    ContextLengthAware,
    ContextLengthParams,
    parse_context_range,
    range_score,
)
from epp.plugins.conformance import DestinationEndpointServedVerifier, HeaderBasedTestingFilter
from epp.plugins.filters import EncodeFilter
from epp.types import Endpoint, LLMRequest, ProfileResult, SchedulingResult


def pod(i: int, role: str | None = None, port: int = 8000) -> Endpoint:
    labels = {} if role is None else {"llm-d.ai/role": role}
    return make_endpoint(f"10.4.0.{i}", port, labels)


def chat(rid: str, content: Any, headers: Mapping[str, str] | None = None) -> LLMRequest:
    return LLMRequest(
        request_id=rid,
        path="/v1/chat/completions",
        model="m",
        messages=[{"role": "user", "content": content}],
        headers=dict(headers or {}),
    )


IMAGE = [
    {"type": "text", "text": "what is this?"},
    {"type": "image_url", "image_url": {"url": "http://x/cat.png"}},
]

# llm-d-router deploy/config/sim-e-p-d-epp-config.yaml (commit 520af47), verbatim.
SIM_E_P_D = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: encode-filter
- type: prefill-filter
- type: decode-filter
- type: always-disagg-multimodal-decider
- type: prefix-based-pd-decider
  parameters:
    nonCachedTokens: 16
- type: disagg-profile-handler
  parameters:
    deciders:
      encode: always-disagg-multimodal-decider
      prefill: prefix-based-pd-decider
schedulingProfiles:
- name: encode
  plugins:
  - pluginRef: encode-filter
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: queue-scorer
    weight: 1
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: queue-scorer
    weight: 1
"""


async def test_e_p_d_runs_encode_for_multimodal_and_prefill_for_long_prompts() -> None:
    s = build_scheduler(
        load_config(SIM_E_P_D, default_registry()), SchedulerDeps(rng=random.Random(0))
    )
    pool = [pod(1, "encode"), pod(2, "prefill"), pod(3, "decode")]
    text_only = await s.schedule(chat("a", "hi"), pool)  # short, no image
    assert list(text_only.profiles) == ["decode"] and text_only.primary_profile == "decode"
    assert "x-encoder-hosts-ports" not in text_only.headers
    assert "x-prefiller-host-port" not in text_only.headers

    both = await s.schedule(chat("b", [*IMAGE, {"type": "text", "text": "z" * 400}]), pool)
    assert set(both.profiles) == {"decode", "encode", "prefill"}
    assert both.endpoints[0].key == "10.4.0.3:8000"
    assert both.headers["x-encoder-hosts-ports"] == "10.4.0.1:8000"
    assert both.headers["x-prefiller-host-port"] == "10.4.0.2:8000"


async def test_e_pd_without_a_prefill_decider_never_prefills() -> None:
    text = SIM_E_P_D.replace("      prefill: prefix-based-pd-decider\n", "")
    s = build_scheduler(load_config(text, default_registry()), SchedulerDeps(rng=random.Random(0)))
    pool = [pod(1, "encode"), pod(2, "prefill"), pod(3, "decode")]
    result = await s.schedule(chat("a", [*IMAGE, {"type": "text", "text": "z" * 400}]), pool)
    assert set(result.profiles) == {"decode", "encode"}


async def test_disagg_legacy_flat_parameters_and_errors() -> None:
    legacy = SIM_E_P_D.replace(
        "    deciders:\n      encode: always-disagg-multimodal-decider\n"
        "      prefill: prefix-based-pd-decider\n",
        "    encodeDeciderPluginName: always-disagg-multimodal-decider\n"
        "    deciderPluginName: prefix-based-pd-decider\n",
    )
    handler = load_config(legacy, default_registry()).plugin("disagg-profile-handler")
    assert handler.parameters.encode_decider == "always-disagg-multimodal-decider"
    assert handler.parameters.prefill_decider == "prefix-based-pd-decider"
    mixed = SIM_E_P_D.replace("    deciders:\n", "    decodeProfile: decode\n    deciders:\n")
    with pytest.raises(ConfigError, match="cannot mix"):
        load_config(mixed, default_registry())
    unknown = SIM_E_P_D.replace("encode: always-disagg-multimodal-decider", "encode: nobody")
    with pytest.raises(ConfigError, match=r"deciders\.encode plugin not found: nobody"):
        build_scheduler(load_config(unknown, default_registry()))
    not_a_decider = SIM_E_P_D.replace(
        "encode: always-disagg-multimodal-decider", "encode: queue-scorer"
    )
    with pytest.raises(ConfigError, match="not a decider"):
        build_scheduler(load_config(not_a_decider, default_registry()))


def test_multimodal_decider_and_encode_filter() -> None:
    s = build_scheduler(load_config(SIM_E_P_D, default_registry()))
    decider = s.plugin("always-disagg-multimodal-decider")
    assert decider.disaggregate(CycleState(), chat("a", IMAGE), "k")  # type: ignore[attr-defined]
    audio = [{"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}]
    assert decider.disaggregate(CycleState(), chat("a", audio), "k")  # type: ignore[attr-defined]
    assert not decider.disaggregate(CycleState(), chat("a", "text"), "k")  # type: ignore[attr-defined]
    pool = [pod(1, "encode"), pod(2, "encode-prefill"), pod(3, "both"), pod(4)]
    kept = EncodeFilter("e").filter(CycleState(), chat("a", "x"), pool)
    assert [e.address for e in kept] == ["10.4.0.1", "10.4.0.2"]
    # The combined roles are valid pod labels; encode-only pods neither prefill nor decode.
    assert [p.role.value for p in pool] == ["encode", "prefill", "both", "both"]


# --- data-parallel-profile-handler ------------------------------------------------------------

# llm-d-router deploy/config/dp-epp-config.yaml (commit 520af47), verbatim.
DP = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: decode-filter
- type: max-score-picker
- type: data-parallel-profile-handler
  parameters:
    primaryPort: 8000
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
"""


async def test_data_parallel_rewrites_the_port_and_names_the_rank() -> None:
    s = build_scheduler(load_config(DP, default_registry()), SchedulerDeps(rng=random.Random(0)))
    rank = pod(1, port=8002)
    result = await s.schedule(chat("a", "hi"), [rank])
    assert result.endpoints[0].key == "10.4.0.1:8000"
    assert result.headers["x-data-parallel-host-port"] == "10.4.0.1:8002"


def test_data_parallel_needs_one_profile() -> None:
    text = DP + "- name: other\n  plugins:\n  - pluginRef: decode-filter\n"
    with pytest.raises(ConfigError, match="exactly one scheduling profile"):
        build_scheduler(load_config(text, default_registry()))
    with pytest.raises(ConfigError, match="primaryPort"):
        load_config(DP.replace("primaryPort: 8000", "primaryPort: 70000"), default_registry())
    default = load_config(
        DP.replace("  parameters:\n    primaryPort: 8000\n", ""), default_registry()
    )
    assert default.plugin("data-parallel-profile-handler").parameters == 8000


# --- context-length-aware ---------------------------------------------------------------------


def test_context_range_score_as_upstream() -> None:
    assert parse_context_range("0-4096") == (0, 4096)
    with pytest.raises(ValueError):
        parse_context_range("4096-0")
    assert range_score(100, 100, 100) == 1.0
    # Inside: 0.3 + 0.7 * (0.7 / (1 + 4096/10000) + 0.3 * (4096-1000)/4096)
    inside = 0.3 + 0.7 * (0.7 / (1 + 0.4096) + 0.3 * 3096 / 4096)
    assert range_score(1000, 0, 4096) == pytest.approx(inside)
    assert range_score(5096, 0, 4096) == pytest.approx(0.3 / 2)  # 1000 beyond the max


def ranged(i: int, text: str | None) -> Endpoint:
    labels = {} if text is None else {"llm-d.ai/context-length-range": text}
    return Endpoint(f"10.4.1.{i}", 8000, labels=labels)


def test_context_length_aware_scores_and_filters() -> None:
    short, long_ = ranged(1, "0-1000"), ranged(2, "1000-100000")
    unlabelled, broken = ranged(3, None), ranged(4, "oops")
    pool = [short, long_, unlabelled, broken]
    request = LLMRequest(request_id="r", path="/v1/completions", model="m", token_ids=[1] * 5000)
    scorer = ContextLengthAware("c", ContextLengthParams())
    scores = scorer.score(CycleState(), request, pool)
    assert scores[1] > scores[0] and scores[2] == 0.5 and scores[3] == 0.0
    assert scorer.filter(CycleState(), request, pool) == pool  # filtering off by default
    filtering = ContextLengthAware("c", ContextLengthParams(enable_filtering=True))
    assert filtering.filter(CycleState(), request, pool) == [long_, unlabelled]
    estimated = LLMRequest(request_id="r", path="/v1/completions", model="m", prompt="x" * 400)
    assert filtering.filter(CycleState(), estimated, pool) == [short, unlabelled]  # 100 tokens


# --- conformance plugins ----------------------------------------------------------------------


def test_header_based_testing_filter() -> None:
    f = HeaderBasedTestingFilter("h")
    pool = [pod(1), pod(2), pod(2, port=8001), pod(3)]
    header = {"test-epp-endpoint-selection": "10.4.0.3, 10.4.0.2:8001, 10.4.0.2:8000, 10.9.9.9"}
    kept = f.filter(CycleState(), chat("a", "x", header), pool)
    assert [e.key for e in kept] == ["10.4.0.3:8000", "10.4.0.2:8001"]  # one per IP, in order
    assert f.filter(CycleState(), chat("a", "x"), pool) == []


def test_destination_endpoint_served_verifier() -> None:
    verifier = DestinationEndpointServedVerifier("v")
    result = SchedulingResult(
        profiles={"default": ProfileResult("default", [pod(1)])}, primary_profile="default"
    )
    verifier.pre_request(CycleState(), chat("a", "x"), result)
    assert result.response_headers["x-conformance-test-served-endpoint"] == "10.4.0.1:8000"
