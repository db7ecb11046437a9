"""The pure core of flow control, as llm-d-router's flow controller behaves: no I/O, no
clock of its own (every time is an argument), no locks (the controller calls it from one
event loop).

- A request is a `FlowItem` of one flow (`flow_id`, the fairness id) at one priority. Each
  priority has a band (configured, or made from the default band on first use) holding one
  queue per flow.
- `enqueue` checks capacity (global and band `maxRequests` / `maxBytes`); when full, queued
  requests that the eviction filter accepts (sheddable: priority < 0) and that have a lower
  priority than the newcomer are evicted, in eviction order (lowest priority, then newest,
  first), only as far as that makes room; otherwise the newcomer is rejected.
- `dispatch_next(saturation)` walks the bands from the highest priority down. The usage-limit
  policy gives each band a ceiling; a band whose ceiling the pool's saturation reaches stops
  the walk (head-of-line blocking, as upstream: lower bands wait too). Otherwise the band's
  fairness policy picks a flow and the head of that flow's queue (by the band's ordering
  policy) is dispatched. One item per call.
- `expire(now)` finalizes items whose TTL ran out; `cancel` removes one (client gone).
- `InFlight` holds the dispatched requests the eviction filter accepts until their responses
  end; `victim(priority)` is the one to evict (eviction order) for a request of `priority`
  that cannot be dispatched.
"""

from __future__ import annotations

import heapq
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar


class Outcome(StrEnum):
    """How an item left flow control (upstream's QueueOutcome names)."""

    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_OTHER = "RejectedOther"
    EVICTED_TTL = "EvictedTTL"
    EVICTED_CONTEXT_CANCELLED = "EvictedContextCancelled"
    # Displaced from a full queue by a higher-priority request (the eviction policies).
    EVICTED_PRIORITY = "EvictedPriority"
    EVICTED_OTHER = "EvictedOther"


_seq = itertools.count()


@dataclass(eq=False, slots=True)
class FlowItem:
    """One queued request. `ttl_s` 0 means no TTL. `slo_ttft_s` (from `x-slo-ttft-ms`) is what
    the slo-deadline ordering reads. `payload` is the caller's (the controller's future)."""

    request_id: str
    flow_id: str
    priority: int
    enqueued_at: float
    byte_size: int = 0
    ttl_s: float = 0.0
    received_at: float | None = None
    slo_ttft_s: float | None = None
    payload: Any = None
    seq: int = field(default_factory=lambda: next(_seq))
    outcome: Outcome | None = None
    finalized_at: float | None = None

    @property
    def deadline(self) -> float:
        """enqueue time + TTL; infinite without a TTL."""
        return self.enqueued_at + self.ttl_s if self.ttl_s > 0 else math.inf

    @property
    def received(self) -> float:
        return self.enqueued_at if self.received_at is None else self.received_at


# --- policies ------------------------------------------------------------------------------


class OrderingPolicy(ABC):
    """Order within one flow's queue: the item with the smallest key is served first."""

    type_name: ClassVar[str] = ""

    @abstractmethod
    def key(self, item: FlowItem) -> tuple[float, ...]: ...


class FCFSOrdering(OrderingPolicy):
    type_name = "fcfs-ordering-policy"

    def key(self, item: FlowItem) -> tuple[float, ...]:
        return (item.enqueued_at, item.seq)


class EDFOrdering(OrderingPolicy):
    """Earliest deadline (enqueue time + TTL) first; no TTL sorts last; ties by enqueue time."""

    type_name = "edf-ordering-policy"

    def key(self, item: FlowItem) -> tuple[float, ...]:
        return (item.deadline, item.enqueued_at, item.seq)


class SLODeadlineOrdering(OrderingPolicy):
    """Earliest `received + x-slo-ttft-ms` first; no SLO sorts last; ties by receive time."""

    type_name = "slo-deadline-ordering-policy"

    def key(self, item: FlowItem) -> tuple[float, ...]:
        slo = item.slo_ttft_s
        deadline = item.received + slo if slo is not None and slo >= 0 else math.inf
        return (deadline, item.received, item.seq)


class FairnessPolicy(ABC):
    """Chooses which flow of a band is served next."""

    type_name: ClassVar[str] = ""

    def new_state(self) -> Any:
        return None

    @abstractmethod
    def pick(self, band: Band) -> FlowQueue | None: ...


