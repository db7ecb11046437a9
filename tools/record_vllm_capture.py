"""Record one real vLLM engine's KV-event stream for a fixed request sequence.

The capture is the reference the simulator's fidelity test (tests/sim/test_sim_fidelity_vllm.py)
compares `kvindex-sim` against, without vLLM: the same requests, block size and capacity go
through `kvtools.sim`'s engine core, and the two event streams must agree (event kinds and
order, token ids, vLLM's own block hashes and parents, evictions, AllBlocksCleared timing,
replay framing). tests/real_vllm/test_real_vllm_sim_fidelity.py re-records with a fresh
engine and compares with the committed capture, so a vLLM upgrade that changes the stream is
caught.

One engine (`kvtools.real_vllm.engines`, the tiny model with random weights, 32-token blocks,
a 129-block KV cache, 128 usable) connects its PUB socket to a SUB this tool binds before the
engine starts, so every batch from seq 0 is seen. The requests are token-id completion
prompts, sent one after the other (each answered before the next), `max_tokens=1` unless a
step needs decode: shared prefixes, exact and block-aligned repeats, prompts ending inside a
block, one request in `kv_cache_report_mode: full`, one with a `cache_salt`, enough distinct
prompts to evict, a `/reset_prefix_cache`. A last
marker prompt settles the stream: the capture ends once the marker's BlockStored has arrived.
Then the replay ROUTER is asked for everything from seq 0 and its answer is recorded too.

Usage: python tools/record_vllm_capture.py [-o tests/sim/data/vllm_capture_block32.json]
(needs the real-engine environment, `make vllm-env`; takes 1-3 minutes, mostly start-up).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

CAPTURE_FORMAT = 1
BLOCK_SIZE = 32
# vLLM refuses a cache that cannot hold one max-length request (4096 tokens = 128 blocks of
# 32) besides its null block (one block it never hands out): 129 blocks, 128 usable.
NUM_GPU_BLOCKS = 129
MODEL = "tiny"
DEFAULT_OUTPUT = Path("tests/sim/data/vllm_capture_block32.json")
END_SEQ = (-1).to_bytes(8, "big", signed=True)

__all__ = [
    "BLOCK_SIZE",
    "CAPTURE_FORMAT",
    "DEFAULT_OUTPUT",
    "END_SEQ",
    "MODEL",
    "NUM_GPU_BLOCKS",
    "Step",
    "canonical",
    "capture_matches_replay",
    "marker_tokens",
    "record_capture",
    "replay_all",
    "request_sequence",
]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the sequence: a completion (`prompt` token ids) or a cache reset."""

    op: str  # "complete" | "reset"
    note: str
    prompt: tuple[int, ...] = ()
    max_tokens: int = 1
    # vLLM's per-request extra args (`vllm_xargs`), e.g. {"kv_cache_report_mode": "full"}.
    xargs: Mapping[str, str] = field(default_factory=dict)
    cache_salt: str | None = None

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": list(self.prompt),
            "max_tokens": self.max_tokens,
            "ignore_eos": True,  # random weights may sample EOS early
            "temperature": 0.0,
        }
        if self.xargs:
            body["vllm_xargs"] = dict(self.xargs)
        if self.cache_salt is not None:
            body["cache_salt"] = self.cache_salt
        return body

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "note": self.note}
        if self.op == "complete":
            out.update(prompt=list(self.prompt), max_tokens=self.max_tokens)
            if self.xargs:
                out["vllm_xargs"] = dict(self.xargs)
            if self.cache_salt is not None:
                out["cache_salt"] = self.cache_salt
        return out


def _tokens(count: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(1000, 30000) for _ in range(count))


def marker_tokens() -> tuple[int, ...]:
    return _tokens(40, 99)


