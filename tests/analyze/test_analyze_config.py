"""EndpointPickerConfig weights and --weights / --sweep parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtools.analyze.config import ConfigError, ProfileWeights, load_picker_config
from kvtools.analyze.runner import SweepError, parse_sweep
from kvtools.analyze.simulation import SimSettings

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- name: kv
  type: kv-cache-utilization-scorer
- type: precise-prefix-cache-scorer
  parameters:
    indexerConfig: {}
- type: prefix-cache-scorer
  name: approx
  parameters: {lruCapacityPerServer: 1000, blockSizeTokens: 64}
- type: lora-affinity-scorer
- type: load-aware-scorer
  parameters: {threshold: 10}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: kv
    weight: 0.5
  - pluginRef: precise-prefix-cache-scorer
    weight: 4
  - pluginRef: lora-affinity-scorer
    weight: 1
  - pluginRef: max-score-picker
- name: other
  plugins:
  - pluginRef: approx
    weight: 2
  - pluginRef: load-aware-scorer
    weight: 1
"""


def test_weights_from_config(tmp_path: Path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(CONFIG)
    w = load_picker_config(path)
    assert (w.prefix, w.queue, w.kv_utilization, w.load_aware) == (4, 1, 0.5, 0)
    assert any("lora-affinity-scorer" in warning for warning in w.warnings)
    other = load_picker_config(path, "other")
    assert (other.prefix, other.queue, other.load_aware) == (2, 0, 1)
    assert (other.lru_capacity_per_server, other.block_size_tokens) == (1000, 64)
    assert other.load_aware_threshold == 10
    with pytest.raises(ConfigError, match="nope"):
        load_picker_config(path, "nope")
    path.write_text(
        "plugins: [{type: queue-scorer}]\nschedulingProfiles:\n- plugins:\n  - pluginRef: missing\n"
    )
    with pytest.raises(ConfigError, match="missing"):
        load_picker_config(path)


def test_defaults() -> None:
    w = ProfileWeights()
    assert (w.queue, w.kv_utilization, w.prefix) == (2, 2, 3)


def test_sweeps() -> None:
    base = SimSettings()
    s = parse_sweep("engines=4,8,16")
    assert [s.apply(base, v).engines for v in s.values] == [4, 8, 16]
    s = parse_sweep("weights=prefix:1,3,5")
    assert [s.apply(base, v).weights.prefix for v in s.values] == [1, 3, 5]
    assert s.label(3) == "prefix=3"
    s = parse_sweep("capacity=100,200")
    assert s.apply(base, 100).capacity_for(512) == 100
    for bad in ("engines", "foo=1", "engines=0", "weights=1,2", "weights=bogus:1", "capacity=x"):
        with pytest.raises(SweepError):
            parse_sweep(bad)
