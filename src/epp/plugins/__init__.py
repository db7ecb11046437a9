"""The built-in plugin types, registered under llm-d's type names."""

from __future__ import annotations

from functools import cache

from epp.framework.registry import Registry
from epp.plugins import (
    affinity,
    filters,
    inflight,
    load,
    pickers,
    precise_prefix,
    predicted_latency,
    prefix,
    profile_handlers,
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
)


def new_registry() -> Registry:
    registry = Registry()
    for module in _MODULES:
        module.register(registry)
    return registry


@cache
def default_registry() -> Registry:
    """The shared registry of built-in types (build your own with `new_registry()` to add
    plugin types)."""
    return new_registry()
