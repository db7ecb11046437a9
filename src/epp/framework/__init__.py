"""The scheduling framework: plugin extension points, the EndpointPickerConfig loader, and
the scheduler that runs profiles of filters, weighted scorers and a picker per request."""

from epp.framework.build import build_scheduler
from epp.framework.config import (
    ConfigError,
    PickerConfig,
    PluginSpec,
    ProfilePluginRef,
    ProfileSpec,
    SaturationConfig,
    describe_config,
    load_config,
)
from epp.framework.cycle import PREFIX_MATCH_KEY, CycleState, PrefixMatchInfo
from epp.framework.deps import SchedulerDeps
from epp.framework.observer import RecordingObserver, SchedulerObserver
from epp.framework.params import ParamError, Params
from epp.framework.plugin import (
    Filter,
    Lifecycle,
    Picker,
    Plugin,
    PreRequest,
    ProfileHandler,
    ResponseComplete,
    ResponseHeaders,
    ScoredEndpoint,
    Scorer,
)
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.framework.saturation import SaturationDetector
from epp.framework.scheduler import FrameworkScheduler

__all__ = [
    "PREFIX_MATCH_KEY",
    "BuildContext",
    "ConfigError",
    "CycleState",
    "Filter",
    "FrameworkScheduler",
    "Lifecycle",
    "ParamError",
    "Params",
    "Picker",
    "PickerConfig",
    "Plugin",
    "PluginSpec",
    "PluginType",
    "PreRequest",
    "PrefixMatchInfo",
    "ProfileHandler",
    "ProfilePluginRef",
    "ProfileSpec",
    "RecordingObserver",
    "Registry",
    "ResponseComplete",
    "ResponseHeaders",
    "SaturationConfig",
    "SaturationDetector",
    "SchedulerDeps",
    "SchedulerObserver",
    "ScoredEndpoint",
    "Scorer",
    "build_scheduler",
    "describe_config",
    "load_config",
]
