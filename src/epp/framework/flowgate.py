"""The framework's view of flow control: a gate `schedule()` awaits before scheduling when
the config enables `flowControl`. The framework knows only this protocol; the registry's
`flow_control_builder` (set by `epp.plugins`) builds the gate from the config's
`flowControl` section and its policy plugins."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from epp.framework.plugin import Plugin
from epp.types import Endpoint, LLMRequest

if TYPE_CHECKING:
    from epp.framework.config import FlowControlConfig
    from epp.framework.deps import SchedulerDeps

# (endpoints, now) -> the pool's saturation (1.0 or more: full).
PoolSaturation = Callable[[Sequence[Endpoint], float], float]


class FlowGate(Protocol):
    async def admit(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> None:
        """Return when `request` may be scheduled, or raise SchedulingError (shed, expired)."""
        ...

    def kick(self) -> None:
        """Load changed: queued requests may go now."""
        ...

    def started(self, request: LLMRequest) -> None:
        """`request` was admitted and scheduled (it is in flight)."""
        ...

    def finished(self, request: LLMRequest) -> None:
        """`request`'s response ended (or its stream did): load changed."""
        ...

    async def stop(self) -> None: ...


FlowControlBuilder = Callable[
    ["FlowControlConfig", Mapping[str, Plugin], PoolSaturation, "SchedulerDeps"], FlowGate
]
