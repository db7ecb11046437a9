"""No document makes the loader fail other than with a ConfigError."""

from __future__ import annotations

import contextlib
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.framework import ConfigError, SchedulerDeps, build_scheduler, load_config
from epp.plugins import default_registry

TYPES = default_registry().type_names()
PARAM_NAMES = [
    "threshold",
    "blockSizeTokens",
    "maxNumOfEndpoints",
    "requestTimeout",
    "matchLabels",
    "matchExpressions",
    "nonCachedTokens",
    "decodeProfile",
    "prefillProfile",
    "kvEventsConfig",
    "tierWeights",
    "mode",
    "label",
    "validValues",
    "modelPath",
    "lruSize",
    "bogus",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["2s", "150ms", "cache_tracking", "In", "vllm", "prefill", "decode"]),
)
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from([*PARAM_NAMES, "key", "operator", "values"]), inner, max_size=3
        ),
    ),
    max_leaves=8,
)
plugin = st.fixed_dictionaries(
    {"type": st.sampled_from([*TYPES, "nope"])},
    optional={"name": st.sampled_from(["a", "b", "prefill", "decode"]), "parameters": values},
)
ref = st.fixed_dictionaries(
    {"pluginRef": st.sampled_from([*TYPES, "a", "b"])},
    optional={"weight": st.one_of(st.integers(-1, 5), st.text(max_size=2))},
)
profile = st.fixed_dictionaries(
    {"name": st.sampled_from(["default", "prefill", "decode", "x"])},
    optional={"plugins": st.lists(ref, max_size=4)},
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "apiVersion": st.sampled_from(["llm-d.ai/v1alpha1", "v9"]),
        "kind": st.sampled_from(["EndpointPickerConfig", "Pod"]),
        "plugins": st.one_of(st.lists(plugin, max_size=5), values),
        "schedulingProfiles": st.one_of(st.lists(profile, max_size=3), values),
        "saturationDetector": values,
        "featureGates": values,
    },
)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_any_document_loads_or_fails_with_config_error(document: dict[str, Any]) -> None:
    text = yaml.safe_dump(document) + "\n"
    try:
        config = load_config(text, default_registry())
    except ConfigError:
        return
    with contextlib.suppress(ConfigError):
        build_scheduler(config, SchedulerDeps())
