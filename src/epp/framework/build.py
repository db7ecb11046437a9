"""From a validated `PickerConfig` to a running `FrameworkScheduler`."""

from __future__ import annotations

from epp.framework.config import ConfigError, PickerConfig
from epp.framework.deps import SchedulerDeps
from epp.framework.plugin import (
    Filter,
    Picker,
    Plugin,
    ProfileHandler,
    SaturationDetectorPlugin,
    Scorer,
)
from epp.framework.profile import PluginCallStats, SchedulingProfile, WeightedScorer
from epp.framework.registry import BuildContext
from epp.framework.saturation import SaturationDetector
from epp.framework.scheduler import FrameworkScheduler


def build_scheduler(config: PickerConfig, deps: SchedulerDeps | None = None) -> FrameworkScheduler:
    """Instantiate every plugin and profile with the registry `config` was loaded with.
    Raises ConfigError naming the entry when a builder cannot satisfy its configuration
    (e.g. a missing backend factory)."""
    registry = config.registry
    deps = deps or SchedulerDeps()
    ctx = BuildContext(deps, (p.name for p in config.profiles))
    for spec in config.plugins:
        plugin_type = registry.get(spec.type_name)
        if plugin_type is None:
            raise ConfigError(f"{spec.where}: unknown plugin type {spec.type_name!r}")
        try:
            plugin = plugin_type.build(spec.name, spec.parameters, ctx)
        except ConfigError as exc:
            raise ConfigError(f"{config.source}: {spec.where}: {exc}") from None
        ctx.plugins[spec.name] = plugin
    try:
        ctx.resolve()
    except ConfigError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None

    stats = PluginCallStats()
    profiles: dict[str, SchedulingProfile] = {}
    for pspec in config.profiles:
        filters: list[Filter] = []
        scorers: list[WeightedScorer] = []
        picker: Picker | None = None
        for ref in pspec.plugins:
            member: Plugin = ctx.plugins[ref.plugin_ref]
            # One plugin may be several things (a scorer that filters); each role counts.
            if isinstance(member, Filter):
                filters.append(member)
            if isinstance(member, Scorer):
                scorers.append(WeightedScorer(member, ref.weight))
            if isinstance(member, Picker):
                picker = member
        assert picker is not None  # the loader adds a max-score-picker where missing
        profiles[pspec.name] = SchedulingProfile(
            pspec.name,
            filters,
            scorers,
            picker,
            observer=deps.observer,
            timer=deps.timer,
            stats=stats,
        )
    handler = ctx.plugins[config.profile_handler]
    if not isinstance(handler, ProfileHandler):
        raise ConfigError(f"{config.profile_handler!r} is not a profile handler")
    detector: SaturationDetectorPlugin | None = None
    if config.saturation_detector_ref:
        named = ctx.plugins.get(config.saturation_detector_ref)
        if not isinstance(named, SaturationDetectorPlugin):
            raise ConfigError(
                f"{config.source}: saturationDetector.pluginRef "
                f"{config.saturation_detector_ref!r} is not a saturation detector"
            )
        detector = named
    scheduler = FrameworkScheduler(
        profiles,
        handler,
        list(ctx.plugins.values()),
        SaturationDetector(config.saturation),
        clock=deps.clock,
        timer=deps.timer,
        observer=deps.observer,
        stats=stats,
        saturation_plugin=detector,
    )
    fc = config.flow_control
    if fc is not None and fc.enabled:
        builder = registry.flow_control_builder
        if builder is None:
            raise ConfigError(
                f"{config.source}: flowControl is enabled but the registry has no flow-control "
                "builder (use epp.plugins.new_registry())"
            )
        try:
            scheduler.flow_control = builder(fc, ctx.plugins, scheduler.pool_saturation, deps)
        except ConfigError as exc:
            raise ConfigError(f"{config.source}: {exc}") from None
    return scheduler