class GlobalStrictFairness(FairnessPolicy):
    """The flow whose head item orders first by the band's ordering policy (as if the band
    were one queue)."""

    type_name = "global-strict-fairness-policy"

    def pick(self, band: Band) -> FlowQueue | None:
        best: FlowQueue | None = None
        best_key: tuple[float, ...] | None = None
        for queue in band.flows.values():
            head = queue.peek()
            if head is None:
                continue
            key = band.ordering.key(head)
            if best_key is None or key < best_key:
                best, best_key = queue, key
        return best


class _Cursor:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: str | None = None


class RoundRobinFairness(FairnessPolicy):
    """Flows in sorted id order, each non-empty flow in turn after the last one served."""

    type_name = "round-robin-fairness-policy"

    def new_state(self) -> Any:
        return _Cursor()

    def pick(self, band: Band) -> FlowQueue | None:
        cursor = band.fairness_state
        assert isinstance(cursor, _Cursor)
        ids = sorted(band.flows)
        if not ids:
            cursor.last = None
            return None
        start = 0
        if cursor.last is not None:
            # The first flow after the last served (also when that flow is gone).
            start = next((i for i, f in enumerate(ids) if f > cursor.last), 0)
        for i in range(len(ids)):
            queue = band.flows[ids[(start + i) % len(ids)]]
            if queue.peek() is not None:
                cursor.last = queue.flow_id
                return queue
        cursor.last = None
        return None


class UsageLimitPolicy(ABC):
    """The saturation ceiling of each band (priorities highest first); a band is served
    only while the pool's saturation is below its ceiling."""

    type_name: ClassVar[str] = ""

    @abstractmethod
    def limits(self, saturation: float, priorities: Sequence[int]) -> list[float]: ...


