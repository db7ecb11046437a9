"""Approximate and precise prefix-cache scorers."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.framework import CycleState, SchedulerDeps, build_scheduler, load_config
from epp.plugins import default_registry
from epp.plugins.precise_prefix import PREFIX_BACKEND_FACTORY, PrecisePrefixParams
from epp.plugins.prefix import (
    SWEEP_EVERY,
    PrefixCacheScorer,
    PrefixIndex,
    PrefixParams,
    block_hashes,
)
from epp.plugins.shared import prefix_match
from epp.types import Endpoint, EngineMetrics, LLMRequest, ProfileResult, SchedulingResult

NOW = 50.0


def ep(i: int) -> Endpoint:
    return Endpoint(f"10.0.0.{i}", 8000, metrics=EngineMetrics(updated_at=NOW))


def decided(endpoint: Endpoint) -> SchedulingResult:
    return SchedulingResult(
        profiles={"default": ProfileResult("default", [endpoint])}, primary_profile="default"
    )


def text_req(prompt: str, rid: str = "r", model: str = "m") -> LLMRequest:
    return LLMRequest(request_id=rid, path="/v1/completions", model=model, prompt=prompt)


def test_text_prompts_hash_in_blocks_of_four_chars_per_token() -> None:
    r = text_req("x" * (16 * 4 * 3 + 10))
    assert len(block_hashes(r, 16, 2048)) == 3  # partial tail block not hashed
    assert len(block_hashes(r, 16, 2)) == 2
    # Chained: a change in block 0 changes every later hash.
    a = block_hashes(text_req("a" * 64 + "b" * 64), 16, 10)
    b = block_hashes(text_req("c" * 64 + "b" * 64), 16, 10)
    assert a[1] != b[1]
    # Model-scoped.
    assert block_hashes(text_req("a" * 64, model="x"), 16, 1) != block_hashes(
        text_req("a" * 64, model="y"), 16, 1
    )


def test_token_ids_hash_in_blocks_of_tokens() -> None:
    r = LLMRequest(request_id="t", path="/", model="m", token_ids=list(range(40)))
    assert len(block_hashes(r, 16, 100)) == 2


def test_scorer_learns_from_its_own_picks() -> None:
    s = PrefixCacheScorer("p", PrefixParams(block_size_tokens=4))
    eps = [ep(1), ep(2)]
    shared = "system prompt " * 10  # 140 chars = 8 blocks of 16 chars
    first = text_req(shared + "A" * 40)  # 180 chars: 11 blocks
    cycle = CycleState()
    assert s.score(cycle, first, eps) == [0.0, 0.0]
    s.pre_request(cycle, first, decided(eps[1]))
    second = text_req(shared + "B" * 40)
    cycle = CycleState()
    scores = s.score(cycle, second, eps)
    assert scores == [0.0, 8 / 11]
    info = prefix_match(cycle)
    assert info is not None and info.hit_tokens("10.0.0.2:8000") == 8 * 4
    assert info.prompt_tokens == len(second.prompt or "") // 4
    assert s.score(CycleState(), first, eps) == [0.0, 1.0]


def test_per_server_lru_evicts_oldest_blocks() -> None:
    index = PrefixIndex(capacity_per_server=3)
    index.record("a", [1, 2, 3])
    index.record("a", [4])
    assert index.size("a") == 3
    assert index.match([1, 2, 3], {"a"}) == {}  # block 1 evicted: the chain breaks at once
    assert index.match([2, 3, 4], {"a"}) == {"a": 3}
    index.forget("a")
    assert index.match([2, 3, 4], {"a"}) == {}


def test_endpoints_gone_from_the_pool_are_forgotten() -> None:
    s = PrefixCacheScorer("p", PrefixParams(block_size_tokens=4))
    gone, staying = ep(1), ep(2)
    r = text_req("q" * 64)
    s.pre_request(CycleState(), r, decided(gone))
    s.pre_request(CycleState(), r, decided(staying))
    for _ in range(SWEEP_EVERY):
        s.score(CycleState(), r, [staying])
    assert s.index.servers() == ["10.0.0.2:8000"] and s.forgotten == 1
    assert s.score(CycleState(), r, [gone, staying]) == [0.0, 1.0]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "c", "d"]),
        st.lists(st.integers(0, 6), max_size=8),
        max_size=4,
    ),
    st.lists(st.integers(0, 6), max_size=8),
)
def test_match_is_longest_contiguous_prefix(held: dict[str, list[int]], query: list[int]) -> None:
    index = PrefixIndex(capacity_per_server=1000)
    for server, hashes in held.items():
        index.record(server, hashes)
    got = index.match(query, set(held))
    for server, hashes in held.items():
        have = set(hashes)
        n = 0
        while n < len(query) and query[n] in have:
            n += 1
        assert got.get(server, 0) == n


class InMemoryPrefixBackend:
    """A PrefixIndexBackend over a dict, standing in for kvindex (the real backend is wired
    by the lead; this tests the scorer's side of the protocol)."""

    def __init__(self, params: PrecisePrefixParams) -> None:
        self.params = params
        self.cached: dict[str, float] = {}
        self.picks: list[tuple[str, str]] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def score(self, request: LLMRequest, candidates: Sequence[str]) -> Mapping[str, float]:
        request.token_ids = list(range(100))
        return {k: self.cached[k] for k in candidates if k in self.cached}

    def record_pick(self, request: LLMRequest, endpoint_key: str) -> None:
        self.picks.append((request.request_id, endpoint_key))


PRECISE = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {blockSizeTokens: 16, hashSeed: "12345"}
    indexerConfig: {inMemoryConfig: {size: 1000}}
    kvEventsConfig:
      zmqEndpoint: tcp://*:5557
      topicFilter: kv@
      concurrency: 2
      engineType: sglang
      discoverPods: true
      podDiscoveryConfig: {socketPort: 5600}
    speculativeIndexing: true
    speculativeTTL: 500ms
    tierWeights: {gpu: 1.0, cpu: 0.5}
- type: predicted-latency-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: precise-prefix-cache-scorer, weight: 1}
  - {pluginRef: predicted-latency-scorer, weight: 0}
