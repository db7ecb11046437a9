"""The EndpointPickerConfig the prefix policies schedule with (PickerSetup), --weights and
--sweep parsing. The configs are loaded by the picker's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtools.analyze.config import ConfigError, PickerSetup
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
  - pluginRef: max-score-picker
"""


def plugin_types(setup: PickerSetup, kind: str) -> dict[str, str]:
    config = setup.load(kind)  # type: ignore[arg-type]
    return {spec.name: spec.type_name for spec in config.plugins}


def test_defaults_are_the_pickers_defaults() -> None:
    setup = PickerSetup()
    assert setup.scorer_weights("precise") == {
        "prefix": 3.0,
        "queue": 2.0,
        "kv_utilization": 2.0,
        "load_aware": 0.0,
        "active_request": 0.0,
        "running_requests": 0.0,
    }
    assert plugin_types(setup, "approximate")["prefix-cache-scorer"] == "prefix-cache-scorer"
    assert plugin_types(setup, "precise")["prefix-cache-scorer"] == "precise-prefix-cache-scorer"


def test_config_file_weights_and_prefix_scorer_per_policy(tmp_path: Path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(CONFIG)
    setup = PickerSetup.from_file(path)
    assert setup.scorer_weights("precise") == {
        "prefix": 4.0,
        "queue": 1.0,
        "kv_utilization": 0.5,
        "load_aware": 0.0,
        "active_request": 0.0,
        "running_requests": 0.0,
    }
    # The file names the precise scorer; approximate-prefix runs the approximate one in its
    # place (same name, same weight, its own defaults).
    approximate = plugin_types(setup, "approximate")
    assert approximate["precise-prefix-cache-scorer"] == "prefix-cache-scorer"
    assert setup.scorer_weights("approximate")["prefix"] == 4.0


def test_weight_overrides_set_add_and_remove_scorers(tmp_path: Path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(CONFIG)
    setup = (
        PickerSetup.from_file(path)
        .with_weight("prefix", 7)
        .with_weight("kv", 0)
        .with_weight("running", 1.5)
    )
    assert setup.scorer_weights("precise") == {
        "prefix": 7.0,
        "queue": 1.0,
        "kv_utilization": 0.0,
        "load_aware": 0.0,
        "active_request": 0.0,
        "running_requests": 1.5,
    }
    assert plugin_types(setup, "precise")["running-requests-size-scorer"] == (
        "running-requests-size-scorer"
    )
    # A later override of the same weight wins.
    assert setup.with_weight("prefix", 2).scorer_weights("precise")["prefix"] == 2.0
    # A prefix scorer added by --weights is the policy's own kind.
    bare = PickerSetup().with_weight("prefix", 0).with_weight("prefix", 5)
    assert plugin_types(bare, "approximate")["prefix-cache-scorer"] == "prefix-cache-scorer"


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown scorer weight 'bogus'"):
        PickerSetup().with_weight("bogus", 1)
    with pytest.raises(ConfigError, match=">= 0"):
        PickerSetup().with_weight("prefix", -1)
    with pytest.raises(ConfigError, match="cannot read config file"):
        PickerSetup.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("queue-scorer\n", "no-such-scorer\n", 1))
    with pytest.raises(ConfigError, match="no-such-scorer"):
        PickerSetup.from_file(bad)
    good = tmp_path / "epp.yaml"
    good.write_text(CONFIG)
    with pytest.raises(ConfigError, match="no scheduling profile 'nope'"):
        PickerSetup.from_file(good, "nope")


def test_parse_sweep() -> None:
    spec = parse_sweep("engines=4,8")
    assert spec.parameter == "engines" and spec.values == (4.0, 8.0)
    assert spec.apply(SimSettings(), 8).engines == 8
    weights = parse_sweep("weights=kv:0,1")
    assert weights.weight == "kv_utilization"
    swept = weights.apply(SimSettings(), 1)
    assert swept.picker.scorer_weights("precise")["kv_utilization"] == 1.0
    assert weights.apply(SimSettings(), 0).picker.scorer_weights("precise")["kv_utilization"] == 0
    for bad in ("engines=0", "capacity=1.5", "weights=prefix", "weights=nope:1", "x=1", "engines="):
        with pytest.raises(SweepError):
            parse_sweep(bad)
