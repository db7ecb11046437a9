"""Flow control on the event loop (epp.flowcontrol.controller) and through the scheduling
framework: the fast path, queueing while saturated, dispatch by priority, capacity and
eviction answers, TTL expiry, cancelled clients, and the config that turns it on."""

from __future__ import annotations

import asyncio
import time

import pytest

from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.core import BandConfig, CoreConfig, FlowControlCore, RoundRobinFairness
from epp.framework import build_scheduler, load_config
from epp.framework.deps import SchedulerDeps
from epp.metrics import EppMetrics, PrometheusFlowControlObserver
from epp.plugins import default_registry
from epp.plugins.flow_control import FLOW_CONTROL_OBSERVER
from epp.types import Endpoint, EngineMetrics, LLMRequest, SchedulingError


class Pool:
    def __init__(self) -> None:
        self.value = 0.0
        self.calls = 0

    def __call__(self, _endpoints: object, _now: float) -> float:
        self.calls += 1
        return self.value


def _request(rid: str, priority: int = 0, flow: str = "", body: bytes = b"x") -> LLMRequest:
    headers = {"x-gateway-inference-fairness-id": flow} if flow else {}
    return LLMRequest(
        request_id=rid, path="/v1/completions", priority=priority, headers=headers, raw_body=body
    )


async def _until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def _controller(pool: Pool, config: CoreConfig | None = None, ttl: float = 0.0) -> FlowController:
    return FlowController(
        FlowControlCore(config or CoreConfig()), pool, time.monotonic, default_ttl_s=ttl
    )


async def test_fast_path_does_not_queue() -> None:
    pool = Pool()
    fc = _controller(pool)
    await fc.admit(_request("a"), [])
    assert fc.outcomes == {"Dispatched": 1}
    assert fc._task is None  # no dispatcher was needed
    assert pool.calls == 1


async def test_queued_while_saturated_then_dispatched_highest_priority_first() -> None:
    pool = Pool()
    pool.value = 1.0
    fc = _controller(pool)
    order: list[str] = []

    async def client(rid: str, priority: int) -> None:
        await fc.admit(_request(rid, priority), [])
        order.append(rid)
        pool.value = 1.0  # what it was dispatched to fills the pool again

    tasks = [asyncio.create_task(client(r, p)) for r, p in (("low", -1), ("mid", 0), ("hi", 3))]
    await _until(lambda: fc.core.length == 3)
    for expected in (["hi"], ["hi", "mid"], ["hi", "mid", "low"]):
        pool.value = 0.0
        fc.kick()
        await _until(lambda expected=expected: order == expected)
    await asyncio.gather(*tasks)
    assert fc.outcomes == {"Dispatched": 3}
    await fc.stop()


async def test_capacity_ttl_eviction_and_cancel_answers() -> None:
    pool = Pool()
    pool.value = 5.0
    fc = _controller(pool, CoreConfig(max_requests=2), ttl=0.0)
    shed = asyncio.create_task(fc.admit(_request("s", -1), []))
    zero = asyncio.create_task(fc.admit(_request("z", 0), []))
    await _until(lambda: fc.core.length == 2)
    # Full: another priority-0 request cannot displace anything sheddable below it? It can:
    # -1 < 0. A second one finds only non-sheddable items left and is rejected.
    crit = asyncio.create_task(fc.admit(_request("c", 0), []))
    with pytest.raises(SchedulingError) as evicted:
        await shed
    assert (evicted.value.status, evicted.value.reason) == (429, "evicted-priority")
    with pytest.raises(SchedulingError) as rejected:
        await fc.admit(_request("r", 0), [])
    assert (rejected.value.status, rejected.value.reason) == (429, "rejected-saturated")
    zero.cancel()
    with pytest.raises(asyncio.CancelledError):
        await zero
    assert fc.core.length == 1
    await fc.stop()
    with pytest.raises(SchedulingError) as stopped:
        await crit
    assert stopped.value.status == 503
    assert fc.outcomes == {
        "EvictedPriority": 1,
        "RejectedCapacity": 1,
        "EvictedContextCancelled": 1,
        "EvictedOther": 1,
    }


async def test_ttl_expires_with_503_and_metrics() -> None:
    pool = Pool()
    pool.value = 2.0
    metrics = EppMetrics()
    fc = FlowController(
        FlowControlCore(CoreConfig()),
        pool,
        time.monotonic,
        default_ttl_s=0.05,
        observer=PrometheusFlowControlObserver(metrics),
    )
    with pytest.raises(SchedulingError) as expired:
        await fc.admit(_request("t", 0), [])
    assert (expired.value.status, expired.value.reason) == (503, "rejected-ttl-expired")
    text = metrics.render().decode()
    assert 'llm_d_epp_flow_control_requests_total{outcome="EvictedTTL",priority="0"} 1.0' in text
    assert 'llm_d_epp_flow_control_queue_size{priority="0"} 0.0' in text
    assert "llm_d_epp_flow_control_request_queue_duration_seconds_count" in text
    await fc.stop()