def request_sequence() -> list[Step]:
    """The fixed request sequence (32-token blocks, 128 usable blocks)."""
    a = _tokens(100, 1)
    c = _tokens(4 * BLOCK_SIZE, 3)
    steps = [
        Step("complete", "cold prompt: 3 full blocks and 4 tokens", a),
        Step("complete", "exact repeat: 3 blocks hit, nothing new to store", a),
        Step("complete", "shares 3 blocks, adds 1 full block", a[:96] + _tokens(54, 2)),
        Step("complete", "cold block-aligned prompt: 4 blocks", c),
        Step("complete", "block-aligned repeat: the last block is recomputed", c),
        Step("complete", "block-aligned 2-block prefix of the previous prompt", c[:64]),
        Step("complete", "31 tokens: one short of a block", _tokens(31, 4)),
        Step("complete", "30 tokens + 3 decoded: a block fills during decode", _tokens(30, 5), 3),
        Step(
            "complete",
            "kv_cache_report_mode full: the 3 hit blocks are reported again",
            a + _tokens(40, 6),
            xargs={"kv_cache_report_mode": "full"},
        ),
        Step(
            "complete",
            "the first prompt salted: a chain of its own, the salt in block 0's extra keys",
            a,
            cache_salt="tenant-a",
        ),
    ]
    steps += [
        Step(
            "complete",
            f"distinct 20-block prompt {i}{' (block-aligned)' if i == 6 else ''}: "
            "fills the cache, evicts",
            # One block-aligned prompt under pressure: it needs 20 blocks, not 21.
            _tokens(640 if i == 6 else 645, 10 + i),
        )
        for i in range(8)
    ]
    steps += [
        Step("complete", "first prompt again, after the evictions", a),
        Step("reset", "POST /reset_prefix_cache"),
        Step("complete", "first request after the reset", _tokens(70, 7)),
        Step("complete", "marker: its BlockStored ends the capture", marker_tokens()),
    ]
    return steps


