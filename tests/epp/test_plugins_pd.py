"""P/D disaggregation: role filters, pd-profile-handler, decider, prefiller header; label
filters."""

from __future__ import annotations

import random

import pytest

from epp.endpoints import ROLE_LABEL
from epp.framework import CycleState, SchedulerDeps, build_scheduler, load_config
from epp.framework.params import Params
from epp.plugins import default_registry
from epp.plugins.filters import ByLabelFilter, LabelSelectorFilter, _parse_by_label, _parse_selector
from epp.types import Endpoint, EngineMetrics, LLMRequest, Role, SchedulingError

PD = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-header-handler
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 4}
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 50}
- type: pd-profile-handler
  parameters: {deciderPluginName: prefix-based-pd-decider}
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: queue-scorer
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
"""


def pod(i: int, role: Role, waiting: int = 0) -> Endpoint:
    labels = {ROLE_LABEL: role.value}  # as make_endpoint reads it from the pod
    return Endpoint(
        f"10.1.0.{i}", 8000, labels=labels, role=role, metrics=EngineMetrics(waiting=waiting)
    )


def req(rid: str, prompt: str) -> LLMRequest:
    return LLMRequest(request_id=rid, path="/v1/completions", model="m", prompt=prompt)


async def test_pd_runs_prefill_only_for_long_uncached_prompts() -> None:
    s = build_scheduler(load_config(PD, default_registry()), SchedulerDeps(rng=random.Random(0)))
    pool = [pod(1, Role.PREFILL, waiting=3), pod(2, Role.PREFILL), pod(3, Role.DECODE)]
    short = await s.schedule(req("a", "x" * 100), pool)  # 25 tokens < 50
    assert short.primary_profile == "decode"
    assert list(short.profiles) == ["decode"]
    assert short.endpoints[0].key == "10.1.0.3:8000"
    assert "x-prefiller-host-port" not in short.headers

    long_prompt = "y" * 800  # 200 tokens, uncached
    long = await s.schedule(req("b", long_prompt), pool)
    assert set(long.profiles) == {"decode", "prefill"}
    assert long.endpoints[0].key == "10.1.0.3:8000"
    assert long.headers["x-prefiller-host-port"] == "10.1.0.2:8000"  # shorter queue

    # Same prompt again: cached on the decode pod now (learned from the pick), so decode-only.
    again = await s.schedule(req("c", long_prompt), pool)
    assert list(again.profiles) == ["decode"]


async def test_pd_without_decode_endpoints_is_503() -> None:
    s = build_scheduler(load_config(PD, default_registry()))
    with pytest.raises(SchedulingError) as err:
        await s.schedule(req("a", "x"), [pod(1, Role.PREFILL)])
    assert err.value.status == 503 and "decode" in err.value.message


async def test_disagg_profile_handler_takes_its_prefill_decider_by_name() -> None:
    # disagg-profile-handler is its own type (llm-d's), no longer an alias of this one: its
    # decider comes from deciders.prefill (tests/epp/test_plugins_upstream_disagg.py).
    text = PD.replace(
        "type: pd-profile-handler\n  parameters: {deciderPluginName: prefix-based-pd-decider}",
        "type: disagg-profile-handler\n  name: pd-profile-handler\n"
        "  parameters: {deciders: {prefill: prefix-based-pd-decider}}",
    ).replace("{nonCachedTokens: 50}", "{nonCachedTokens: 10}")
    config = load_config(text, default_registry())
    assert config.plugin("pd-profile-handler").type_name == "disagg-profile-handler"
    s = build_scheduler(config)
    result = await s.schedule(req("a", "z" * 100), [pod(1, Role.PREFILL), pod(2, Role.BOTH)])
    assert "prefill" in result.profiles  # 25 uncached tokens >= 10


def test_role_filters() -> None:
    s = build_scheduler(load_config(PD, default_registry()))
    pool = [pod(1, Role.PREFILL), pod(2, Role.DECODE), pod(3, Role.BOTH)]
    r = req("a", "")
    prefill = s.plugin("prefill-filter").filter(CycleState(), r, pool)  # type: ignore[attr-defined]
    decode = s.plugin("decode-filter").filter(CycleState(), r, pool)  # type: ignore[attr-defined]
    assert [e.address for e in prefill] == ["10.1.0.1", "10.1.0.3"]
    assert [e.address for e in decode] == ["10.1.0.2", "10.1.0.3"]


def labelled(i: int, **labels: str) -> Endpoint:
    return Endpoint(f"10.2.0.{i}", 8000, labels=labels)


def test_label_selector_match_labels_and_expressions() -> None:
    selector = _parse_selector(
        Params(
            {
                "matchLabels": {"app": "vllm"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["fast", "medium"]},
                    {"key": "draining", "operator": "DoesNotExist"},
                ],
            }
        )
    )
    f = LabelSelectorFilter("sel", selector)
    pool = [
        labelled(1, app="vllm", tier="fast"),
        labelled(2, app="vllm", tier="slow"),
        labelled(3, app="vllm", tier="medium", draining="1"),
        labelled(4, app="sglang", tier="fast"),
        labelled(5, app="vllm", tier="medium"),
    ]
    got = f.filter(CycleState(), req("a", ""), pool)
    assert [e.address for e in got] == ["10.2.0.1", "10.2.0.5"]


def test_by_label_filter() -> None:
    f = ByLabelFilter(
        "b",
        _parse_by_label(Params({"label": "zone", "validValues": ["a"], "allowsNoLabel": True})),
    )
    pool = [labelled(1, zone="a"), labelled(2, zone="b"), labelled(3)]
    assert [e.address for e in f.filter(CycleState(), req("a", ""), pool)] == [
        "10.2.0.1",
        "10.2.0.3",
    ]
