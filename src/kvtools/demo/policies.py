"""The routing policies the demo compares, as what runs in front of the engines."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from epp.plugins import DEFAULT_CONFIG_YAML
from epp.plugins.precise_profile import precise_profile_config
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
        "picker, precise profile: predicted TTFT from KV-event prefix matches and load",
        True,
    ),
    "precise-weighted": Policy(
        "precise-weighted",
        "picker, llm-d's weighted sum with the precise prefix (queue 2, kv-util 2, prefix 3)",
        True,
    ),
}


def picker_config(
    policy: str,
    *,
    model: str,
    model_dir: Path,
    events_endpoint: str,
    ttft_parameters: Mapping[str, Any] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> str:
    """The EndpointPickerConfig of a picker policy: the picker's own default config
    (approximate), or the precise profile (`epp.plugins.precise_profile`: our predicted-TTFT
    cost model by default, llm-d's weighted sum for `precise-weighted`) tokenizing with the
    demo model and fed by the engines' events (`block_size`: the engines' KV block size in
    tokens, which the prompt's keys must be cut at)."""
    if policy == "approximate":
        return DEFAULT_CONFIG_YAML
    if policy in ("precise", "precise-weighted"):
        doc = precise_profile_config(
            tokenizers={model: str(model_dir)},
            events_endpoint=events_endpoint,
            block_size=block_size,
            variant="weighted" if policy == "precise-weighted" else "cost",
            ttft_parameters=ttft_parameters,
        )
        return yaml.safe_dump(doc, sort_keys=False)
    raise ValueError(f"policy {policy!r} runs no picker")
