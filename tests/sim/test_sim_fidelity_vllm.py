"""The simulator against a recorded real vLLM engine (no vLLM needed).

tests/sim/data/vllm_capture_block32.json holds what one real vLLM 0.32 engine (CPU build,
32-token blocks, 129 KV blocks) published for the request sequence of
tools/record_vllm_capture.py: every live batch from seq 0 and the replay ROUTER's answer. The
same sequence goes through `kvtools.sim`'s engine core (same block size, same usable capacity,
sha256_cbor with vLLM's NONE_HASH seed) publishing through its real `EventPublisher`, and the
two streams must agree batch for batch and event for event: kinds and order, token ids, block
hashes and parents (vLLM's own hashes, exactly), evictions (which blocks, in which order),
when AllBlocksCleared arrives, the replay answer's framing, and the cached tokens each request
got. The only tokens allowed to differ are the ones the engines *generated* (random weights
there, a PRNG here): a block filled during decode is matched by position, and its hash through a
consistent one-to-one map.

Re-record with `python tools/record_vllm_capture.py` (needs `make vllm-env`);
tests/real_vllm/test_real_vllm_sim_fidelity.py re-records and compares with the committed file.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kvtools.sim.api import parse_generation
from kvtools.sim.engine import (
    Admitted,
    EngineConfig,
    EngineCore,
    EngineRequest,
    KVCacheReportMode,
)
from kvtools.sim.publisher import EventPublisher
from kvtools.sim.timing import TimingModel
from kvtools.sim.tokenizer import ByteTokenizer
from tools.record_vllm_capture import (
    END_SEQ,
    canonical,
    capture_matches_replay,
    replay_all,
    request_sequence,
)

CAPTURE = Path(__file__).parent / "data" / "vllm_capture_block32.json"
INSTANT = TimingModel(0.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def capture() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(CAPTURE.read_text())
    return loaded


# ----------------------------------------------------------------------------- the simulator


@dataclass
class SimRun:
    batches: list[list[Any]]  # decoded payloads [ts, events, dp_rank], by seq
    replay: list[list[bytes]]  # the replay answer's frames as a DEALER receives them
    cached_tokens: list[int | None]  # per step (None for a reset)


def sim_config(capture: Mapping[str, Any], **overrides: Any) -> EngineConfig:
    engine = capture["engine"]
    seed = engine["pythonhashseed"]
    config = EngineConfig(
        model=engine["model"],
        block_size=engine["block_size"],
        # vLLM counts its null block in num_gpu_blocks; the simulator counts usable blocks.
        num_gpu_blocks=engine["num_gpu_blocks"] - 1,
        max_num_seqs=8,
        max_model_len=4096,
        hash_algo=engine["prefix_caching_hash_algo"],
        hash_seed=seed if seed is not None else "vllm-none-hash",
        timing=INSTANT,
        # vLLM's default; the simulator's is "full" (docs/simulator.md).
        kv_cache_report_mode="incremental",
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


async def _run_steps(core: EngineCore, steps: Sequence[Mapping[str, Any]]) -> list[int | None]:
    cached: list[int | None] = []
    for i, step in enumerate(steps):
        if step["op"] == "reset":
            core.reset_prefix_cache()
            cached.append(None)
            continue
        mode: KVCacheReportMode | None = step.get("vllm_xargs", {}).get("kv_cache_report_mode")
        request = EngineRequest(
            request_id=f"step-{i}",
            prompt_token_ids=list(step["prompt"]),
            max_tokens=step["max_tokens"],
            cache_salt=step.get("cache_salt"),
            kv_cache_report_mode=mode,
        )
        admitted = None
        async for item in core.generate(request):
            if isinstance(item, Admitted):
                admitted = item
        assert admitted is not None
        cached.append(admitted.cached_tokens)
    return cached


def run_sim(capture: Mapping[str, Any], **overrides: Any) -> SimRun:
    """The capture's steps through one simulated engine core, one after the other as the
    recorder sent them; the batches come back through the publisher's replay socket."""
    topic = capture["engine"]["topic"]
    publisher = EventPublisher(
        "tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", topic=topic
    )
    try:
        core = EngineCore(sim_config(capture, **overrides), publisher)
        cached = asyncio.run(_run_steps(core, capture["steps"]))
        assert publisher.flush()
        replay = replay_all(publisher.bound_replay_endpoint or "")
    finally:
        publisher.close()
    batches = [msgspec.msgpack.decode(frames[3]) for frames in replay[:-1]]
    return SimRun(batches, replay, cached)


