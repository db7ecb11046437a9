"""The built-in plugin types, registered under llm-d's type names, and the registry that
holds them with llm-d's defaults (what `load_config` fills in where a config is silent)."""

from __future__ import annotations

from functools import cache

from epp.framework.registry import ConfigDefaults, Registry
from epp.plugins import (
    admission,
    affinity,
    capacity,
    conformance,
    datalayer,
    disagg,
    filters,
    flow_control,
    inflight,
    latency_slo,
    load,
    pickers,
    precise_prefix,
    predicted_latency,
    predicted_ttft,
    prefix,
    producers,
    profile_handlers,
    request_handling,
)

# One line per module; each registers its types (and aliases) in `register(registry)`.
_MODULES = (
    load,
    prefix,
    precise_prefix,
    affinity,
    inflight,
    pickers,
    profile_handlers,
    filters,
    predicted_latency,
    predicted_ttft,
    producers,
    admission,
    latency_slo,
    capacity,
    disagg,
    conformance,
    datalayer,
    request_handling,
    # Last: registers the flow-control types no earlier module implements, as inactive.
    flow_control,
)


# The configuration without one (`load_config(None, registry)`): GIE's default profile.
DEFAULT_CONFIG_YAML = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: single-profile-handler
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""

# llm-d's defaulting: a profile without a picker gets a max-score-picker; a config without a
# profile handler (and one profile) gets a single-profile-handler.
DEFAULTS = ConfigDefaults(
    config_yaml=DEFAULT_CONFIG_YAML,
    picker=pickers.MaxScorePicker.type_name,
    profile_handler=profile_handlers.SingleProfileHandler.type_name,
)


def new_registry() -> Registry:
    """A fresh registry with the built-in types and llm-d's defaults (add your types to it)."""
    registry = Registry(DEFAULTS)
    for module in _MODULES:
        module.register(registry)
    return registry


@cache
def default_registry() -> Registry:
    """The shared registry of built-in types (build your own with `new_registry()` to add
    plugin types)."""
    return new_registry()
