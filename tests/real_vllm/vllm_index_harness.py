"""The index under test against real engines: a `kvindex serve` subprocess binding the events
address the engines connect to, naming each engine and its replay endpoint in an engines file
(strict admission: events of unnamed engines are refused), and the two numbers every
real-engine test compares - what the index predicts an engine will reuse for a prompt, and
what vLLM's own `prefix_cache_hits` counter says it reused when the prompt is sent.

Synchronising with an engine's stream: events of one engine arrive in order, so after a
request the test sends a fresh marker prompt to the same engine and waits until the index
scores the marker; everything the engine published before the marker is then applied."""

from __future__ import annotations

import itertools
import json
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvtools.real_vllm.engines import VLLMEngine
from tests.kvindex.serve_process import ServeProcess, wait_for

MODEL = "tiny"
# Ordinary tokens of the DeepSeek vocabulary (no special or added tokens).
_TOKEN_RANGE = (1000, 60000)
_markers = itertools.count()


def random_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(*_TOKEN_RANGE) for _ in range(n)]


def start_index(
    engines: Sequence[VLLMEngine], model_dir: Path, *extra: str, block_size: int | None = None
) -> ServeProcess:
    entries = [
        {"endpoint": e.spec.endpoint, "replay": e.spec.replay_endpoint, "model": MODEL}
        for e in engines
    ]
    engines_file = Path(tempfile.mkstemp(prefix="real-vllm-engines-", suffix=".json")[1])
    engines_file.write_text(json.dumps({"engines": entries}))
    args: list[str] = [
        f"--tokenizer={MODEL}={model_dir}",
        f"--zmq-bind={engines[0].spec.events_endpoint}",
        f"--engines-file={engines_file}",
    ]
    if block_size is not None:
        args.append(f"--block-size={block_size}")
    index = ServeProcess([*args, *extra], grpc=False)
    index.wait_ready()
    return index


def predicted_tokens(index: ServeProcess, engine: VLLMEngine, body: Mapping[str, Any]) -> int:
    """Tokens of the prompt the index says `engine` can reuse (matched blocks x block size)."""
    status, data = index.post(
        "/v1/score", {"model": MODEL, **body, "engines": [engine.spec.endpoint]}
    )
    assert status == 200, (status, data)
    (score,) = data["scores"]
    return int(score["matched_blocks"]) * int(data["block_size"])


# A marker not seen within this long is followed by another.
MARKER_RETRY_S = 3.0


def sync(index: ServeProcess, engine: VLLMEngine, timeout: float = 30.0) -> None:
    """Wait until the index has applied everything `engine` published so far: a marker
    prompt, scored once the index applied it (batches apply in order, and an engine whose
    earlier batches went missing is withheld until its replay fills them in). The marker is
    re-sent every MARKER_RETRY_S: what vLLM's PUB socket publishes before its connection to
    a freshly bound index is up is dropped (ZMQ's slow joiner), and nothing else would
    arrive while this waits (seen once in `.ci/run`: the first test's index heard nothing
    for 30 s)."""
    deadline = time.monotonic() + timeout
    what = f"the index to see {engine.spec.name}'s marker"
    while True:
        marker = random_tokens(3 * engine.spec.block_size, seed=10_000 + next(_markers))
        engine.complete(marker)
        remaining = deadline - time.monotonic()
        try:
            wait_for(
                lambda marker=marker: predicted_tokens(index, engine, {"token_ids": marker}) > 0,
                max(0.1, min(MARKER_RETRY_S, remaining)),
                what,
            )
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def reused_tokens(engine: VLLMEngine, body: Mapping[str, Any]) -> int:
    """Send the request and return the prefix-cache hit tokens vLLM counted for it."""
    if "messages" in body:
        return engine.hit_tokens(lambda: engine.chat(body["messages"]))
    prompt = body["token_ids"] if "token_ids" in body else body["prompt"]
    return engine.hit_tokens(lambda: engine.complete(prompt))


def check(index: ServeProcess, engine: VLLMEngine, body: Mapping[str, Any]) -> tuple[int, int]:
    """(predicted, reused) for one request, prediction first; then the index is synced."""
    predicted = predicted_tokens(index, engine, body)
    reused = reused_tokens(engine, body)
    sync(index, engine)
    return predicted, reused
