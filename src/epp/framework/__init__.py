"""The scheduling framework: plugin extension points, the EndpointPickerConfig loader, and
the scheduler that runs profiles of filters, weighted scorers and a picker per request.

It knows no concrete plugin: the caller passes a `Registry` (`epp.plugins.default_registry()`
for the built-ins) and supplies plugin-specific dependencies in `SchedulerDeps.extras`."""

from epp.framework.build import build_scheduler
from epp.framework.config import (
    ConfigError,
    DataLayerConfig,
    DataSourceSpec,
    FlowControlConfig,
    PickerConfig,
    PluginSpec,
    PriorityBandSpec,
    ProfilePluginRef,
    ProfileSpec,
    SaturationConfig,
    UnknownParameter,
    describe_config,
    load_config,
)
from epp.framework.cycle import CycleState
from epp.framework.deps import DepKey, SchedulerDeps
from epp.framework.observer import RecordingObserver, SchedulerObserver
from epp.framework.params import ParamError, Params
from epp.framework.plugin import (
    Admitter,
    DataProducer,
    Filter,
    Lifecycle,
    Picker,
    Plugin,
    PreRequest,
    ProfileHandler,
    ResponseComplete,
    ResponseHeaders,
    SaturationDetectorPlugin,
    ScoredEndpoint,
    Scorer,
)
from epp.framework.registry import BuildContext, ConfigDefaults, PluginType, Registry
from epp.framework.saturation import SaturationDetector
from epp.framework.scheduler import FrameworkScheduler

__all__ = [
    "Admitter",
    "BuildContext",
    "ConfigDefaults",
    "ConfigError",
    "CycleState",
    "DataLayerConfig",
    "DataProducer",
    "DataSourceSpec",
    "DepKey",
    "Filter",
    "FlowControlConfig",
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
    "PriorityBandSpec",
    "ProfileHandler",
    "ProfilePluginRef",
    "ProfileSpec",
    "RecordingObserver",
    "Registry",
    "ResponseComplete",
    "ResponseHeaders",
    "SaturationConfig",
    "SaturationDetector",
    "SaturationDetectorPlugin",
    "SchedulerDeps",
    "SchedulerObserver",
    "ScoredEndpoint",
    "Scorer",
    "UnknownParameter",
    "build_scheduler",
    "describe_config",
    "load_config",
]