# ----------------------------------------------------------------------------- recording


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class _LiveCollector:
    """A SUB socket bound at `endpoint`, received on a thread of its own from before the
    engine starts: libzmq attaches a connecting peer (and sends it our subscription) only
    when the bound socket is used, so a SUB left idle while the engine publishes hears
    nothing."""

    def __init__(self, endpoint: str) -> None:
        self.messages: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(endpoint,), daemon=True)
        self._thread.start()
        self._bound.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self, endpoint: str) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sub.bind(endpoint)
        except zmq.ZMQError as exc:
            self._error = exc
            sub.close()
            self._bound.set()
            return
        self._bound.set()
        try:
            while not self._stop.is_set():
                if sub.poll(50):
                    frames = sub.recv_multipart()
                    with self._lock:
                        self.messages.append(frames)
        finally:
            sub.close()

    def snapshot(self) -> list[list[bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _wait_for_marker(collector: _LiveCollector, timeout_s: float) -> list[dict[str, Any]]:
    """The live messages, decoded, once a batch has stored the marker's block and nothing
    more has arrived for half a second."""
    marker = list(marker_tokens()[:BLOCK_SIZE])
    deadline = time.monotonic() + timeout_s
    seen_at: float | None = None
    count = -1
    while True:
        messages = collector.snapshot()
        if len(messages) != count:
            count = len(messages)
            live = [_decode_live(frames) for frames in messages]
            if seen_at is None and any(
                isinstance(event, dict) and event.get("token_ids") == marker
                for message in live
                for event in message["batch"][1]
            ):
                seen_at = time.monotonic()
            elif seen_at is not None:
                seen_at = time.monotonic()  # something after the marker: wait on
        if seen_at is not None and time.monotonic() > seen_at + 0.5:
            return live
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the marker prompt's BlockStored never arrived ({count} live messages)"
            )
        time.sleep(0.05)


def _decode_live(frames: list[bytes]) -> dict[str, Any]:
    if len(frames) != 3:
        raise AssertionError(f"a live message of {len(frames)} frames: {frames!r}")
    topic, seq8, payload = frames
    batch = msgspec.msgpack.decode(payload)
    return {"topic": topic.decode(), "seq": int.from_bytes(seq8, "big"), "batch": batch}


def replay_all(endpoint: str, start: int = 0, timeout_s: float = 10.0) -> list[list[bytes]]:
    """Every frame a replay ROUTER answers to `[b"", start]`, end marker included (a DEALER
    receives each message as `[b"", topic, seq8, payload]`)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out: list[list[bytes]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not dealer.poll(100):
                continue
            frames = dealer.recv_multipart()
            out.append(frames)
            if END_SEQ in frames:
                return out
        raise TimeoutError("no replay end marker before the deadline")
    finally:
        dealer.close()


def _metric_value(text: str, name: str, label: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            for part in line[line.index("{") + 1 : line.index("}")].split(","):
                key, _, value = part.partition("=")
                if key.strip() == label:
                    return value.strip().strip('"')
    return None


def record_capture(
    workdir: Path,
    *,
    vllm_python: Path | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Start one engine, run the sequence, return the capture (see module docstring)."""
    import urllib.request

    from kvtools.demo.processes import PortReservation
    from kvtools.real_vllm.engines import (
        KV_BYTES_PER_TOKEN,
        VLLMEngineSpec,
        find_vllm_python,
        start_engines,
    )
    from kvtools.real_vllm.model import write_real_model_dir

    python = vllm_python or find_vllm_python()
    model_dir = write_real_model_dir(workdir / "model")
    ports = PortReservation()
    spec = VLLMEngineSpec(
        name="vllm-capture",
        model=MODEL,
        model_dir=model_dir,
        http_port=ports.port(),
        events_port=ports.port(),
        replay_port=ports.port(),
        block_size=BLOCK_SIZE,
        kv_cache_bytes=NUM_GPU_BLOCKS * BLOCK_SIZE * KV_BYTES_PER_TOKEN,
        events_connect=True,
        max_num_seqs=8,
    )
    ports.close()  # the SUB and the engine take their ports now
    collector = _LiveCollector(spec.events_endpoint)
    steps = request_sequence()
    responses: list[dict[str, Any]] = []
    try:
        started = time.monotonic()
        progress(f"starting {spec.name} ({python})")
        (engine,) = start_engines([spec], workdir, python=python)
        try:
            progress(f"ready after {time.monotonic() - started:.0f} s; sending {len(steps)} steps")
            version = (
                subprocess.run(
                    [str(python), "-c", "import vllm; print(vllm.__version__)"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            with urllib.request.urlopen(f"{spec.url}/metrics", timeout=10) as reply:
                metrics = reply.read().decode()
            for step in steps:
                if step.op == "reset":
                    engine.reset_prefix_cache()
                    responses.append({})
                    continue
                out = engine.post("/v1/completions", step.body(MODEL))
                usage = out["usage"]
                details = usage.get("prompt_tokens_details") or {}
                responses.append(
                    {
                        "prompt_tokens": usage["prompt_tokens"],
                        "completion_tokens": usage["completion_tokens"],
                        "cached_tokens": details.get("cached_tokens"),
                    }
                )
            live = _wait_for_marker(collector, timeout_s=60.0)
            replay = replay_all(spec.replay_endpoint)
        finally:
            engine.stop()
    finally:
        collector.close()
    hash_seed = spec.environment().get("PYTHONHASHSEED")
    return {
        "format": CAPTURE_FORMAT,
        "recorded_by": "tools/record_vllm_capture.py",
        "vllm_version": version,
        "engine": {
            "model": MODEL,
            "block_size": BLOCK_SIZE,
            "kv_cache_bytes": spec.kv_cache_bytes,
            "num_gpu_blocks": int(
                _metric_value(metrics, "vllm:cache_config_info", "num_gpu_blocks") or 0
            ),
            "prefix_caching_hash_algo": "sha256_cbor",
            # NONE_HASH seed: PYTHONHASHSEED if the engine had it, else "vllm-none-hash".
            "pythonhashseed": hash_seed,
            "topic": spec.topic.replace(str(spec.http_port), "<http-port>"),
            # The engine's flags, ports and paths replaced by placeholders.
            "argv": [
                arg.replace(str(model_dir), "<model-dir>")
                .replace(str(spec.http_port), "<http-port>")
                .replace(str(spec.events_port), "<events-port>")
                .replace(str(spec.replay_port), "<replay-port>")
                for arg in spec.argv(Path("python"))[1:]
            ],
        },
        "steps": [
            {**step.to_json(), "response": response}
            for step, response in zip(steps, responses, strict=True)
        ],
        # Live messages [topic, seq, payload], the payload msgpack-decoded (hashes are ints).
        "live": [
            {**m, "topic": m["topic"].replace(str(spec.http_port), "<http-port>")} for m in live
        ],
        # The replay answer to [b"", seq 0]: every message's frames, base64, as received.
        "replay": [
            [
                _b64(f.replace(str(spec.http_port).encode(), b"<http-port>")) if i == 1 else _b64(f)
                for i, f in enumerate(frames)
            ]
            for frames in replay
        ],
        "topic_port_placeholder": "<http-port>",
    }


def capture_matches_replay(capture: Mapping[str, Any]) -> None:
    """Check a capture's own consistency: the replay answer holds exactly the live batches
    (same seqs, byte-identical payloads decoding to the live batches), then the end marker."""
    replay = [[base64.b64decode(f) for f in frames] for frames in capture["replay"]]
    *batches, end = replay
    assert end == [b"", b"", END_SEQ, b""], end
    live = capture["live"]
    assert [int.from_bytes(f[2], "big") for f in batches] == [m["seq"] for m in live]
    for frames, message in zip(batches, live, strict=True):
        assert len(frames) == 4 and frames[0] == b""
        assert frames[1].decode() == message["topic"]
        assert msgspec.msgpack.decode(frames[3]) == message["batch"]


# ----------------------------------------------------------------------------- comparing


def _decode_spans(steps: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], int]]:
    """(prompt, generated tokens whose KV is computed) of every request that decodes."""
    return [
        (list(s["prompt"]), s["max_tokens"] - 1)
        for s in steps
        if s["op"] == "complete" and s["max_tokens"] > 1
    ]


def _generated_positions(block: list[int], spans: list[tuple[list[int], int]]) -> int:
    """How many trailing tokens of a full block were generated, not prompted (0: a prompt
    block). A decode-filled block starts with the tail of a decoding request's prompt."""
    for prompt, generated in spans:
        if len(prompt) % BLOCK_SIZE == 0:
            continue
        tail = prompt[len(prompt) // BLOCK_SIZE * BLOCK_SIZE :]
        if block[: len(tail)] == tail and BLOCK_SIZE - len(tail) <= generated:
            return BLOCK_SIZE - len(tail)
    return 0


def canonical(batches: Sequence[Sequence[Any]], steps: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The stream with generated tokens masked as "out" and the hashes of blocks holding them
    renamed "decode-<n>" in order of first appearance; every other hash, token and field is
    kept as published."""
    spans = _decode_spans(steps)
    decoded: dict[int, str] = {}

    def label(value: int | None) -> int | str | None:
        return decoded.get(value, value) if value is not None else None

    out: list[Any] = []
    for ts, events, *rank in batches:
        assert isinstance(ts, float)
        canon_events: list[Any] = []
        for event in events:
            event = dict(event)
            if event["type"] == "BlockStored":
                tokens: list[Any] = list(event["token_ids"])
                size = event["block_size"]
                for j, block_hash in enumerate(event["block_hashes"]):
                    block = tokens[j * size : (j + 1) * size]
                    generated = _generated_positions(block, spans) if size == BLOCK_SIZE else 0
                    if generated:
                        decoded.setdefault(block_hash, f"decode-{len(decoded)}")
                        tokens[(j + 1) * size - generated : (j + 1) * size] = ["out"] * generated
                event["token_ids"] = tokens
                event["parent_block_hash"] = label(event["parent_block_hash"])
            if "block_hashes" in event:
                event["block_hashes"] = [label(h) for h in event["block_hashes"]]
            canon_events.append(event)
        out.append([canon_events, *rank])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the engine's log and model here"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vllm-capture-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        capture = record_capture(workdir, progress=lambda line: print(line, flush=True))
    capture_matches_replay(capture)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(capture, indent=None, separators=(",", ":")) + "\n")
    kinds = [e["type"] for m in capture["live"] for e in m["batch"][1]]
    print(
        f"wrote {args.output}: vLLM {capture['vllm_version']}, {len(capture['live'])} batches, "
        f"{len(kinds)} events ({', '.join(f'{k} {kinds.count(k)}' for k in sorted(set(kinds)))})"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
