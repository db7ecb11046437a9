"""The EndpointPickerConfig the analysis' prefix policies schedule with, loaded by the picker's
own loader (``epp.load_config`` with the picker's plugin registry).

The base is a ``--config`` file or the picker's defaults. The approximate-prefix policy runs it
with the approximate ``prefix-cache-scorer`` and the precise-prefix policy with the
``precise-prefix-cache-scorer``, whichever of the two the file names; ``--weights`` and
``--sweep weights=...`` set the weights of the named scorers in the document before it is
loaded (adding the scorer to the profile when it is missing, removing it at weight 0).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from epp import ConfigError as PickerConfigError
from epp import PickerConfig, default_registry, load_config
from epp.plugins import DEFAULT_CONFIG_YAML

__all__ = [
    "PREFIX_SCORERS",
    "WEIGHT_NAMES",
    "ConfigError",
    "PickerSetup",
    "PrefixKind",
    "weight_name",
]

PrefixKind = Literal["approximate", "precise"]

# The prefix scorer each policy runs with: the approximate one learns from its own routing,
# the precise one asks the analysis index (fed by the simulated engines' events).
PREFIX_SCORERS: dict[PrefixKind, str] = {
    "approximate": "prefix-cache-scorer",
    "precise": "precise-prefix-cache-scorer",
}
# --weights / --sweep weights=NAME -> the scorer types that weight names.
_WEIGHT_SCORERS: dict[str, tuple[str, ...]] = {
    "prefix": tuple(PREFIX_SCORERS.values()),
    "queue": ("queue-scorer",),
    "kv_utilization": ("kv-cache-utilization-scorer",),
    "load_aware": ("load-aware-scorer",),
    "active_request": ("active-request-scorer",),
    "running_requests": ("running-requests-size-scorer",),
}
WEIGHT_NAMES: tuple[str, ...] = tuple(_WEIGHT_SCORERS)
_ALIASES = {
    "kv": "kv_utilization",
    "kv-util": "kv_utilization",
    "load": "load_aware",
    "active": "active_request",
    "running": "running_requests",
    "kv-cache-utilization": "kv_utilization",
}


class ConfigError(ValueError):
    """An EndpointPickerConfig or a weight override the analysis cannot use."""


def weight_name(name: str) -> str:
    key = _ALIASES.get(name, name).replace("-", "_")
    if key not in _WEIGHT_SCORERS:
        raise ConfigError(f"unknown scorer weight {name!r} (one of {', '.join(WEIGHT_NAMES)})")
    return key


@dataclass(frozen=True, slots=True)
class PickerSetup:
    """What the prefix policies schedule with; plain data, so settings cross ``--jobs``
    processes. ``profile``: the scheduling profile ``weights`` change (None: every one)."""

    config_text: str = DEFAULT_CONFIG_YAML
    source: str = "<picker defaults>"
    profile: str | None = None
    weights: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_file(cls, path: Path, profile: str | None = None) -> PickerSetup:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        setup = cls(text, str(path), profile)
        setup.validate()
        return setup

    def with_weight(self, name: str, value: float) -> PickerSetup:
        if value < 0:
            raise ConfigError(f"weight {name}={value:g} must be >= 0")
        key = weight_name(name)
        kept = tuple((k, v) for k, v in self.weights if k != key)
        return replace(self, weights=(*kept, (key, float(value))))

    def validate(self) -> None:
        """Load both policies' configs once: errors surface before any simulation."""
        for kind in PREFIX_SCORERS:
            self.load(kind)

    def load(self, kind: PrefixKind, block_tokens: int | None = None) -> PickerConfig:
        """The picker's own config for ``kind``'s policy. With ``block_tokens`` (the trace's
        tokens per block), an approximate scorer whose block size divides it hashes whole
        trace blocks instead (see :func:`_coarsen_approximate`)."""
        doc = self.document(kind)
        config = self._load(doc)
        if kind == "approximate" and block_tokens is not None:
            coarse = _coarsen_approximate(doc, config, block_tokens)
            if coarse is not None:
                config = self._load(coarse)
        return config

    def _load(self, doc: dict[str, Any]) -> PickerConfig:
        try:
            return load_config(yaml.safe_dump(doc, sort_keys=False), default_registry())
        except PickerConfigError as e:
            raise ConfigError(f"{self.source}: {e}") from e

    def document(self, kind: PrefixKind) -> dict[str, Any]:
        """The EndpointPickerConfig document for ``kind``'s policy."""
        try:
            loaded = yaml.safe_load(self.config_text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{self.source}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{self.source}: not an EndpointPickerConfig mapping")
        doc: dict[str, Any] = copy.deepcopy(loaded)
        plugins = doc.setdefault("plugins", [])
        profiles = doc.setdefault("schedulingProfiles", [])
        if not isinstance(plugins, list) or not isinstance(profiles, list):
            raise ConfigError(f"{self.source}: plugins and schedulingProfiles must be lists")
        self._swap_prefix_scorer(plugins, PREFIX_SCORERS[kind])
        types = {_plugin_name(p): p.get("type") for p in plugins if isinstance(p, dict)}
        chosen = [
            p
            for p in profiles
            if isinstance(p, dict) and (self.profile is None or p.get("name") == self.profile)
        ]
        if self.profile is not None and not chosen:
            names = [p.get("name") for p in profiles if isinstance(p, dict)]
            raise ConfigError(f"{self.source}: no scheduling profile {self.profile!r} ({names})")
        for key, value in self.weights:
            scorer_types = _WEIGHT_SCORERS[key]
            wanted = PREFIX_SCORERS[kind] if key == "prefix" else scorer_types[0]
            for profile in chosen:
                refs = profile.setdefault("plugins", [])
                matching = [r for r in refs if types.get(r.get("pluginRef")) in scorer_types]
                if value == 0:
                    profile["plugins"] = [r for r in refs if r not in matching]
                elif matching:
                    for ref in matching:
                        ref["weight"] = value
                else:
                    if wanted not in types:
                        plugins.append({"type": wanted})
                        types[wanted] = wanted
                    refs.insert(0, {"pluginRef": wanted, "weight": value})
        return doc

    @staticmethod
    def _swap_prefix_scorer(plugins: list[Any], wanted: str) -> None:
        # The other prefix scorer's parameters describe another plugin: its defaults apply.
        for i, plugin in enumerate(plugins):
            kind = plugin.get("type") if isinstance(plugin, dict) else None
            if kind in PREFIX_SCORERS.values() and kind != wanted:
                plugins[i] = {"type": wanted, "name": _plugin_name(plugin)}

    def scorer_weights(self, kind: PrefixKind) -> dict[str, float]:
        """Weight per --weights name in the first chosen profile (0: not in it), for reports."""
        doc = self.document(kind)
        types = {_plugin_name(p): p.get("type") for p in doc["plugins"] if isinstance(p, dict)}
        profiles = [
            p
            for p in doc["schedulingProfiles"]
            if isinstance(p, dict) and (self.profile is None or p.get("name") == self.profile)
        ]
        refs = profiles[0].get("plugins", []) if profiles else []
        weights = dict.fromkeys(WEIGHT_NAMES, 0.0)
        for ref in refs:
            for key, scorer_types in _WEIGHT_SCORERS.items():
                if types.get(ref.get("pluginRef")) in scorer_types:
                    weights[key] += float(ref.get("weight", 1))
        return weights


def _coarsen_approximate(
    doc: dict[str, Any], config: PickerConfig, block_tokens: int
) -> dict[str, Any] | None:
    """The document with each approximate scorer at the trace's block size, its LRU capacity
    and match limit scaled to the same number of tokens; None when nothing changes.

    Exact for the analysis: a trace shares prompts only in whole blocks of ``block_tokens``
    and every token of a block carries the block's key, so hashing ``k`` blocks of ``s``
    tokens or one block of ``k * s`` tokens matches the same prefixes; the LRU holds the same
    tokens (rounded down to whole trace blocks, as ``lruCapacityPerServer * s // block_tokens``).
    It saves hashing and recording ``k`` times as many blocks per request (32x for Mooncake's
    512-token blocks at the default 16)."""
    params_by_name = {
        spec.name: spec.parameters
        for spec in config.plugins
        if spec.type_name == PREFIX_SCORERS["approximate"]
    }
    changed = copy.deepcopy(doc)
    touched = False
    for plugin in changed["plugins"]:
        if not isinstance(plugin, dict):
            continue
        params = params_by_name.get(_plugin_name(plugin))
        size = getattr(params, "block_size_tokens", None)
        if size is None or block_tokens <= size or block_tokens % size:
            continue
        assert params is not None
        raw = plugin.get("parameters")
        kept = {
            k: v
            for k, v in (raw if isinstance(raw, dict) else {}).items()
            if k not in ("blockSize", "hashBlockSize")
        }
        plugin["parameters"] = {
            **kept,
            "blockSizeTokens": block_tokens,
            "lruCapacityPerServer": max(1, params.lru_capacity_per_server * size // block_tokens),
            "maxPrefixBlocksToMatch": max(
                1, params.max_prefix_blocks_to_match * size // block_tokens
            ),
        }
        touched = True
    return changed if touched else None


def _plugin_name(plugin: dict[str, Any]) -> str:
    return str(plugin.get("name") or plugin.get("type"))