class StaticUsageLimit(UsageLimitPolicy):
    type_name = "static-usage-limit-policy"

    def __init__(self, threshold: float = 1.0) -> None:
        self.threshold = threshold

    def limits(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        return [self.threshold] * len(priorities)


class EvictionOrder(ABC):
    """Which evictable queued item goes first: the smallest key."""

    type_name: ClassVar[str] = ""

    @abstractmethod
    def key(self, item: FlowItem) -> tuple[float, ...]: ...


class PriorityThenTimeEviction(EvictionOrder):
    """Lowest priority first, then the most recent: for a queued item the newest enqueued,
    for a dispatched one (`InFlight`) the newest dispatched (the least work lost, as
    llm-d's policy)."""

    type_name = "priority-then-time-eviction-order-policy"

    def key(self, item: FlowItem) -> tuple[float, ...]:
        return (item.priority, -item.enqueued_at, -item.seq)


class EvictionFilter(ABC):
    type_name: ClassVar[str] = ""

    @abstractmethod
    def accept(self, item: FlowItem) -> bool: ...


class SheddableEvictionFilter(EvictionFilter):
    """Only sheddable (priority < 0) items may be evicted."""

    type_name = "sheddable-eviction-filter"

    def accept(self, item: FlowItem) -> bool:
        return item.priority < 0


# --- queues --------------------------------------------------------------------------------


class FlowQueue:
    """One flow's items in one band, ordered by the band's ordering policy. Removal is lazy:
    a finalized item stays in the heap until it reaches the top."""

    __slots__ = ("_heap", "_key", "bytes", "flow_id", "length")

    def __init__(self, flow_id: str, key: Callable[[FlowItem], tuple[float, ...]]) -> None:
        self.flow_id = flow_id
        self._key = key
        self._heap: list[tuple[tuple[float, ...], int, FlowItem]] = []
        self.length = 0
        self.bytes = 0

    def push(self, item: FlowItem) -> None:
        heapq.heappush(self._heap, (self._key(item), item.seq, item))
        self.length += 1
        self.bytes += item.byte_size

    def peek(self) -> FlowItem | None:
        heap = self._heap
        while heap and heap[0][2].outcome is not None:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def discount(self, item: FlowItem) -> None:
        """`item` (in this queue) was finalized: stop counting it."""
        self.length -= 1
        self.bytes -= item.byte_size

    def items(self) -> Iterator[FlowItem]:
        return (entry[2] for entry in self._heap if entry[2].outcome is None)


@dataclass
class BandConfig:
    priority: int
    ordering: OrderingPolicy = field(default_factory=FCFSOrdering)
    fairness: FairnessPolicy = field(default_factory=GlobalStrictFairness)
    max_bytes: int = 0  # 0: unlimited
    max_requests: int = 0


class Band:
    __slots__ = ("bytes", "config", "fairness_state", "flows", "length")

    def __init__(self, config: BandConfig) -> None:
        self.config = config
        self.flows: dict[str, FlowQueue] = {}
        self.fairness_state = config.fairness.new_state()
        self.length = 0
        self.bytes = 0

    @property
    def priority(self) -> int:
        return self.config.priority

    @property
    def ordering(self) -> OrderingPolicy:
        return self.config.ordering

    def queue(self, flow_id: str) -> FlowQueue:
        q = self.flows.get(flow_id)
        if q is None:
            q = self.flows[flow_id] = FlowQueue(flow_id, self.config.ordering.key)
        return q


# llm-d's per-band byte limit when none is configured (registry defaultPriorityBandMaxBytes).
DEFAULT_BAND_MAX_BYTES = 1_000_000_000


@dataclass
class CoreConfig:
    bands: Sequence[BandConfig] = ()
    # Template for priorities without a configured band (its `priority` is ignored).
    default_band: BandConfig = field(default_factory=lambda: BandConfig(0))
    max_bytes: int = 0  # 0: unlimited
    max_requests: int = 0
    usage_limit: UsageLimitPolicy = field(default_factory=StaticUsageLimit)
    eviction_order: EvictionOrder = field(default_factory=PriorityThenTimeEviction)
    eviction_filter: EvictionFilter = field(default_factory=SheddableEvictionFilter)


class FlowControlCore:
    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.bands: dict[int, Band] = {}
        for band in config.bands:
            self.bands[band.priority] = Band(band)
        self._priorities = sorted(self.bands, reverse=True)
        self.length = 0
        self.bytes = 0

    # -- state -----------------------------------------------------------------------------

    @property
    def priorities(self) -> list[int]:
        """Band priorities, highest first."""
        return self._priorities

    def band(self, priority: int) -> Band:
        band = self.bands.get(priority)
        if band is None:
            t = self.config.default_band
            band = self.bands[priority] = Band(
                BandConfig(priority, t.ordering, t.fairness, t.max_bytes, t.max_requests)
            )
            self._priorities = sorted(self.bands, reverse=True)
        return band

    def items(self) -> Iterator[FlowItem]:
        for priority in self._priorities:
            for queue in self.bands[priority].flows.values():
                yield from queue.items()

    # -- capacity ----------------------------------------------------------------------------

    def _fits(self, band: Band, size: int, freed_global: tuple[int, int] = (0, 0)) -> bool:
        c = self.config
        n, b = self.length - freed_global[0], self.bytes - freed_global[1]
        if c.max_requests and n + 1 > c.max_requests:
            return False
        if c.max_bytes and b + size > c.max_bytes:
            return False
        bc = band.config
        if bc.max_requests and band.length + 1 > bc.max_requests:
            return False
        return not (bc.max_bytes and band.bytes + size > bc.max_bytes)

    def enqueue(self, item: FlowItem, now: float) -> list[FlowItem]:
        """Queue `item`, or finalize it `REJECTED_CAPACITY`. Returns the items finalized by
        this call (evicted ones, and `item` itself when rejected)."""
        band = self.band(item.priority)
        size = item.byte_size
        if not self._fits(band, size):
            victims = self._victims(band, item)
            if victims is None:
                self._finalize(item, Outcome.REJECTED_CAPACITY, now, queued=False)
                return [item]
            for victim in victims:
                self._finalize(victim, Outcome.EVICTED_PRIORITY, now)
            self._add(band, item)
            return victims
        self._add(band, item)
        return []

    def _victims(self, band: Band, item: FlowItem) -> list[FlowItem] | None:
        """The fewest evictable items, in eviction order, whose removal makes room for `item`
        (None if no set does). Only lower-priority items are taken: they are in other bands,
        so they free global capacity only."""
        accept = self.config.eviction_filter.accept
        candidates = sorted(
            (i for i in self.items() if i.priority < item.priority and accept(i)),
            key=self.config.eviction_order.key,
        )
        taken: list[FlowItem] = []
        freed_n = freed_b = 0
        for victim in candidates:
            if self._fits(band, item.byte_size, (freed_n, freed_b)):
                break
            taken.append(victim)
            freed_n += 1
            freed_b += victim.byte_size
        if not self._fits(band, item.byte_size, (freed_n, freed_b)):
            return None
        return taken

    def _add(self, band: Band, item: FlowItem) -> None:
        band.queue(item.flow_id).push(item)
        band.length += 1
        band.bytes += item.byte_size
        self.length += 1
        self.bytes += item.byte_size

    def _finalize(self, item: FlowItem, outcome: Outcome, now: float, queued: bool = True) -> None:
        item.outcome = outcome
        item.finalized_at = now
        if not queued:
            return
        band = self.bands[item.priority]
        band.flows[item.flow_id].discount(item)
        band.length -= 1
        band.bytes -= item.byte_size
        self.length -= 1
        self.bytes -= item.byte_size
        queue = band.flows[item.flow_id]
        if queue.length == 0:
            del band.flows[item.flow_id]  # flows come and go with their requests

    # -- dispatch --------------------------------------------------------------------------

    def dispatch_next(self, saturation: float, now: float) -> FlowItem | None:
        """The next item to dispatch at this saturation (finalized `DISPATCHED`), or None."""
        if self.length == 0:
            return None
        priorities = self._priorities
        limits = self.config.usage_limit.limits(saturation, priorities)
        for priority, limit in zip(priorities, limits, strict=True):
            if saturation >= limit:
                return None  # head-of-line blocking: lower bands wait as well
            band = self.bands[priority]
            if band.length == 0:
                continue
            queue = band.config.fairness.pick(band)
            if queue is None:
                continue
            head = queue.peek()
            if head is None:
                continue
            self._finalize(head, Outcome.DISPATCHED, now)
            return head
        return None

    def would_dispatch_at_once(self, priority: int, saturation: float) -> bool:
        """With nothing queued, would an item of `priority` be dispatched at this saturation
        (the fast path that skips queueing)?"""
        if self.length:
            return False
        usage = self.config.usage_limit
        if type(usage) is StaticUsageLimit or isinstance(usage, StaticUsageLimit):
            return saturation < usage.threshold  # one ceiling for every band
        priorities = sorted({*self._priorities, priority}, reverse=True)
        limits = self.config.usage_limit.limits(saturation, priorities)
        for p, limit in zip(priorities, limits, strict=True):
            if saturation >= limit:
                return False
            if p == priority:
                return True
        return False

    # -- removal ---------------------------------------------------------------------------

    def expire(self, now: float) -> list[FlowItem]:
        """Finalize (`EVICTED_TTL`) every queued item whose TTL has run out."""
        expired = [i for i in self.items() if i.deadline <= now]
        for item in expired:
            self._finalize(item, Outcome.EVICTED_TTL, now)
        return expired

    def top_priority(self) -> int | None:
        """The highest priority with something queued (None: nothing queued)."""
        for priority in self._priorities:
            if self.bands[priority].length:
                return priority
        return None

    def queued_above(self, priority: int) -> int:
        """How many queued items have a priority above `priority`."""
        return sum(self.bands[p].length for p in self._priorities if p > priority)

    def next_deadline(self) -> float:
        return min((i.deadline for i in self.items()), default=math.inf)

    def cancel(
        self, item: FlowItem, now: float, outcome: Outcome = Outcome.EVICTED_CONTEXT_CANCELLED
    ) -> bool:
        """Remove a queued item (its client went away); False if it was no longer queued."""
        if item.outcome is not None:
            return False
        self._finalize(item, outcome, now)
        return True

    def drain(self, now: float) -> list[FlowItem]:
        """Finalize everything (`EVICTED_OTHER`): the controller is stopping."""
        items = list(self.items())
        for item in items:
            self._finalize(item, Outcome.EVICTED_OTHER, now)
        return items


# --- dispatched requests ----------------------------------------------------------------------

# Tracked dispatched requests at most (beyond it a request is simply not evictable): the map
# is bounded even if the edge never reported some responses' ends.
MAX_IN_FLIGHT = 65_536


class InFlight:
    """Dispatched requests that may be evicted (the eviction filter accepts them), by
    request id, until their responses end. An item's `enqueued_at` is its dispatch time
    (what the eviction order compares)."""

    __slots__ = ("_items", "accept", "order")

    def __init__(self, order: EvictionOrder, accept: EvictionFilter) -> None:
        self.order = order
        self.accept = accept
        self._items: dict[str, FlowItem] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: FlowItem) -> bool:
        """Track a dispatched item (False: the filter refuses it, or the map is full)."""
        if not self.accept.accept(item) or len(self._items) >= MAX_IN_FLIGHT:
            return False
        self._items[item.request_id] = item
        return True

    def remove(self, request_id: str) -> FlowItem | None:
        return self._items.pop(request_id, None)

    def victim(self, priority: int) -> FlowItem | None:
        """The first in eviction order among the tracked items below `priority`."""
        below = (item for item in self._items.values() if item.priority < priority)
        return min(below, key=self.order.key, default=None)
