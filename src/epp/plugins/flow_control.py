"""llm-d's flow-control policy plugins (`flowControl` section, `flowControl` feature gate).

Ordering within a flow (`fcfs-ordering-policy`, `edf-ordering-policy`,
`slo-deadline-ordering-policy`), fairness between the flows of a priority band
(`global-strict-fairness-policy`, `round-robin-fairness-policy`), the band ceilings
(`static-usage-limit-policy`, `threshold`), and which queued requests are evicted to make
room for higher-priority ones (`priority-then-time-eviction-order-policy`,
`sheddable-eviction-filter`). The behaviour lives in `epp.flowcontrol.core`; these are its
policies as configurable plugins. `build_flow_controller` turns a config's `flowControl`
into the scheduler's `FlowController`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from epp.flowcontrol import core
from epp.flowcontrol.controller import FlowController, FlowControlObserver
from epp.framework.config import (
    DEFAULT_FAIRNESS_POLICY,
    DEFAULT_ORDERING_POLICY,
    DEFAULT_USAGE_LIMIT_POLICY,
    ConfigError,
    FlowControlConfig,
    PriorityBandSpec,
)
from epp.framework.deps import DepKey, SchedulerDeps
from epp.framework.params import Params
from epp.framework.plugin import Plugin
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.common import no_parameters
from epp.types import Endpoint

# The server supplies where flow control reports (Prometheus series); optional.
FLOW_CONTROL_OBSERVER: DepKey[FlowControlObserver] = DepKey("flow-control-observer")


class FCFSOrderingPolicy(Plugin, core.FCFSOrdering):
    type_name = "fcfs-ordering-policy"


class EDFOrderingPolicy(Plugin, core.EDFOrdering):
    type_name = "edf-ordering-policy"


class SLODeadlineOrderingPolicy(Plugin, core.SLODeadlineOrdering):
    type_name = "slo-deadline-ordering-policy"


class GlobalStrictFairnessPolicy(Plugin, core.GlobalStrictFairness):
    type_name = "global-strict-fairness-policy"


class RoundRobinFairnessPolicy(Plugin, core.RoundRobinFairness):
    type_name = "round-robin-fairness-policy"


class StaticUsageLimitPolicy(Plugin, core.StaticUsageLimit):
    type_name = "static-usage-limit-policy"

    def __init__(self, name: str, threshold: float = 1.0) -> None:
        Plugin.__init__(self, name)
        core.StaticUsageLimit.__init__(self, threshold)


class PriorityThenTimeEvictionOrderPolicy(Plugin, core.PriorityThenTimeEviction):
    type_name = "priority-then-time-eviction-order-policy"


class SheddableEvictionFilter(Plugin, core.SheddableEvictionFilter):
    type_name = "sheddable-eviction-filter"


def _parse_usage_limit(params: Params) -> float:
    return params.number("threshold", 1.0, min=0.0, max=1.0, min_exclusive=True)


_SIMPLE: tuple[tuple[type[Plugin], str], ...] = (
    (FCFSOrderingPolicy, "flow control: first come, first served within a flow"),
    (EDFOrderingPolicy, "flow control: earliest deadline (enqueue + TTL) first"),
    (SLODeadlineOrderingPolicy, "flow control: earliest x-slo-ttft-ms deadline first"),
    (GlobalStrictFairnessPolicy, "flow control: the band's best head item first"),
    (RoundRobinFairnessPolicy, "flow control: flows of a band in turn"),
    (PriorityThenTimeEvictionOrderPolicy, "flow control: evict lowest priority, newest first"),
    (SheddableEvictionFilter, "flow control: only sheddable requests may be evicted"),
)


def _simple_builder(cls: type[Plugin]) -> Callable[[str, None, BuildContext], Plugin]:
    def build(name: str, _params: None, _ctx: BuildContext) -> Plugin:
        return cls(name)

    return build


def register(registry: Registry) -> None:
    if registry.flow_control_builder is None:
        registry.flow_control_builder = build_flow_controller
    for cls, description in _SIMPLE:
        # Another module may implement a type: only fill in types nobody registered.
        if registry.get(cls.type_name) is None:
            registry.register(
                PluginType(
                    cls.type_name,
                    cls,
                    no_parameters,
                    _simple_builder(cls),
                    description,
                )
            )
    if registry.get(StaticUsageLimitPolicy.type_name) is None:
        registry.register(
            PluginType(
                StaticUsageLimitPolicy.type_name,
                StaticUsageLimitPolicy,
                _parse_usage_limit,
                lambda name, threshold, _c: StaticUsageLimitPolicy(name, threshold),
                "flow control: a fixed saturation ceiling for every band",
            )
        )


# --- from the config to a controller --------------------------------------------------------


def _policy(
    plugins: Mapping[str, Plugin], ref: str, default_type: str, kind: type, what: str
) -> object:
    """The plugin `ref` names; an unset or unresolved default reference is the default
    policy itself (llm-d injects it), built here when the config does not define it."""
    plugin = plugins.get(ref or default_type)
    if plugin is None and (not ref or ref == default_type):
        return _DEFAULTS[default_type]()
    if not isinstance(plugin, kind):
        raise ConfigError(f"flowControl: {what} {ref!r} is not a {kind.__name__}")
    return plugin


_DEFAULTS: dict[str, Callable[[], object]] = {
    DEFAULT_ORDERING_POLICY: lambda: FCFSOrderingPolicy(DEFAULT_ORDERING_POLICY),
    DEFAULT_FAIRNESS_POLICY: lambda: GlobalStrictFairnessPolicy(DEFAULT_FAIRNESS_POLICY),
    DEFAULT_USAGE_LIMIT_POLICY: lambda: StaticUsageLimitPolicy(DEFAULT_USAGE_LIMIT_POLICY),
}


def _band(
    spec: PriorityBandSpec | None, priority: int, plugins: Mapping[str, Plugin]
) -> core.BandConfig:
    ordering = _policy(
        plugins,
        spec.ordering_policy_ref if spec else "",
        DEFAULT_ORDERING_POLICY,
        core.OrderingPolicy,
        "orderingPolicyRef",
    )
    fairness = _policy(
        plugins,
        spec.fairness_policy_ref if spec else "",
        DEFAULT_FAIRNESS_POLICY,
        core.FairnessPolicy,
        "fairnessPolicyRef",
    )
    assert isinstance(ordering, core.OrderingPolicy)
    assert isinstance(fairness, core.FairnessPolicy)
    max_bytes = spec.max_bytes if spec and spec.max_bytes else core.DEFAULT_BAND_MAX_BYTES
    return core.BandConfig(
        priority,
        ordering=ordering,
        fairness=fairness,
        max_bytes=max_bytes,
        max_requests=(spec.max_requests or 0) if spec else 0,
    )


def build_flow_controller(
    config: FlowControlConfig,
    plugins: Mapping[str, Plugin],
    saturation: Callable[[Sequence[Endpoint], float], float],
    deps: SchedulerDeps,
) -> FlowController:
    """The controller for an enabled `flowControl` section. Eviction uses the config's
    eviction plugins when it defines them (the first of each type), else llm-d's two."""
    usage = _policy(
        plugins,
        config.usage_limit_policy_ref,
        DEFAULT_USAGE_LIMIT_POLICY,
        core.UsageLimitPolicy,
        "usageLimitPolicyPluginRef",
    )
    assert isinstance(usage, core.UsageLimitPolicy)
    order = next(
        (p for p in plugins.values() if isinstance(p, core.EvictionOrder)),
        core.PriorityThenTimeEviction(),
    )
    accept = next(
        (p for p in plugins.values() if isinstance(p, core.EvictionFilter)),
        core.SheddableEvictionFilter(),
    )
    bands = [_band(spec, spec.priority, plugins) for spec in config.priority_bands]
    core_config = core.CoreConfig(
        bands=bands,
        default_band=_band(config.default_priority_band, 0, plugins),
        max_bytes=config.max_bytes or 0,
        max_requests=config.max_requests or 0,
        usage_limit=usage,
        eviction_order=order,
        eviction_filter=accept,
    )
    return FlowController(
        core.FlowControlCore(core_config),
        saturation,
        deps.clock,
        default_ttl_s=config.default_request_ttl_s or 0.0,
        observer=deps.get(FLOW_CONTROL_OBSERVER),
    )
