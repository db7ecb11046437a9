"""A fresh real-vLLM capture against the committed one (tests/sim/data/vllm_capture_block32.json).

tests/sim/test_sim_fidelity_vllm.py holds the simulator to the committed capture without vLLM.
This test re-records it with the same code (tools/record_vllm_capture.py: its own engine, one,
started and stopped here, 1.5-2 minutes on 2 cores) and requires the same stream, so a vLLM
upgrade or an engine-flag change that alters the events is caught here, and the committed
capture (and the simulator) can be brought up to date: `python tools/record_vllm_capture.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.record_vllm_capture import canonical, capture_matches_replay, record_capture

_COMMITTED = Path(__file__).parents[1] / "sim" / "data" / "vllm_capture_block32.json"


# One engine start (~1.5 min alone on 2 cores, up to 7 with the cores shared) and 22 requests.
@pytest.mark.timeout(900)
def test_fresh_vllm_capture_matches_the_committed_one(tmp_path: Path, vllm_python: Path) -> None:
    committed = json.loads(_COMMITTED.read_text())
    fresh = record_capture(tmp_path, vllm_python=vllm_python)
    capture_matches_replay(fresh)
    hint = (
        f"vLLM {fresh['vllm_version']} (committed capture: {committed['vllm_version']}) "
        "publishes a different stream; re-record with `python tools/record_vllm_capture.py`, "
        "then fix the simulator or docs/simulator.md"
    )
    assert fresh["engine"] == committed["engine"], hint
    assert fresh["steps"] == committed["steps"], hint
    assert [m["topic"] for m in fresh["live"]] == [m["topic"] for m in committed["live"]], hint
    steps = committed["steps"]
    fresh_batches = [m["batch"] for m in fresh["live"]]
    committed_batches = [m["batch"] for m in committed["live"]]
    assert canonical(fresh_batches, steps) == canonical(committed_batches, steps), hint
    # Replay framing: the same messages, frame by frame but the payloads (their timestamps
    # differ; capture_matches_replay has checked they hold the live batches).
    assert len(fresh["replay"]) == len(committed["replay"]), hint
    for mine, theirs in zip(fresh["replay"], committed["replay"], strict=True):
        assert len(mine) == len(theirs) and mine[:3] == theirs[:3], hint
