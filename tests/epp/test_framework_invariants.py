"""Scheduling invariants over arbitrary pools and requests, with every built-in scorer."""

from __future__ import annotations

import asyncio
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.framework import SchedulerDeps, build_scheduler, load_config
from epp.plugins import default_registry
from epp.types import Endpoint, EngineMetrics, LLMRequest, ResponseStats, Role, SchedulingError

EVERYTHING = """\
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: running-requests-size-scorer
- type: load-aware-scorer
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 2}
- type: lora-affinity-scorer
- type: session-affinity-scorer
- type: active-request-scorer
- type: no-hit-lru-scorer
- type: predicted-latency-scorer
  parameters: {minSamples: 1}
- type: weighted-random-picker
  parameters: {maxNumOfEndpoints: 3}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: kv-cache-utilization-scorer, weight: 1}
  - {pluginRef: running-requests-size-scorer, weight: 1}
  - {pluginRef: load-aware-scorer, weight: 1}
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: lora-affinity-scorer, weight: 1}
  - {pluginRef: session-affinity-scorer, weight: 1}
  - {pluginRef: active-request-scorer, weight: 1}
  - {pluginRef: no-hit-lru-scorer, weight: 1}
  - {pluginRef: predicted-latency-scorer, weight: 2}
  - {pluginRef: weighted-random-picker}
"""

metrics = st.builds(
    EngineMetrics,
    waiting=st.integers(0, 1000),
    running=st.integers(0, 1000),
    kv_usage=st.one_of(st.floats(min_value=-1, max_value=2), st.just(float("nan"))),
    running_loras=st.frozensets(st.sampled_from(["a", "b", "c"])),
    waiting_loras=st.frozensets(st.sampled_from(["a", "b", "c"])),
    max_loras=st.integers(0, 3),
    updated_at=st.floats(0, 100),
)
pools = st.lists(
    st.builds(
        Endpoint,
        address=st.sampled_from([f"10.0.0.{i}" for i in range(12)]),
        port=st.sampled_from([8000, 8001]),
        role=st.sampled_from(list(Role)),
        metrics=metrics,
    ),
    min_size=0,
    max_size=12,
    unique_by=lambda e: e.key,  # the edge passes each endpoint once
)
requests = st.builds(
    LLMRequest,
    request_id=st.text(min_size=1, max_size=4),
    path=st.just("/v1/completions"),
    model=st.sampled_from(["m", "n"]),
    lora=st.sampled_from([None, "a", "b"]),
    prompt=st.one_of(st.none(), st.text(max_size=40)),
    token_ids=st.one_of(st.none(), st.lists(st.integers(0, 2**31), max_size=20)),
    max_tokens=st.one_of(st.none(), st.integers(0, 4000)),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "x-session-id",
                "x-session-token",
                "x-slo-ttft-ms",
                "x-slo-tpot-ms",
                "x-prediction-based-scheduling",
            ]
        ),
        st.text(max_size=6),
    ),
    priority=st.integers(-2, 2),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(pools, requests, st.floats(0, 5)), min_size=1, max_size=6))
def test_decisions_pick_from_candidates_or_raise_scheduling_error(
    steps: list[tuple[list[Endpoint], LLMRequest, float]],
) -> None:
    scheduler = build_scheduler(
        load_config(EVERYTHING, default_registry()),
        SchedulerDeps(clock=lambda: 50.0, rng=random.Random(0)),
    )

    async def run() -> None:
        for pool, request, ttft in steps:
            try:
                result = await scheduler.schedule(request, pool)
            except SchedulingError as err:
                assert err.status in (429, 503)
                continue
            picked = [e.key for e in result.endpoints]
            assert picked and len(set(picked)) == len(picked) <= 3
            assert set(picked) <= {e.key for e in pool}
            scheduler.on_response_headers(request, picked[0])
            scheduler.on_response_complete(
                request,
                ResponseStats(
                    served=picked[0],
                    streamed=True,
                    first_byte_s=ttft,
                    duration_s=2 * ttft,
                    completion_tokens=10,
                ),
            )
        assert scheduler.stats.errors == {}

    asyncio.run(run())
