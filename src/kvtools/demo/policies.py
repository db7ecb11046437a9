"""The routing policies the demo compares, as what runs in front of the engines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from epp.plugins import DEFAULT_CONFIG_YAML
from kvindex.keys import DEFAULT_BLOCK_SIZE

__all__ = ["POLICIES", "Policy", "picker_config"]


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    description: str
    uses_picker: bool  # False: Envoy balances round-robin by itself


POLICIES: dict[str, Policy] = {
    "round-robin": Policy("round-robin", "Envoy round-robin, no picker", False),
    "approximate": Policy(
        "approximate",
        "picker, default profile (queue 2, kv-util 2, approximate prefix 3)",
        True,
    ),
    "precise": Policy(
        "precise",
        "picker, precise prefix from KV events (queue 2, kv-util 2, precise prefix 3)",
        True,
    ),
}


def _precise_document(model: str, model_dir: Path, events: str) -> dict[str, Any]:
    """The picker's default config with the precise scorer in the approximate one's place,
    tokenizing with the demo model and fed by the engines' events."""
    doc: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_YAML)
    for plugin in doc["plugins"]:
        if plugin["type"] == "prefix-cache-scorer":
            plugin["type"] = "precise-prefix-cache-scorer"
            plugin["parameters"] = {
                "tokenProcessorConfig": {
                    "blockSizeTokens": DEFAULT_BLOCK_SIZE,
                    "tokenizers": {model: str(model_dir)},
                },
                "kvEventsConfig": {"zmqEndpoint": events},
                "speculativeIndexing": True,
                "speculativeTTL": "2s",
            }
    for profile in doc["schedulingProfiles"]:
        for ref in profile["plugins"]:
            if ref["pluginRef"] == "prefix-cache-scorer":
                ref["pluginRef"] = "precise-prefix-cache-scorer"
    return doc


def picker_config(policy: str, *, model: str, model_dir: Path, events_endpoint: str) -> str:
    """The EndpointPickerConfig of a picker policy: the picker's own default config
    (approximate), or the same with the precise scorer."""
    if policy == "approximate":
        return DEFAULT_CONFIG_YAML
    if policy == "precise":
        doc = _precise_document(model, model_dir, events_endpoint)
        return yaml.safe_dump(doc, sort_keys=False)
    raise ValueError(f"policy {policy!r} runs no picker")