async def test_round_robin_gives_two_flows_equal_dispatches() -> None:
    pool = Pool()
    pool.value = 1.0
    fc = _controller(pool, CoreConfig(default_band=BandConfig(0, fairness=RoundRobinFairness())))
    served: list[str] = []

    async def client(rid: str, flow: str) -> None:
        await fc.admit(_request(rid, 0, flow), [])
        served.append(flow)
        pool.value = 1.0  # the dispatched request fills the pool

    # Flow a floods first, flow b arrives after: round-robin still alternates.
    tasks = [asyncio.create_task(client(f"a{i}", "a")) for i in range(20)]
    tasks += [asyncio.create_task(client(f"b{i}", "b")) for i in range(10)]
    await _until(lambda: fc.core.length == 30)
    for n in range(1, 21):
        pool.value = 0.0
        fc.kick()
        await _until(lambda n=n: len(served) == n)
    assert served.count("a") == served.count("b") == 10
    await fc.stop()
    rest = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, SchedulingError) for r in rest) == 10  # shed at stop, answered


FLOW_CONFIG = """\
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: round-robin-fairness-policy
- type: edf-ordering-policy
- type: static-usage-limit-policy
  parameters: {threshold: 0.9}
saturationDetector: {queueDepthThreshold: 2, kvCacheUtilThreshold: 0.8}
flowControl:
  maxRequests: 100
  defaultRequestTTL: 5s
  priorityBands:
  - priority: 10
    fairnessPolicyRef: round-robin-fairness-policy
    orderingPolicyRef: edf-ordering-policy
"""


async def test_config_turns_flow_control_on_in_the_scheduler() -> None:
    config = load_config(FLOW_CONFIG, default_registry())
    assert config.inactive_sections == ()
    metrics = EppMetrics()
    scheduler = build_scheduler(
        config,
        SchedulerDeps(extras={FLOW_CONTROL_OBSERVER: PrometheusFlowControlObserver(metrics)}),
    )
    fc = scheduler.flow_control
    assert isinstance(fc, FlowController)
    band = fc.core.bands[10].config
    assert isinstance(band.fairness, RoundRobinFairness) and band.max_bytes == 1_000_000_000
    assert fc.core.config.max_requests == 100 and fc.default_ttl_s == 5.0
    endpoint = Endpoint(
        "10.0.0.1", 8000, metrics=EngineMetrics(waiting=4, updated_at=time.monotonic())
    )
    # Saturated (waiting 4 / threshold 2): even a critical request queues.
    task = asyncio.create_task(scheduler.schedule(_request("x", 10), [endpoint]))
    await _until(lambda: fc.core.length == 1)
    endpoint.metrics.waiting = 0
    endpoint.metrics.updated_at = time.monotonic()
    result = await asyncio.wait_for(task, 5)
    assert result.endpoints[0].key == endpoint.key
    # Sheddable requests queue too (no immediate 429 with flow control), and are shed on stop.
    endpoint.metrics.waiting = 4
    endpoint.metrics.updated_at = time.monotonic()
    shed = asyncio.create_task(scheduler.schedule(_request("y", -1), [endpoint]))
    await _until(lambda: fc.core.length == 1)
    await scheduler.stop()
    with pytest.raises(SchedulingError):
        await shed
    text = metrics.render().decode()
    assert 'llm_d_epp_flow_control_requests_total{outcome="Dispatched",priority="10"} 1.0' in text


def test_gate_off_keeps_the_section_inactive() -> None:
    config = load_config(
        FLOW_CONFIG.replace("featureGates: [flowControl]\n", ""), default_registry()
    )
    assert config.inactive_sections == ("flowControl",)
    assert build_scheduler(config).flow_control is None


class Stream:
    """An edge's stream as flow control sees it: `evict` answers it (True) unless it has
    ended; ending it reports the response finished, as the edge does when Envoy closes it."""

    def __init__(self, fc: FlowController, pool: Pool, request: LLMRequest) -> None:
        self.fc, self.pool, self.request = fc, pool, request
        self.answers: list[tuple[int, str]] = []
        self.ended = False
        request.evict = self.evict

    def evict(self, status: int, reason: str, message: str) -> bool:
        if self.ended:
            return False
        self.answers.append((status, reason))
        self.end()
        return True

    def end(self) -> None:
        self.ended = True
        self.pool.value -= 0.25  # one of the pool's 4 slots frees
        self.fc.finished(self.request)


