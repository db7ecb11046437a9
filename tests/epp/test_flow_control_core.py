"""The pure flow-control core (epp.flowcontrol.core): capacity, eviction, priority, fairness,
ordering and TTL, as properties over random operation sequences and as examples."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.flowcontrol.core import (
    BandConfig,
    CoreConfig,
    EDFOrdering,
    FlowControlCore,
    FlowItem,
    Outcome,
    RoundRobinFairness,
    SLODeadlineOrdering,
    StaticUsageLimit,
)

# One operation: ("enq", priority, flow, size, ttl) | ("disp", saturation) | ("tick", dt)
_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("enq"),
            st.sampled_from([-2, -1, 0, 1]),
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 50),
            st.sampled_from([0.0, 0.5, 2.0]),
        ),
        st.tuples(st.just("disp"), st.sampled_from([0.0, 0.5, 0.99, 1.0, 2.0])),
        st.tuples(st.just("tick"), st.floats(0.0, 1.0)),
    ),
    max_size=80,
)


def _core(max_requests: int = 0, max_bytes: int = 0, rr: bool = False) -> FlowControlCore:
    default = BandConfig(0, fairness=RoundRobinFairness()) if rr else BandConfig(0)
    return FlowControlCore(
        CoreConfig(default_band=default, max_requests=max_requests, max_bytes=max_bytes)
    )


@settings(max_examples=300, deadline=None)
@given(_ops, st.integers(0, 6), st.integers(0, 120), st.booleans())
def test_every_item_is_accounted_for_and_limits_hold(
    ops: list[tuple[Any, ...]], max_requests: int, max_bytes: int, rr: bool
) -> None:
    core = _core(max_requests, max_bytes, rr)
    now = 0.0
    items: list[FlowItem] = []
    for op in ops:
        if op[0] == "enq":
            _, priority, flow, size, ttl = op
            item = FlowItem("r", flow, priority, now, byte_size=size, ttl_s=ttl)
            items.append(item)
            finalized = core.enqueue(item, now)
            for victim in finalized:
                if victim is item:
                    assert victim.outcome is Outcome.REJECTED_CAPACITY
                else:
                    # Only sheddable, strictly lower-priority items are displaced.
                    assert victim.outcome is Outcome.EVICTED_PRIORITY
                    assert victim.priority < 0 and victim.priority < item.priority
        elif op[0] == "disp":
            saturation = op[1]
            highest = max((i.priority for i in core.items()), default=None)
            got = core.dispatch_next(saturation, now)
            if saturation >= 1.0:
                assert got is None  # the static limit (1.0) is reached: nothing goes
            elif highest is not None:
                assert got is not None and got.priority == highest  # strict priority
                assert got.outcome is Outcome.DISPATCHED
        else:
            now += op[1]
            for item in core.expire(now):
                assert item.outcome is Outcome.EVICTED_TTL and item.deadline <= now
        queued = [i for i in items if i.outcome is None]
        assert core.length == len(queued) == len(list(core.items()))
        assert core.bytes == sum(i.byte_size for i in queued)
        if max_requests:
            assert core.length <= max_requests
        if max_bytes:
            assert core.bytes <= max_bytes
        assert all(i.deadline > now for i in queued)
    # Nothing is lost: every item is queued or has exactly one outcome.
    for item in core.drain(now):
        assert item.outcome is Outcome.EVICTED_OTHER
    assert all(i.outcome is not None for i in items)
    assert core.length == 0 and core.bytes == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["a", "b"]), min_size=2, max_size=60))
def test_round_robin_serves_backlogged_flows_in_turn(arrivals: list[str]) -> None:
    core = _core(rr=True)
    for i, flow in enumerate(arrivals):
        core.enqueue(FlowItem(str(i), flow, 0, float(i)), float(i))
    served: list[str] = []
    while (item := core.dispatch_next(0.0, 100.0)) is not None:
        served.append(item.flow_id)
    counts = {f: arrivals.count(f) for f in ("a", "b")}
    both = 2 * min(counts.values())
    # While both flows have work they alternate; then the rest of the longer one.
    assert all(served[i] != served[i + 1] for i in range(both - 1))
    assert sorted(served) == sorted(arrivals)


@given(st.lists(st.floats(0, 100), min_size=1, max_size=30))
def test_fcfs_within_a_flow_and_global_strict_across_flows(times: list[float]) -> None:
    core = _core()
    for i, t in enumerate(sorted(times)):
        core.enqueue(FlowItem(str(i), "ab"[i % 2], 0, t), t)
    order = []
    while (item := core.dispatch_next(0.0, 1000.0)) is not None:
        order.append(item.enqueued_at)
    assert order == sorted(times)


def test_edf_orders_by_deadline_and_slo_deadline_by_header() -> None:
    core = FlowControlCore(CoreConfig(default_band=BandConfig(0, ordering=EDFOrdering())))
    core.enqueue(FlowItem("late", "f", 0, 0.0, ttl_s=10.0), 0.0)
    core.enqueue(FlowItem("none", "f", 0, 0.5), 0.5)
    core.enqueue(FlowItem("soon", "f", 0, 1.0, ttl_s=2.0), 1.0)
    got = [core.dispatch_next(0.0, 2.0) for _ in range(3)]
    assert [i.request_id for i in got if i] == ["soon", "late", "none"]

    core = FlowControlCore(CoreConfig(default_band=BandConfig(0, ordering=SLODeadlineOrdering())))
    core.enqueue(FlowItem("slo-5s", "f", 0, 0.0, slo_ttft_s=5.0), 0.0)
    core.enqueue(FlowItem("no-slo", "f", 0, 0.1), 0.1)
    core.enqueue(FlowItem("slo-1s", "f", 0, 1.0, slo_ttft_s=1.0), 1.0)
    got = [core.dispatch_next(0.0, 2.0) for _ in range(3)]
    assert [i.request_id for i in got if i] == ["slo-1s", "slo-5s", "no-slo"]


def test_usage_limit_blocks_head_of_line() -> None:
    core = FlowControlCore(CoreConfig(usage_limit=StaticUsageLimit(0.5)))
    core.enqueue(FlowItem("x", "f", 0, 0.0), 0.0)
    assert core.dispatch_next(0.5, 1.0) is None
    assert not core.would_dispatch_at_once(0, 0.1)  # something is queued
    item = core.dispatch_next(0.49, 1.0)
    assert item is not None and item.request_id == "x"
    assert core.would_dispatch_at_once(0, 0.49)
    assert not core.would_dispatch_at_once(0, 0.5)


def test_full_queue_evicts_newest_lowest_priority_sheddable_first() -> None:
    core = _core(max_requests=3)
    a = FlowItem("a", "f", -1, 0.0)
    b = FlowItem("b", "f", -2, 1.0)
    c = FlowItem("c", "f", -2, 2.0)
    for item in (a, b, c):
        assert core.enqueue(item, item.enqueued_at) == []
    critical = FlowItem("crit", "f", 5, 3.0)
    assert core.enqueue(critical, 3.0) == [c]  # priority -2, and the newer of the two
    assert c.outcome is Outcome.EVICTED_PRIORITY
    # Another sheddable at -1 can only displace lower priorities (-2): b.
    d = FlowItem("d", "f", -1, 4.0)
    assert core.enqueue(d, 4.0) == [b]
    # Same priority as everything evictable left: rejected, nothing displaced.
    e = FlowItem("e", "f", -1, 5.0)
    assert core.enqueue(e, 5.0) == [e] and e.outcome is Outcome.REJECTED_CAPACITY
    # Non-sheddable items are never displaced.
    full = _core(max_requests=1)
    full.enqueue(FlowItem("zero", "f", 0, 0.0), 0.0)
    x = FlowItem("x", "f", 9, 1.0)
    assert full.enqueue(x, 1.0) == [x]


def test_band_limits_and_ttl() -> None:
    core = FlowControlCore(CoreConfig(bands=[BandConfig(1, max_requests=1)]))
    core.enqueue(FlowItem("a", "f", 1, 0.0, ttl_s=1.0), 0.0)
    b = FlowItem("b", "f", 1, 0.0)
    assert core.enqueue(b, 0.0) == [b]
    assert core.next_deadline() == 1.0
    assert core.expire(0.99) == []
    assert [i.request_id for i in core.expire(1.0)] == ["a"]
    assert core.next_deadline() == math.inf
    assert core.priorities == [1]
    core.enqueue(FlowItem("c", "f", 7, 0.0), 0.0)  # a new band from the default template
    assert core.priorities == [7, 1]
