"""Flow control: llm-d-router's queue in front of scheduling. `core` is pure (queues,
policies, capacity, eviction; time is passed in), `controller` runs it on the event loop and
answers each request with "dispatch now" or a `SchedulingError`."""

from epp.flowcontrol.core import (
    BandConfig,
    CoreConfig,
    EvictionFilter,
    EvictionOrder,
    FairnessPolicy,
    FlowControlCore,
    FlowItem,
    OrderingPolicy,
    Outcome,
    UsageLimitPolicy,
)

__all__ = [
    "BandConfig",
    "CoreConfig",
    "EvictionFilter",
    "EvictionOrder",
    "FairnessPolicy",
    "FlowControlCore",
    "FlowItem",
    "OrderingPolicy",
    "Outcome",
    "UsageLimitPolicy",
]
