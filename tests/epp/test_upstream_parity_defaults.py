"""Defaults and semantics pinned to llm-d's: pd-profile-handler's older `threshold` (0 means
always disaggregate, "ALWAYS DO PD" in llm-d's guides) against `nonCachedTokens` (0 means
never), and `kvEventsConfig.discoverPods` (true unless the config names a `zmqEndpoint`, the
central mode that predates the flag)."""

from __future__ import annotations

import pytest

from epp.endpoints import ROLE_LABEL, make_endpoint
from epp.framework import Params, build_scheduler, load_config
from epp.plugins import default_registry
from epp.plugins.precise_prefix import parse_precise_params
from epp.types import LLMRequest

PD = """\
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: pd-profile-handler
  parameters: PARAMS
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}]
- name: decode
  plugins: [{pluginRef: decode-filter}]
"""
POOL = [
    make_endpoint("10.2.0.1", 8000, {ROLE_LABEL: "prefill"}),
    make_endpoint("10.2.0.2", 8000, {ROLE_LABEL: "decode"}),
]


@pytest.mark.parametrize(
    ("params", "disaggregates"),
    [
        ("{threshold: 0}", True),  # llm-d's older handler: 0 = always
        ("{threshold: 100000}", False),  # far more than the prompt is uncached
        ("{threshold: 4}", True),
        ("{nonCachedTokens: 0}", False),  # llm-d's decider: 0 = never
        ("{}", False),
    ],
)
async def test_pd_threshold_semantics(params: str, disaggregates: bool) -> None:
    scheduler = build_scheduler(load_config(PD.replace("PARAMS", params), default_registry()))
    request = LLMRequest(request_id="r", path="/v1/completions", model="m", prompt="p" * 400)
    result = await scheduler.schedule(request, POOL)
    assert ("prefill" in result.profiles) is disaggregates
    assert result.endpoints[0].key == "10.2.0.2:8000"


@pytest.mark.parametrize(
    ("kv_events", "discover", "bind"),
    [
        ({}, True, ""),  # llm-d's default: connect to each pod, bind nothing
        ({"zmqEndpoint": "tcp://*:5557"}, False, "tcp://*:5557"),  # central mode
        ({"zmqEndpoint": "tcp://*:5556", "discoverPods": True}, True, "tcp://*:5556"),
        ({"discoverPods": False}, False, ""),
    ],
)
def test_discover_pods_default(kv_events: dict[str, object], discover: bool, bind: str) -> None:
    params = parse_precise_params(Params({"kvEventsConfig": kv_events}))
    assert params.kv_events.discover_pods is discover
    assert params.kv_events.zmq_endpoint == bind
