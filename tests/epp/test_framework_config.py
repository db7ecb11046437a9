"""EndpointPickerConfig loading: llm-d's sample shapes, defaulting, and error messages."""

from __future__ import annotations

import pathlib

import pytest

from epp.framework import (
    ConfigError,
    SchedulerDeps,
    build_scheduler,
    describe_config,
    load_config,
)
from epp.framework.params import parse_duration
from epp.framework.registry import Registry
from epp.plugins import default_registry, load, pickers, profile_handlers
from epp.plugins.pickers import MaxScorePicker
from epp.plugins.prefix import PrefixCacheScorer, PrefixParams

# Shapes of GIE's default config (older apiVersion, old scorer alias, legacy char block size).
GIE_DEFAULT = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-scorer
- type: prefix-cache-scorer
  parameters:
    hashBlockSize: 64
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 1
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: kv-cache-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""

# llm-d's P/D sample shape.
LLMD_PD = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-header-handler
- type: prefix-cache-scorer
  parameters:
    blockSizeTokens: 16
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters:
    nonCachedTokens: 100
- type: pd-profile-handler
  parameters:
    deciderPluginName: prefix-based-pd-decider
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
saturationDetector:
  queueDepthThreshold: 8
  kvCacheUtilThreshold: 0.75
  metricsStalenessThreshold: 150ms
featureGates:
- prepareDataPlugins
"""

# Old llm-d precise scoring selected by `mode: cache_tracking` on prefix-cache-scorer.
LLMD_CACHE_TRACKING = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: decode-filter
- type: prefix-cache-scorer
  parameters:
    mode: cache_tracking
    indexerConfig:
      tokenProcessorConfig:
        blockSize: 64
        hashSeed: "42"
      kvBlockIndexConfig:
        enableMetrics: true
- type: kv-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 2.0
  - pluginRef: kv-cache-scorer
    weight: 1.0
  - pluginRef: max-score-picker
"""


def test_defaults_match_the_documented_default_profile() -> None:
    config = load_config(None, default_registry())
    assert config.profile_handler == "single-profile-handler"
    (profile,) = config.profiles
    weights = {r.plugin_ref: r.weight for r in profile.plugins}
    assert weights == {
        "queue-scorer": 2.0,
        "kv-cache-utilization-scorer": 2.0,
        "prefix-cache-scorer": 3.0,
        "max-score-picker": 1.0,
    }
    prefix = config.plugin("prefix-cache-scorer").parameters
    assert prefix == PrefixParams(16, 2048, 31250)


def test_gie_default_shape_loads_with_old_api_version_and_aliases() -> None:
    config = load_config(GIE_DEFAULT, default_registry())
    assert config.api_version == "inference.networking.x-k8s.io/v1alpha1"
    spec = config.plugin("kv-cache-scorer")
    assert spec.type_name == "kv-cache-utilization-scorer"
    assert spec.declared_type == "kv-cache-scorer"
    # hashBlockSize is characters (64) -> 16 tokens.
    assert config.plugin("prefix-cache-scorer").parameters == PrefixParams(16, 256, 31250)
    scheduler = build_scheduler(config, SchedulerDeps())
    assert isinstance(scheduler.plugin("prefix-cache-scorer"), PrefixCacheScorer)


def test_pd_shape_with_saturation_and_feature_gates() -> None:
    config = load_config(LLMD_PD, default_registry())
    assert [p.name for p in config.profiles] == ["prefill", "decode"]
    assert config.profile_handler == "pd-profile-handler"
    assert config.saturation.queue_depth_threshold == 8
    assert config.saturation.kv_cache_util_threshold == 0.75
    assert config.saturation.metrics_staleness_threshold_s == pytest.approx(0.15)
    assert config.feature_gates == frozenset({"prepareDataPlugins"})
    scheduler = build_scheduler(config, SchedulerDeps())
    assert set(scheduler.profiles) == {"prefill", "decode"}


def test_cache_tracking_mode_needs_a_backend_factory() -> None:
    config = load_config(LLMD_CACHE_TRACKING, default_registry())
    params = config.plugin("prefix-cache-scorer").parameters
    assert params.token_processor.block_size_tokens == 16  # top-level default
    assert params.indexer.extra["tokenProcessorConfig"]["blockSize"] == 64  # passed through
    with pytest.raises(ConfigError, match=r"SchedulerDeps.extras has no PREFIX_BACKEND_FACTORY"):
        build_scheduler(config, SchedulerDeps())


