"""The routing policies the demo compares, as what runs in front of the engines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

_PRECISE = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: queue-scorer
  - type: kv-cache-utilization-scorer
  - type: precise-prefix-cache-scorer
    parameters:
      tokenProcessorConfig:
        blockSizeTokens: 16
        tokenizers:
          {model}: {model_dir}
      kvEventsConfig:
        zmqEndpoint: {events}
      speculativeIndexing: true
      speculativeTTL: 2s
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 2
      - pluginRef: kv-cache-utilization-scorer
        weight: 2
      - pluginRef: precise-prefix-cache-scorer
        weight: 3
      - pluginRef: max-score-picker
"""


def picker_config(policy: str, *, model: str, model_dir: Path, events_endpoint: str) -> str:
    """The EndpointPickerConfig of a picker policy ("" = the picker's built-in default)."""
    if policy == "approximate":
        return ""
    if policy == "precise":
        return _PRECISE.format(model=model, model_dir=model_dir, events=events_endpoint)
    raise ValueError(f"policy {policy!r} runs no picker")