# ----------------------------------------------------------------------------- comparison


def summary(batches: Sequence[Sequence[Any]]) -> list[str]:
    """One line per event, for a readable first difference."""
    lines = []
    for seq, (_, events, *_) in enumerate(batches):
        for event in events:
            kind = event["type"]
            hashes = event.get("block_hashes", [])
            detail = f" x{len(hashes)}" if hashes else ""
            if kind == "BlockStored":
                detail += f" parent={'None' if event['parent_block_hash'] is None else 'set'}"
            lines.append(f"seq {seq}: {kind}{detail}")
    return lines


def compare(capture: Mapping[str, Any], sim: SimRun) -> None:
    real = [message["batch"] for message in capture["live"]]
    assert summary(sim.batches) == summary(real)
    steps = capture["steps"]
    assert canonical(sim.batches, steps) == canonical(real, steps)
    real_cached = [s.get("response", {}).get("cached_tokens") for s in steps]
    assert sim.cached_tokens == real_cached


# ----------------------------------------------------------------------------- tests


def test_capture_is_the_recorders_sequence_and_consistent(capture: dict[str, Any]) -> None:
    assert capture["format"] == 1 and capture["vllm_version"].startswith("0.32")
    recorded = [{k: v for k, v in s.items() if k != "response"} for s in capture["steps"]]
    assert recorded == [step.to_json() for step in request_sequence()]
    assert capture["live"][0]["seq"] == 0
    assert [m["seq"] for m in capture["live"]] == list(range(len(capture["live"])))
    capture_matches_replay(capture)
    # The capture exercises what it is meant to: evictions, a reset, duplicates, a re-report.
    events = [e for m in capture["live"] for e in m["batch"][1]]
    kinds = {e["type"] for e in events}
    assert kinds == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
    stored = [h for e in events if e["type"] == "BlockStored" for h in e["block_hashes"]]
    assert len(stored) > len(set(stored))  # some hash stored twice
    assert sum(e["type"] == "BlockRemoved" for e in events) >= 10


def test_sim_event_stream_matches_vllm(capture: dict[str, Any]) -> None:
    compare(capture, run_sim(capture))


def test_sim_replay_framing_matches_vllm(capture: dict[str, Any]) -> None:
    sim = run_sim(capture)
    real = [[base64.b64decode(f) for f in frames] for frames in capture["replay"]]
    assert len(sim.replay) == len(real)
    for mine, theirs in zip(sim.replay, real, strict=True):
        assert len(mine) == len(theirs)
        assert mine[0] == theirs[0] == b""
        assert mine[1] == theirs[1]  # the topic (the end marker's is empty)
        assert mine[2] == theirs[2]  # seq, 8 bytes big-endian; END_SEQ last
    assert sim.replay[-1] == real[-1] == [b"", b"", END_SEQ, b""]
    # The payload: the same msgpack batch array, same event maps (field names, key order).
    for mine, theirs in zip(sim.replay[:-1], real[:-1], strict=True):
        ours = msgspec.msgpack.decode(mine[3])
        vllm = msgspec.msgpack.decode(theirs[3])
        assert len(ours) == len(vllm) == 3 and ours[2] == vllm[2] == 0
        assert [list(e) for e in ours[1]] == [list(e) for e in vllm[1]]


@pytest.mark.parametrize(
    "regression",
    [
        pytest.param({"kv_cache_report_mode": "full"}, id="re-report-every-hit"),
        pytest.param({"num_gpu_blocks": 127}, id="one-block-less"),
        pytest.param({"hash_seed": "0"}, id="another-none-hash"),
    ],
)
def test_the_comparison_catches_a_different_engine(
    capture: dict[str, Any], regression: dict[str, Any]
) -> None:
    with pytest.raises(AssertionError):
        compare(capture, run_sim(capture, **regression))


def test_vllm_xargs_report_mode_reaches_the_engine() -> None:
    def parse(body: dict[str, Any]) -> KVCacheReportMode | None:
        parsed = parse_generation(
            body, chat=False, base_model="m", loras={}, tokenizer=ByteTokenizer()
        )
        return parsed.kv_cache_report_mode

    assert parse({"prompt": [1, 2]}) is None
    assert parse({"prompt": [1], "vllm_xargs": {"kv_cache_report_mode": "full"}}) == "full"