def test_no_profiles_gives_a_default_profile_with_every_plugin_and_a_picker() -> None:
    config = load_config(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
        "plugins:\n- type: prefix-cache-scorer\n  parameters:\n    blockSizeTokens: 5\n",
        default_registry(),
    )
    (profile,) = config.profiles
    assert profile.name == "default"
    assert [r.plugin_ref for r in profile.plugins] == ["prefix-cache-scorer", "max-score-picker"]
    assert "max-score-picker" in config.defaulted
    assert "single-profile-handler" in config.defaulted
    scheduler = build_scheduler(config)
    assert isinstance(scheduler.profiles["default"].picker, MaxScorePicker)


def test_profile_without_picker_gets_max_score_picker() -> None:
    config = load_config(
        "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
        "schedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n",
        default_registry(),
    )
    assert [r.plugin_ref for r in config.profiles[0].plugins] == [
        "queue-scorer",
        "max-score-picker",
    ]


def test_named_instances_of_one_type() -> None:
    config = load_config(
        "kind: EndpointPickerConfig\nplugins:\n"
        "- {type: max-score-picker, name: top3, parameters: {maxNumOfEndpoints: 3}}\n"
        "- {type: queue-scorer}\n"
        "schedulingProfiles:\n- name: p\n  plugins:\n"
        "  - {pluginRef: queue-scorer}\n  - {pluginRef: top3}\n",
        default_registry(),
    )
    assert config.plugin("top3").parameters.max_num_of_endpoints == 3


def test_config_file_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(GIE_DEFAULT)
    assert load_config(path, default_registry()).source == str(path)
    assert load_config(str(path), default_registry()).source == str(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", default_registry())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: no-such-scorer\n",
            r'plugins\[1\] \(type "no-such-scorer"\): unknown plugin type .*known: .*queue-scorer',
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
            "- type: kv-cache-utilization-scorer\n- type: queue-scorer\n  name: q2\n"
            "  parameters: {foo: 1}\n",
            r'plugins\[2\] \(type "queue-scorer"\): parameter "foo": unknown parameter',
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n"
            "- {type: max-score-picker, parameters: {maxNumOfEndpoints: zero}}\n",
            r'plugins\[0\] \(type "max-score-picker"\): parameter "maxNumOfEndpoints": '
            r"must be an integer, got string 'zero'",
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n"
            "- {type: max-score-picker, parameters: {maxNumOfEndpoints: 0}}\n",
            r'parameter "maxNumOfEndpoints": must be >= 1, got 0',
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n"
            "- {type: active-request-scorer, parameters: {requestTimeout: soon}}\n",
            r'parameter "requestTimeout": invalid duration',
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n"
            "- {type: precise-prefix-cache-scorer, "
            "parameters: {kvEventsConfig: {engineType: trtllm}}}\n",
            r'parameter "kvEventsConfig.engineType": must be one of vllm, sglang',
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
            "schedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: kv-scorer\n",
            r"schedulingProfiles\[0\] \(name \"p\"\)\.plugins\[0\]: pluginRef 'kv-scorer' "
            r"names no plugin \(defined: queue-scorer\)",
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
            "schedulingProfiles:\n- name: p\n  plugins:\n  - {pluginRef: queue-scorer, "
            "weight: -1}\n",
            r"weight must be a finite number >= 0",
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
            "schedulingProfiles:\n- name: p\n  plugins:\n  - {pluginRef: queue-scorer, "
            "weight: .nan}\n",
            r"queue-scorer\): weight must be a finite number >= 0",
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
            "schedulingProfiles:\n- name: p\n  plugins:\n  - {pluginRef: queue-scorer, "
            "weight: .inf}\n",
            r"weight must be a finite number >= 0",
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: queue-scorer\n",
            r"plugins\[1\] \(type \"queue-scorer\"\): duplicate plugin name 'queue-scorer'",
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
            "schedulingProfiles:\n- name: a\n  plugins: [{pluginRef: queue-scorer}]\n"
            "- name: b\n  plugins: [{pluginRef: queue-scorer}]\n",
            r"2 scheduling profiles need a profile handler",
        ),
        ("apiVersion: v2\nkind: EndpointPickerConfig\n", r"apiVersion 'v2' is not supported"),
        ("kind: Deployment\n", r"kind 'Deployment' is not supported"),
        ("kind: EndpointPickerConfig\nplugin: []\n", r"unknown top-level field 'plugin'"),
        ("kind: EndpointPickerConfig\nplugins: [\n", r"invalid YAML"),
        (
            "kind: EndpointPickerConfig\nsaturationDetector: {kvCacheUtilThreshold: 1.5}\n",
            r'saturationDetector: parameter "saturationDetector.kvCacheUtilThreshold": '
            r"must be <= 1.0",
        ),
        (
            "kind: EndpointPickerConfig\nplugins:\n"
            "- {type: label-selector-filter, parameters: {matchExpressions: "
            "[{key: tier, operator: Near, values: [a]}]}}\n",
            r'parameter "matchExpressions\[0\].operator": must be one of In, NotIn',
        ),
    ],
)
def test_bad_configs_fail_naming_the_entry(text: str, message: str) -> None:
    # strict: the unknown-parameter case fails only there (llm-d ignores unknown names).
    with pytest.raises(ConfigError, match=message):
        load_config(text, default_registry(), strict=True)