async def _cycles(pool: Pool, n: int) -> None:
    """Wait until `n` more dispatch cycles have read the pool's saturation."""
    target = pool.calls + n
    await _until(lambda: pool.calls >= target)


async def _in_flight(fc: FlowController, pool: Pool, rid: str, priority: int) -> Stream:
    stream = Stream(fc, pool, _request(rid, priority))
    await fc.admit(stream.request, [])
    fc.started(stream.request)  # what the scheduler reports once it has picked
    pool.value += 0.25
    return stream


async def test_a_waiting_critical_request_evicts_the_newest_sheddable_in_flight() -> None:
    pool = Pool()
    metrics = EppMetrics()
    fc = FlowController(
        FlowControlCore(CoreConfig()),
        pool,
        time.monotonic,
        observer=PrometheusFlowControlObserver(metrics),
    )
    old = await _in_flight(fc, pool, "old", -1)
    crit = await _in_flight(fc, pool, "crit", 5)  # not sheddable: never a victim
    low = await _in_flight(fc, pool, "low", -2)
    new = await _in_flight(fc, pool, "new", -1)
    assert pool.value == 1.0 and len(fc.in_flight) == 3  # the critical one is not tracked
    # Lowest priority first, then the newest dispatched.
    await fc.admit(_request("c1", 10), [])
    pool.value += 0.25  # c1 took the room
    assert low.answers == [(429, "evicted")] and not old.answers and not new.answers
    await fc.admit(_request("c2", 10), [])
    pool.value += 0.25
    assert new.answers == [(429, "evicted")] and not old.answers
    assert fc.outcomes["EvictedInFlight"] == 2 and fc.outcomes["Dispatched"] == 6
    assert not crit.answers
    text = metrics.render().decode()
    assert 'llm_d_epp_flow_control_in_flight_evictions_total{priority="-1"} 1.0' in text
    assert 'llm_d_epp_flow_control_in_flight_evictions_total{priority="-2"} 1.0' in text
    # A sheddable request never evicts one of its own priority.
    pool.value = 1.0
    waiting = asyncio.create_task(fc.admit(_request("s", -1), []))
    await _until(lambda: fc.core.length == 1)
    await _cycles(pool, 3)  # dispatch cycles that find nothing to evict
    assert not old.answers and fc.core.length == 1
    old.end()
    await waiting
    await fc.stop()


async def test_one_eviction_per_waiting_request_until_a_dispatch_uses_the_room() -> None:
    """A saturation signal that does not drop at once (scraped engine metrics) must not
    make every cycle evict another request for the same waiting one."""
    pool = Pool()
    fc = _controller(pool)
    streams = [await _in_flight(fc, pool, f"s{i}", -1) for i in range(4)]
    pool.value = 1.0
    for s in streams:
        s.end = lambda s=s: (setattr(s, "ended", True), fc.finished(s.request))  # type: ignore[method-assign]
    waiting = asyncio.create_task(fc.admit(_request("c", 10), []))
    await _until(lambda: fc.evictions == 1)
    await _cycles(pool, 3)  # saturation still 1.0
    assert fc.evictions == 1 and fc.core.length == 1
    pool.value = 0.75  # the engines' metrics catch up
    fc.kick()
    await waiting
    # The next waiting request may evict again.
    pool.value = 1.0
    second = asyncio.create_task(fc.admit(_request("c2", 10), []))
    await _until(lambda: fc.evictions == 2)
    pool.value = 0.75
    fc.kick()
    await second
    await fc.stop()


async def test_in_flight_eviction_can_be_off_and_skips_ended_streams() -> None:
    pool = Pool()
    fc = _controller(pool)
    fc.evict_in_flight = False
    stream = await _in_flight(fc, pool, "s", -1)
    assert len(fc.in_flight) == 0  # not even tracked
    pool.value = 1.0
    waiting = asyncio.create_task(fc.admit(_request("c", 10), []))
    await _until(lambda: fc.core.length == 1)
    await _cycles(pool, 3)
    assert not stream.answers and fc.core.length == 1
    stream.end()
    await waiting
    await fc.stop()

    pool = Pool()
    fc = _controller(pool)
    gone = await _in_flight(fc, pool, "gone", -1)
    live = await _in_flight(fc, pool, "live", -1)
    live.request.priority = -1
    live.ended = False
    # `gone` ended without its end reaching flow control (tracked still): evicting it fails,
    # the next victim is taken.
    gone.ended = True
    fc.in_flight._items["gone"].enqueued_at = time.monotonic() + 1  # the newest dispatched
    pool.value = 1.0
    await fc.admit(_request("c", 10), [])
    assert live.answers == [(429, "evicted")] and not gone.answers
    assert len(fc.in_flight) == 0
    await fc.stop()
