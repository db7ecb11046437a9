"""epp: an Envoy ext_proc Endpoint Picker with a pluggable scheduling framework.

What an embedder needs, from the top of the package:

* configuration: `load_config(source, registry) -> PickerConfig` (a path, YAML text, or None
  for the defaults), raising `ConfigError`;
* the scheduler: `build_scheduler(config, SchedulerDeps(...))` with the built-in plugin types
  of `default_registry()`; it satisfies `Scheduler` (`schedule(LLMRequest, [Endpoint])` ->
  `SchedulingResult`, or `SchedulingError`; `on_response_complete(request, ResponseStats)`);
* the server: `PickerServer(ServeConfig(...), scheduler)`, then `start()`, `drain()`.

The names resolve on first use, so `import epp` (and `epp.types` or any other submodule)
does not load YAML, the plugins or the gRPC/HTTP server until asked."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Not `typing.TYPE_CHECKING`: importing typing would be most of `import epp`'s cost; type
# checkers treat a variable of this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from epp.errors import EPPError
    from epp.framework import ConfigError, PickerConfig, SchedulerDeps, build_scheduler, load_config
    from epp.plugins import default_registry
    from epp.server import PickerServer, ServeConfig
    from epp.types import (
        Endpoint,
        EngineMetrics,
        LLMRequest,
        ResponseStats,
        Scheduler,
        SchedulingError,
        SchedulingResult,
    )

# Public name -> the module that defines it.
_EXPORTS = {
    "ConfigError": "epp.framework",
    "EPPError": "epp.errors",
    "PickerConfig": "epp.framework",
    "SchedulerDeps": "epp.framework",
    "build_scheduler": "epp.framework",
    "load_config": "epp.framework",
    "default_registry": "epp.plugins",
    "PickerServer": "epp.server",
    "ServeConfig": "epp.server",
    "Endpoint": "epp.types",
    "EngineMetrics": "epp.types",
    "LLMRequest": "epp.types",
    "ResponseStats": "epp.types",
    "Scheduler": "epp.types",
    "SchedulingError": "epp.types",
    "SchedulingResult": "epp.types",
}

__all__ = [
    "ConfigError",
    "EPPError",
    "Endpoint",
    "EngineMetrics",
    "LLMRequest",
    "PickerConfig",
    "PickerServer",
    "ResponseStats",
    "Scheduler",
    "SchedulerDeps",
    "SchedulingError",
    "SchedulingResult",
    "ServeConfig",
    "__version__",
    "build_scheduler",
    "default_registry",
    "load_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