def test_pd_handler_needs_its_profiles() -> None:
    text = (
        "kind: EndpointPickerConfig\nplugins:\n- type: pd-profile-handler\n- type: decode-filter\n"
        "schedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}]\n"
    )
    with pytest.raises(ConfigError, match=r"profile 'prefill' is not defined"):
        build_scheduler(load_config(text, default_registry()))


def test_sections_not_acted_on_are_reported() -> None:
    config = load_config(
        "kind: EndpointPickerConfig\ndata: {}\nflowControl: {maxBytes: 1Ki}\n", default_registry()
    )
    assert config.inactive_sections == ("flowControl",)
    assert config.aliased_sections == ("data",)
    assert config.flow_control is not None
    assert config.flow_control.max_bytes == 1024
    assert not config.flow_control.enabled  # no flowControl gate: llm-d ignores it too
    assert config.data_layer is not None and config.data_layer.sources == ()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("150ms", 0.15), ("2s", 2.0), ("1m30s", 90.0), ("1.5h", 5400.0), ("250us", 0.00025)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_empty_text_means_defaults_and_description_lists_the_effective_config() -> None:
    assert load_config("  \n", default_registry()) == load_config(None, default_registry())
    text = describe_config(load_config(GIE_DEFAULT, default_registry()))
    assert "plugin kv-cache-scorer: kv-cache-utilization-scorer (as kv-cache-scorer)" in text
    assert "profile default: queue-scorer*1, kv-cache-scorer*1, prefix-cache-scorer*3" in text
    assert "metricsStalenessThreshold=0.2s" in text


def test_an_empty_config_file_means_the_defaults(tmp_path: pathlib.Path) -> None:
    # `epp serve --config empty.yaml` must not build a profile without scorers (a random
    # pick): an empty file, or one with only comments, is the default config.
    defaults = load_config(None, default_registry())
    for text in ("", "\n\n", "# nothing configured yet\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        for source in (path, str(path)):
            config = load_config(source, default_registry())
            assert config.plugins == defaults.plugins
            assert config.profiles == defaults.profiles
            assert "(empty: the defaults)" in config.source


def test_a_registry_without_defaults_defaults_nothing_and_says_what_is_missing() -> None:
    # The defaulting rules are the registry's (llm-d's in epp.plugins), not the framework's.
    registry = Registry()
    for module in (load, pickers, profile_handlers):
        module.register(registry)
    with pytest.raises(
        ConfigError, match=r"profile 'default' has no picker \(types: max-score-picker, "
    ):
        load_config(None, registry)
    scorer_only = (
        "plugins:\n- type: queue-scorer\n"
        "schedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n"
    )
    with pytest.raises(ConfigError, match=r"profile 'p' has no picker"):
        load_config(scorer_only, registry)
    with_picker = scorer_only.replace(
        "- type: queue-scorer\n", "- type: queue-scorer\n- type: max-score-picker\n"
    )
    with_picker += "  - pluginRef: max-score-picker\n"
    with pytest.raises(ConfigError, match=r"no profile handler is configured .*single-profile"):
        load_config(with_picker, registry)
    config = load_config(with_picker, default_registry())
    assert config.profile_handler == "single-profile-handler"
    assert config.registry is default_registry()
    handled = with_picker.replace("plugins:\n", "plugins:\n- type: single-profile-handler\n", 1)
    assert build_scheduler(load_config(handled, registry)).plugin("single-profile-handler")