"""


async def test_precise_scorer_delegates_to_backend_and_records_speculative_picks() -> None:
    backends: list[InMemoryPrefixBackend] = []

    def factory(params: PrecisePrefixParams) -> InMemoryPrefixBackend:
        backends.append(InMemoryPrefixBackend(params))
        return backends[-1]

    config = load_config(PRECISE, default_registry())
    s = build_scheduler(
        config,
        SchedulerDeps(
            clock=lambda: NOW, rng=random.Random(1), extras={PREFIX_BACKEND_FACTORY: factory}
        ),
    )
    (backend,) = backends
    p = backend.params
    assert p.token_processor.hash_seed == "12345"
    assert p.indexer.in_memory_size == 1000
    assert p.kv_events.engine_type == "sglang"
    assert p.kv_events.pod_discovery.socket_port == 5600
    assert p.speculative_ttl_s == 0.5
    assert p.tier_weights == {"gpu": 1.0, "cpu": 0.5}
    await s.start()
    assert backend.started
    backend.cached = {"10.0.0.2:8000": 0.75, "10.0.0.3:8000": 7.0}
    r = text_req("hello", rid="q1")
    result = await s.schedule(r, [ep(1), ep(2)])
    assert result.endpoints[0].key == "10.0.0.2:8000"
    assert result.profiles["default"].scores["10.0.0.2:8000"] == 0.75
    assert backend.picks == [("q1", "10.0.0.2:8000")]
    await s.stop()
    assert backend.stopped


async def test_backend_failure_is_counted_and_the_request_still_placed() -> None:
    class FailingBackend(InMemoryPrefixBackend):
        async def score(
            self, request: LLMRequest, candidates: Sequence[str]
        ) -> Mapping[str, float]:
            raise ConnectionError("index down")

    backends: list[InMemoryPrefixBackend] = []

    def factory(params: PrecisePrefixParams) -> InMemoryPrefixBackend:
        backends.append(FailingBackend(params))
        return backends[-1]

    text = PRECISE.replace("speculativeIndexing: true", "speculativeIndexing: false")
    s = build_scheduler(
        load_config(text, default_registry()),
        SchedulerDeps(extras={PREFIX_BACKEND_FACTORY: factory}),
    )
    result = await s.schedule(text_req("hello"), [ep(1), ep(2)])
    assert result.endpoints
    assert s.stats.errors == {"precise-prefix-cache-scorer": 1}
    assert backends[0].picks == []  # speculative indexing off: no record_pick
