"""The corpus of real upstream EndpointPickerConfigs (tests/epp/data/upstream_configs/, each
with its source repo, path and commit): every config upstream accepts loads and builds here,
every loader fixture upstream rejects is rejected here (for the same reason), and the
compatibility table in docs/epp-config.md is the one tools/epp_config_compat.py generates.

Configs that use a plugin type this picker does not have yet are listed in
EXPECTED_MISSING_TYPE; the list can only shrink: a listed file that loads (or fails for any
other reason) fails the test, so the entry must go when the type arrives."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import epp_config_compat as corpus

from epp.framework import ConfigError, load_config
from epp.plugins import new_registry

# file (relative to the corpus) -> the plugin type it fails on until that type is added.
EXPECTED_MISSING_TYPE: dict[str, str] = {}

# Upstream's rejecting loader fixtures -> what our message says (the same reason as upstream).
REJECTION_REASON: dict[str, str] = {
    "errorBadExtractorReferenceText": "must be a mapping with pluginRef",
    "errorBadPluginJSONText": 'parameter "blockSize": must be an integer',
    "errorBadPluginReferencePluginText": "unknown plugin type 'unknown-plugin-type'",
    "errorBadPluginReferenceText": "type is required",
    "errorBadProfilePluginRefText": "pluginRef 'non-existent-plugin' names no plugin",
    "errorBadProfilePluginText": "pluginRef is required",
    "errorBadSourceReferenceText": "dataLayer.sources[0]: pluginRef 'test-one' names no plugin",
    "errorBadYamlText": "plugins[0]: must be a mapping",
    "errorDuplicatePluginText": "duplicate plugin name 'test1'",
    "errorDuplicateProfileText": "duplicate profile name",
    "errorFlowControlMissingPluginText": "orderingPolicyRef 'non-existent-policy' names no plugin",
    "errorFlowControlWrongPluginTypeText": "'testScorer' is a test-scorer, not a ordering-policy",
    "errorMultiProfilesUseSingleProfileHandlerText": "cannot run 2 scheduling profiles",
    "errorNoProfileHandlersText": "2 scheduling profiles need a profile handler",
    "errorNoProfileNameText": "name is required",
    "errorParserWrongPluginNameText": "pluginRef 'wrongParser' names no plugin",
    "errorParserWrongPluginTypeText": "'maxScore' is a max-score-picker, not a parser",
    "errorTwoPickersText": "a profile takes one picker",
    "errorTwoProfileHandlersText": "only one profile handler may be configured",
    "errorUndefinedSaturationDetectorPluginText": "pluginRef 'unknown-plugin' names no plugin",
    "errorUnknownFeatureGateText": "feature gate 'unknown-gate' is unknown",
}

FILES = corpus.corpus_files()
NAMES = [corpus.name_of(p) for p in FILES]


@pytest.fixture(autouse=True)
def _quiet_unknown_parameter_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="epp.framework.config")


def test_the_corpus_is_there_and_every_file_names_its_source() -> None:
    assert len(FILES) >= 60
    for path in FILES:
        repo, upstream_path, commit = corpus.source_of(path)
        assert repo.startswith("github.com/") and upstream_path and len(commit) == 40


def test_the_lists_name_corpus_files() -> None:
    assert set(EXPECTED_MISSING_TYPE) <= set(NAMES)
    rejecting = {p.stem for p in FILES if corpus.upstream_rejects(p)}
    assert rejecting == set(REJECTION_REASON)


@pytest.mark.parametrize("path", FILES, ids=NAMES)
def test_upstream_config(path: Path) -> None:
    name = corpus.name_of(path)
    result = corpus.outcome(path)
    if name in EXPECTED_MISSING_TYPE:
        # Listed: it must still fail on exactly that type, else the entry is stale.
        assert not result.loaded, f"{name} loads now: remove it from EXPECTED_MISSING_TYPE"
        assert result.missing_type == EXPECTED_MISSING_TYPE[name], result.error
    elif corpus.upstream_rejects(path):
        assert not result.loaded, f"{name}: upstream rejects it; it loads here"
        assert REJECTION_REASON[path.stem] in result.error
    else:
        assert result.loaded, f"{name}: {result.error}"


def test_the_doc_table_is_current() -> None:
    assert corpus.write_doc(check=True), "run: .venv/bin/python tools/epp_config_compat.py"


def test_data_layer_gates_and_flow_control_are_kept() -> None:
    # Read through every section even where a plugin type is still missing.
    path = corpus.CORPUS / "llm-d-router-loader-fixtures" / "successSchedulerConfigText.yaml"
    config = load_config(path, corpus.fixture_registry())
    assert config.data_layer is not None
    assert [(s.plugin_ref, s.extractor_refs) for s in config.data_layer.sources] == [
        ("testSource", ("testExtractor",))
    ]
    assert config.feature_gates == {"dataLayer", "flowControl"}
    assert config.flow_control is not None and config.flow_control.enabled


def test_flow_control_is_parsed_validated_and_kept() -> None:
    config = load_config(
        corpus.CORPUS / "llm-d-router-loader-fixtures" / "successFlowControlConfigText.yaml",
        new_registry(),
    )
    fc = config.flow_control
    assert fc is not None and fc.enabled
    assert fc.max_bytes == 1024 and fc.default_request_ttl_s == 60.0
    assert fc.usage_limit_policy_ref == "static-usage-limit-policy"
    assert config.inactive_sections == ()  # the gate is on: flow control acts
    with pytest.raises(ConfigError, match="duplicate priority level 1"):
        load_config(
            "kind: EndpointPickerConfig\nfeatureGates: [flowControl]\n"
            "flowControl: {priorityBands: [{priority: 1}, {priority: 1}]}\n",
            new_registry(),
        )
    with pytest.raises(ConfigError, match="maxBytes must be a quantity"):
        load_config("kind: EndpointPickerConfig\nflowControl: {maxBytes: lots}\n", new_registry())


UNKNOWN_PARAMETER = """\
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
  parameters: {futureKnob: 1}
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 2, nested: {deeper: true}}
"""


def test_unknown_parameters_are_accepted_reported_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="epp.framework.config")
    config = load_config(UNKNOWN_PARAMETER, new_registry())
    assert [(u.plugin_type, u.parameter) for u in config.unknown_parameters] == [
        ("queue-scorer", "futureKnob"),
        ("max-score-picker", "nested"),
    ]
    load_config(UNKNOWN_PARAMETER, new_registry())  # a second load: no second warning
    warned = [r.getMessage() for r in caplog.records if "futureKnob" in r.getMessage()]
    assert len(warned) <= 1  # once per process (an earlier test may have warned already)
    with pytest.raises(ConfigError, match='parameter "futureKnob": unknown parameter'):
        load_config(UNKNOWN_PARAMETER, new_registry(), strict=True)


@pytest.mark.parametrize(
    "api_version",
    [
        "llm-d.ai/v1alpha1",
        "llm-d.ai/v1",
        "inference.networking.x-k8s.io/v1alpha1",
        "config.x-k8s.io/v1alpha1",
        "config.apix.gateway-api-inference-extension.sigs.k8s.io/v1alpha1",
    ],
)
def test_every_upstream_api_version(api_version: str) -> None:
    config = load_config(f"apiVersion: {api_version}\nkind: EndpointPickerConfig\n", new_registry())
    assert config.api_version == api_version


def test_section_spellings_and_both_saturation_forms() -> None:
    registry = new_registry()
    old = load_config(
        "kind: EndpointPickerConfig\ndata: {sources: []}\n"
        "saturationDetector: {queueDepthThreshold: 7}\n",
        registry,
    )
    assert old.aliased_sections == ("data",) and old.saturation.queue_depth_threshold == 7
    with pytest.raises(ConfigError, match="'data' and 'dataLayer' are the same section"):
        load_config("kind: EndpointPickerConfig\ndata: {}\ndataLayer: {}\n", registry)
    with pytest.raises(ConfigError, match="pluginRef 'nope' names no plugin"):
        load_config("kind: EndpointPickerConfig\nsaturationDetector: {pluginRef: nope}\n", registry)
    with pytest.raises(ConfigError, match="pluginRef 'queue-scorer' is a queue-scorer, not"):
        load_config(
            "kind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n"
            "requestHandling: {parser: {pluginRef: queue-scorer}}\n",
            registry,
        )
