"""Scorer weights from an llm-d EndpointPickerConfig YAML, parsed here (kvindex never
imports the picker package) for the scorer types the simulation models."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "MODELLED_SCORERS",
    "ConfigError",
    "ProfileWeights",
    "apply_weight_override",
    "load_picker_config",
    "parse_picker_config",
]

# Scorer type -> the name of its weight in ProfileWeights.
MODELLED_SCORERS: dict[str, str] = {
    "queue-scorer": "queue",
    "kv-cache-utilization-scorer": "kv_utilization",
    "prefix-cache-scorer": "prefix",
    "precise-prefix-cache-scorer": "prefix",
    "load-aware-scorer": "load_aware",
    "active-request-scorer": "active_request",
    "running-requests-size-scorer": "running_requests",
}
# Plugin types that are not scorers and need no model (the picker is max-score).
_IGNORED_TYPES = {"max-score-picker", "single-profile-handler"}
# Short names accepted by --sweep weights=NAME:... and --weights NAME=W.
WEIGHT_NAMES = (
    "prefix",
    "queue",
    "kv_utilization",
    "load_aware",
    "active_request",
    "running_requests",
)
_ALIASES = {
    "kv": "kv_utilization",
    "kv-util": "kv_utilization",
    "load": "load_aware",
    "active": "active_request",
    "running": "running_requests",
    "kv-cache-utilization": "kv_utilization",
}


class ConfigError(ValueError):
    """An EndpointPickerConfig the analysis cannot use."""


@dataclass(frozen=True, slots=True)
class ProfileWeights:
    """Weights of one scheduling profile's scorers (0 = not in the profile)."""

    prefix: float = 3.0
    queue: float = 2.0
    kv_utilization: float = 2.0
    load_aware: float = 0.0
    active_request: float = 0.0
    running_requests: float = 0.0
    # Approximate prefix scorer parameters (llm-d defaults).
    lru_capacity_per_server: int = 31250  # blocks of block_size_tokens
    block_size_tokens: int = 16
    load_aware_threshold: int = 128
    picker: str = "max-score-picker"
    warnings: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in WEIGHT_NAMES}


def weight_name(name: str) -> str:
    key = _ALIASES.get(name, name).replace("-", "_")
    if key not in WEIGHT_NAMES:
        raise ConfigError(f"unknown scorer weight {name!r} (one of {', '.join(WEIGHT_NAMES)})")
    return key


def apply_weight_override(weights: ProfileWeights, name: str, value: float) -> ProfileWeights:
    changes: dict[str, Any] = {weight_name(name): float(value)}
    return replace(weights, **changes)


def parse_picker_config(doc: Any, profile: str | None = None) -> ProfileWeights:
    """Weights of ``profile`` (default: the first scheduling profile)."""
    if not isinstance(doc, dict):
        raise ConfigError("EndpointPickerConfig: expected a mapping at the top level")
    plugins = doc.get("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigError("EndpointPickerConfig: plugins must be a list")
    by_name: dict[str, dict[str, Any]] = {}
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
            raise ConfigError(f"EndpointPickerConfig: plugins[{i}] needs a string type")
        by_name[str(plugin.get("name") or plugin["type"])] = plugin
    profiles = doc.get("schedulingProfiles") or []
    if not isinstance(profiles, list) or not profiles:
        raise ConfigError("EndpointPickerConfig: schedulingProfiles must list one profile")
    chosen = profiles[0]
    if profile is not None:
        matches = [p for p in profiles if isinstance(p, dict) and p.get("name") == profile]
        if not matches:
            raise ConfigError(f"EndpointPickerConfig: no scheduling profile named {profile!r}")
        chosen = matches[0]
    if not isinstance(chosen, dict):
        raise ConfigError("EndpointPickerConfig: a scheduling profile must be a mapping")
    weights: dict[str, Any] = dict.fromkeys(WEIGHT_NAMES, 0.0)
    params: dict[str, Any] = {}
    warnings: list[str] = []
    picker = "max-score-picker"
    for ref in chosen.get("plugins") or []:
        if not isinstance(ref, dict) or not isinstance(ref.get("pluginRef"), str):
            raise ConfigError("EndpointPickerConfig: profile plugins need a pluginRef")
        plugin = by_name.get(ref["pluginRef"])
        if plugin is None:
            raise ConfigError(
                f"EndpointPickerConfig: pluginRef {ref['pluginRef']!r} names no plugin"
            )
        kind = plugin["type"]
        parameters = plugin.get("parameters") or {}
        if kind in MODELLED_SCORERS:
            weight = ref.get("weight", 1)
            if not isinstance(weight, int | float) or isinstance(weight, bool):
                raise ConfigError(
                    f"EndpointPickerConfig: weight of {ref['pluginRef']!r} must be a number"
                )
            weights[MODELLED_SCORERS[kind]] += float(weight)
            if kind == "prefix-cache-scorer" and isinstance(parameters, dict):
                if "lruCapacityPerServer" in parameters:
                    params["lru_capacity_per_server"] = int(parameters["lruCapacityPerServer"])
                if "blockSizeTokens" in parameters:
                    params["block_size_tokens"] = int(parameters["blockSizeTokens"])
            if (
                kind == "load-aware-scorer"
                and isinstance(parameters, dict)
                and "threshold" in parameters
            ):
                params["load_aware_threshold"] = int(parameters["threshold"])
        elif kind.endswith("-picker"):
            picker = kind
            if kind != "max-score-picker":
                warnings.append(f"picker {kind!r} is not modelled; using max-score-picker")
        elif kind not in _IGNORED_TYPES:
            warnings.append(f"plugin {ref['pluginRef']!r} of type {kind!r} is not modelled")
    return ProfileWeights(**weights, **params, picker=picker, warnings=tuple(warnings))


def load_picker_config(path: Path, profile: str | None = None) -> ProfileWeights:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return parse_picker_config(doc, profile)
