"""The precise profile: the EndpointPickerConfig this project means by "precise routing" (the
demo's and the routing benchmark's `precise` policy), built in one place.

- `cost` (the default): the KV-event index as a `precise-prefix-cache-producer` (match
  lengths per engine, before the profiles), the `inflight-load-producer`, and our
  `predicted-ttft-scorer` alone in the profile: engines ranked by predicted time to first
  token (prefill of the tokens they do not hold, plus their queue), max-score picker.
- `weighted`: llm-d's weighted sum, the picker's default config with the
  `precise-prefix-cache-scorer` in the approximate scorer's place (queue 2, kv-util 2,
  precise prefix 3), for comparison and for configs that ask for it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from epp.plugins import DEFAULT_CONFIG_YAML
from kvindex.keys import DEFAULT_BLOCK_SIZE

__all__ = ["PRECISE_VARIANTS", "precise_index_parameters", "precise_profile_config"]

PRECISE_VARIANTS = ("cost", "weighted")


def precise_index_parameters(
    *,
    tokenizers: Mapping[str, str],
    events_endpoint: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    speculative_ttl: str = "2s",
) -> dict[str, Any]:
    """The KV-event index's parameters: tokenizer files per model, the ZMQ endpoint the
    engines publish to (central mode), speculative entries for fresh picks."""
    return {
        "tokenProcessorConfig": {"blockSizeTokens": block_size, "tokenizers": dict(tokenizers)},
        "kvEventsConfig": {"zmqEndpoint": events_endpoint},
        "speculativeIndexing": True,
        "speculativeTTL": speculative_ttl,
    }


def precise_profile_config(
    *,
    tokenizers: Mapping[str, str],
    events_endpoint: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    variant: str = "cost",
    ttft_parameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The precise profile's EndpointPickerConfig as a document (`yaml.safe_dump` it)."""
    index = precise_index_parameters(
        tokenizers=tokenizers, events_endpoint=events_endpoint, block_size=block_size
    )
    if variant == "weighted":
        doc: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_YAML)
        for plugin in doc["plugins"]:
            if plugin["type"] == "prefix-cache-scorer":
                plugin["type"] = "precise-prefix-cache-scorer"
                plugin["parameters"] = index
        for profile in doc["schedulingProfiles"]:
            for ref in profile["plugins"]:
                if ref["pluginRef"] == "prefix-cache-scorer":
                    ref["pluginRef"] = "precise-prefix-cache-scorer"
        return doc
    if variant != "cost":
        raise ValueError(f"precise profile variant {variant!r}: one of {PRECISE_VARIANTS}")
    ttft: dict[str, Any] = {"type": "predicted-ttft-scorer"}
    if ttft_parameters:
        ttft["parameters"] = dict(ttft_parameters)
    return {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [
            {"type": "precise-prefix-cache-producer", "parameters": index},
            {"type": "inflight-load-producer"},
            ttft,
            {"type": "single-profile-handler"},
            {"type": "max-score-picker"},
        ],
        "schedulingProfiles": [
            {
                "name": "default",
                "plugins": [
                    {"pluginRef": "predicted-ttft-scorer", "weight": 1},
                    {"pluginRef": "max-score-picker"},
                ],
            }
        ],
    }
