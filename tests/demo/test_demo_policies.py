"""The demo compares the picker's real profiles: its default config (approximate prefix), the
precise profile (predicted-ttft-scorer over the KV-event index) and llm-d's weighted sum with
the precise scorer, each loaded by the picker's own loader."""

from __future__ import annotations

from pathlib import Path

import epp
from kvtools.demo.policies import picker_config


def profile(text: str) -> dict[str, tuple[str, float]]:
    config = epp.load_config(text, epp.default_registry())
    types = {spec.name: spec.type_name for spec in config.plugins}
    (default,) = config.profiles
    return {ref.plugin_ref: (types[ref.plugin_ref], ref.weight) for ref in default.plugins}


def test_approximate_is_the_pickers_default_profile_with_its_scorers() -> None:
    text = picker_config("approximate", model="m", model_dir=Path("/m"), events_endpoint="e")
    weights = {t: w for t, w in profile(text).values()}
    assert weights["prefix-cache-scorer"] == 3
    assert weights["queue-scorer"] == 2 and weights["kv-cache-utilization-scorer"] == 2
    assert profile(text) == profile("")  # exactly what `epp serve` runs with no config


def test_precise_is_the_predicted_ttft_profile() -> None:
    text = picker_config("precise", model="m", model_dir=Path("/m"), events_endpoint="tcp://*:5557")
    assert profile(text)["predicted-ttft-scorer"] == ("predicted-ttft-scorer", 1)
    assert {t for t, _w in profile(text).values()} == {"predicted-ttft-scorer", "max-score-picker"}
    config = epp.load_config(text, epp.default_registry())
    assert "precise-prefix-cache-producer" in {spec.type_name for spec in config.plugins}


def test_precise_weighted_swaps_in_the_precise_scorer_only() -> None:
    text = picker_config(
        "precise-weighted", model="m", model_dir=Path("/m"), events_endpoint="tcp://*:5557"
    )
    refs = profile(text)
    assert refs["precise-prefix-cache-scorer"] == ("precise-prefix-cache-scorer", 3)
    assert "prefix-cache-scorer" not in refs
    assert refs["queue-scorer"] == ("queue-scorer", 2)
