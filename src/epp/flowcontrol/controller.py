"""Flow control on the event loop: `FlowController.admit(request, candidates)` returns when
the request may be scheduled, or raises the `SchedulingError` the edge answers with.

Fast path: with nothing queued and the pool's saturation under the request's band ceiling,
`admit` returns at once (one saturation computation, no task switch, no allocation beyond a
counter). Otherwise the request is queued in the pure core and its stream waits on a future
while one dispatcher task runs dispatch cycles: compute the pool's saturation, dispatch one
item, let its stream run (so its scheduling counts as in-flight load), and again; when
nothing can go it waits for a response to complete (`kick`) or one tick. TTLs fire with
their own timers. A stream cancelled while queued (client gone) leaves the queue.

Outcomes are answered as llm-d-router does (`requestcontrol/admission.go`): queue full ->
429 `rejected-saturated`; TTL expired -> 503 `rejected-ttl-expired`; client gone -> 503
`rejected-context-cancelled`; displaced by a higher-priority request -> 429
`evicted-priority` (upstream's reason for priority eviction); stopping -> 503.

In-flight eviction: the scheduler reports each scheduled request (`started`) and each
finished response (`finished`). A started request the eviction filter accepts (sheddable)
and whose edge can end its stream early (`LLMRequest.evict`, the h2 edge) is tracked. When
a dispatch cycle is blocked by saturation while a higher-priority request waits, the tracked
request first in eviction order (lowest priority, newest dispatched) is evicted: its stream
gets llm-d's eviction answer (429 `evicted`; Envoy resets the engine's request, which aborts
it), so its capacity goes to the waiting request. At most one eviction per waiting request
that outranks the victim is outstanding (until a dispatch uses the room)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from epp.flowcontrol.core import FlowControlCore, FlowItem, InFlight, Outcome
from epp.types import Endpoint, LLMRequest, SchedulingError

log = logging.getLogger(__name__)

FAIRNESS_ID_HEADER = "x-gateway-inference-fairness-id"
DEFAULT_FAIRNESS_ID = "default-flow"
SLO_TTFT_HEADER = "x-slo-ttft-ms"
DEFAULT_TICK_S = 0.005

REJECTED_SATURATED = "rejected-saturated"
REJECTED_TTL_EXPIRED = "rejected-ttl-expired"
REJECTED_CONTEXT_CANCELLED = "rejected-context-cancelled"
EVICTED_PRIORITY = "evicted-priority"
EVICTED = "evicted"  # llm-d's reason for an in-flight request evicted (RequestDroppedReasonEvicted)
FLOW_CONTROL_STOPPED = "flow-control-stopped"

_EVICTED_MESSAGE = "evicted by flow control to make room for a higher-priority request"
# outcome -> (HTTP status, x-llm-d-request-dropped-reason, message)
_ANSWERS: dict[Outcome, tuple[int, str, str]] = {
    Outcome.REJECTED_CAPACITY: (429, REJECTED_SATURATED, "flow control queue at capacity"),
    Outcome.EVICTED_TTL: (503, REJECTED_TTL_EXPIRED, "request timed out in the flow control queue"),
    Outcome.EVICTED_CONTEXT_CANCELLED: (503, REJECTED_CONTEXT_CANCELLED, "client disconnected"),
    Outcome.EVICTED_PRIORITY: (
        429,
        EVICTED_PRIORITY,
        "evicted from the flow control queue for a higher-priority request",
    ),
    Outcome.EVICTED_OTHER: (503, FLOW_CONTROL_STOPPED, "flow control is stopping"),
    Outcome.REJECTED_OTHER: (500, "flow-control-error", "flow control failed"),
}


class FlowControlObserver(Protocol):
    """Where flow control reports (the server: Prometheus series in the picker's registry)."""

    def outcome(self, priority: int, outcome: str, wait_s: float) -> None: ...

    def queue(self, priority: int, length: int, size_bytes: int) -> None: ...

    def saturation(self, value: float) -> None: ...

    def evicted_in_flight(self, priority: int) -> None: ...


class FlowController:
    def __init__(
        self,
        core: FlowControlCore,
        saturation: Callable[[Sequence[Endpoint], float], float],
        clock: Callable[[], float],
        *,
        default_ttl_s: float = 0.0,
        observer: FlowControlObserver | None = None,
        tick_s: float = DEFAULT_TICK_S,
        evict_in_flight: bool = True,
    ) -> None:
        self.core = core
        self._saturation = saturation
        self._clock = clock
        self.default_ttl_s = default_ttl_s
        self.observer = observer
        self.tick_s = tick_s
        self._pool: Sequence[Endpoint] = ()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopped = False
        # outcome -> count, for tests and logs (the observer has the labelled series)
        self.outcomes: dict[str, int] = {}
        self.evict_in_flight = evict_in_flight
        self.in_flight = InFlight(core.config.eviction_order, core.config.eviction_filter)
        # Evictions whose room no dispatch has used yet (see the module's docstring).
        self._evicted_unused = 0

    # -- request path ----------------------------------------------------------------------

    async def admit(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> None:
        self._pool = candidates
        now = self._clock()
        core = self.core
        if not core.length and not self._stopped:
            saturation = self._saturation(candidates, now)
            if core.would_dispatch_at_once(request.priority, saturation):
                self._record(request.priority, Outcome.DISPATCHED, 0.0)
                return
        await self._queue(request, now)

    async def _queue(self, request: LLMRequest, now: float) -> None:
        if self._stopped:
            raise _error(Outcome.EVICTED_OTHER)
        loop = asyncio.get_running_loop()
        headers = request.headers
        future: asyncio.Future[Outcome] = loop.create_future()
        item = FlowItem(
            request_id=request.request_id,
            flow_id=headers.get(FAIRNESS_ID_HEADER) or DEFAULT_FAIRNESS_ID,
            priority=request.priority,
            enqueued_at=now,
            byte_size=len(request.raw_body),
            ttl_s=self.default_ttl_s,
            slo_ttft_s=_slo_seconds(headers.get(SLO_TTFT_HEADER)),
            payload=future,
        )
        finalized = self.core.enqueue(item, now)
        self._settle(finalized)
        if item.outcome is not None:  # rejected at once
            raise _error(item.outcome)
        timer = None
        if item.ttl_s > 0:
            timer = loop.call_later(item.ttl_s, self._expire, item)
        self._publish_queue(item.priority)
        self._ensure_dispatcher()
        try:
            outcome = await future
        except asyncio.CancelledError:
            if self.core.cancel(item, self._clock()):
                self._settle([item])
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if outcome is not Outcome.DISPATCHED:
            raise _error(outcome)

    @property
    def evictions(self) -> int:
        """In-flight evictions so far."""
        return self.outcomes.get("EvictedInFlight", 0)

    def kick(self) -> None:
        """Something that changes saturation happened (a response completed): try now."""
        if self._wake is not None and self.core.length:
            self._wake.set()

    def started(self, request: LLMRequest) -> None:
        """`request` was scheduled: track it if it may be evicted."""
        if not self.evict_in_flight or request.evict is None:
            return
        item = FlowItem(
            request_id=request.request_id,
            flow_id=request.headers.get(FAIRNESS_ID_HEADER) or DEFAULT_FAIRNESS_ID,
            priority=request.priority,
            enqueued_at=self._clock(),  # in InFlight: the dispatch time
            payload=request,
        )
        self.in_flight.add(item)

    def finished(self, request: LLMRequest) -> None:
        """`request`'s response ended (or its stream did): stop tracking it; try now."""
        if self.in_flight:
            self.in_flight.remove(request.request_id)
        self.kick()

    def _evict_for_waiting(self) -> bool:
        """Dispatch is blocked: evict the in-flight request first in eviction order below
        the highest waiting priority, unless enough evictions are already outstanding."""
        core = self.core
        top = core.top_priority()
        if top is None:
            return False
        victim = self.in_flight.victim(top)
        if victim is None:
            return False
        if core.queued_above(victim.priority) <= self._evicted_unused:
            return False
        self.in_flight.remove(victim.request_id)
        request = victim.payload
        assert isinstance(request, LLMRequest)
        evict = request.evict
        if evict is None or not evict(429, EVICTED, _EVICTED_MESSAGE):
            return False  # its stream had ended or cannot be answered now: not counted
        self._evicted_unused += 1
        self.outcomes["EvictedInFlight"] = self.evictions + 1
        if self.observer is not None:
            self.observer.evicted_in_flight(victim.priority)
        return True

    # -- dispatcher ------------------------------------------------------------------------

    def _ensure_dispatcher(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._dispatch_loop(), name="flow-control-dispatch"
            )
        elif self._wake is not None:
            self._wake.set()

    async def _dispatch_loop(self) -> None:
        core = self.core
        wake = self._wake
        assert wake is not None
        while core.length and not self._stopped:
            now = self._clock()
            saturation = self._saturation(self._pool, now)
            if self.observer is not None:
                self.observer.saturation(saturation)
            item = core.dispatch_next(saturation, now)
            if item is not None:
                if self._evicted_unused:
                    self._evicted_unused -= 1
                self._settle([item])
                self._publish_queue(item.priority)
                # Let the dispatched stream schedule (its in-flight load counts) first.
                await asyncio.sleep(0)
                continue
            if self.evict_in_flight and self.in_flight:
                self._evicted_unused = min(self._evicted_unused, core.length)
                if self._evict_for_waiting():
                    await asyncio.sleep(0)  # the victim's stream closes; look again
                    continue
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.tick_s)

    def _expire(self, item: FlowItem) -> None:
        if self.core.cancel(item, self._clock(), Outcome.EVICTED_TTL):
            self._settle([item])
            self._publish_queue(item.priority)

    def _settle(self, items: Sequence[FlowItem]) -> None:
        """Tell the waiting streams of finalized items, and count the outcomes."""
        for item in items:
            outcome = item.outcome
            assert outcome is not None
            wait = (item.finalized_at or item.enqueued_at) - item.enqueued_at
            self._record(item.priority, outcome, wait)
            future = item.payload
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_result(outcome)

    def _record(self, priority: int, outcome: Outcome, wait_s: float) -> None:
        self.outcomes[outcome.value] = self.outcomes.get(outcome.value, 0) + 1
        if self.observer is not None:
            self.observer.outcome(priority, outcome.value, wait_s)

    def _publish_queue(self, priority: int) -> None:
        if self.observer is not None:
            band = self.core.bands.get(priority)
            if band is not None:
                self.observer.queue(priority, band.length, band.bytes)

    # -- lifecycle -------------------------------------------------------------------------

    async def stop(self) -> None:
        """Reject everything queued (503) and stop the dispatcher."""
        self._stopped = True
        self.evict_in_flight = False
        drained = self.core.drain(self._clock())
        self._settle(drained)
        for priority in {i.priority for i in drained}:
            self._publish_queue(priority)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _error(outcome: Outcome) -> SchedulingError:
    status, reason, message = _ANSWERS[outcome]
    return SchedulingError(status, reason, message)


def _slo_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        ms = int(value.strip())
    except ValueError:
        return None
    return ms / 1000.0 if ms >= 0 else None
