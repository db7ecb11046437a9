"""llm-d's precise-prefix-cache-aware guide end to end, as published: its EndpointPickerConfig
(tests/epp/data/upstream_configs/llm-d-guides/precise-prefix-cache-aware.yaml; only the
socket path and the ZMQ address adapted), tokenizing through llm-d's tokenizer sidecar
protocol over a real Unix socket (tests/uds_sidecar.py, a double speaking the real protocol),
simulated vLLM engines started with the guide's vLLM flags (--block-size=64, the topic
kv@<ip>:<port>@Qwen/Qwen3-32B, events pushed to the picker's bound socket, PYTHONHASHSEED=42),
and the picker's scheduler in this process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from epp.framework import SchedulerDeps, build_scheduler, load_config
from epp.framework.config import ConfigError
from epp.framework.scheduler import FrameworkScheduler
from epp.plugins import default_registry
from epp.plugins.precise_prefix import (
    PREFIX_BACKEND_FACTORY,
    PrecisePrefixCacheScorer,
    PrecisePrefixParams,
    PrefixIndexBackend,
)
from epp.precise import InProcessIndex, build_backend
from epp.types import Endpoint, LLMRequest
from kvindex.tokenize import load_tokenizer
from kvindex.tokenize import uds as uds_module
from kvtools.demo.model import write_model_dir
from kvtools.demo.processes import ManagedProcess
from tests.ports import free_port
from tests.uds_sidecar import SidecarDouble, short_socket_path

GUIDE = Path(__file__).parent / "data/upstream_configs/llm-d-guides/precise-prefix-cache-aware.yaml"
GUIDE_SOCKET = "/tmp/tokenizer/tokenizer-uds.socket"
GUIDE_ZMQ = "tcp://*:5556"
MODEL = "Qwen/Qwen3-32B"  # the guide's model name, served here with the demo's tokenizer
BLOCK = 64  # the guide's --block-size / blockSize
ENGINE_LINE = re.compile(r"^(engine-\d+) rank 0: http (http://([\d.]+):(\d+)) ")


def guide_config(socket_file: str, zmq_endpoint: str) -> str:
    text = GUIDE.read_text()
    assert text.count(GUIDE_SOCKET) == 2 and text.count(GUIDE_ZMQ) == 1
    return text.replace(GUIDE_SOCKET, socket_file).replace(GUIDE_ZMQ, zmq_endpoint)


@dataclass
class Cluster:
    scheduler: FrameworkScheduler
    sidecar: SidecarDouble
    engines: list[tuple[str, Endpoint]]  # (base url, endpoint)
    model_dir: Path

    @property
    def endpoints(self) -> list[Endpoint]:
        return [e for _, e in self.engines]

    @property
    def backend(self) -> InProcessIndex:
        scorer = self.scheduler.plugin("precise-prefix-cache-scorer")
        assert isinstance(scorer, PrecisePrefixCacheScorer)
        assert isinstance(scorer.backend, InProcessIndex)
        return scorer.backend


def start_engines(
    workdir: Path, model_dir: Path, events: str, count: int
) -> tuple[ManagedProcess, list[tuple[str, Endpoint]]]:
    argv = [
        str(Path(sys.executable).parent / "kvindex-sim"),
        f"--engines={count}",
        "--base-port=0",
        f"--model={MODEL}",
        f"--tokenizer={model_dir}",
        f"--block-size={BLOCK}",
        f"--kv-events-endpoint={events}",
        "--num-gpu-blocks=1024",
        "--time-scale=0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "42"}
    process = ManagedProcess("engines", argv, workdir, env=env)
    deadline = time.monotonic() + 30
    while True:
        found = [ENGINE_LINE.match(line) for line in process.log(100_000).splitlines()]
        matches = [m for m in found if m]
        if len(matches) >= count:
            return process, [
                (m.group(2), Endpoint(m.group(3), int(m.group(4)))) for m in matches[:count]
            ]
        process.check_alive()
        if time.monotonic() > deadline:
            process.stop()
            raise AssertionError(f"engines not up:\n{process.log()}")
        time.sleep(0.05)


def scheduler_for(text: str, endpoints: Sequence[Endpoint]) -> FrameworkScheduler:
    def subscribe(callback: Callable[[Sequence[Endpoint]], None]) -> None:
        callback(list(endpoints))

    def factory(params: PrecisePrefixParams) -> PrefixIndexBackend:
        return build_backend(params, registry=CollectorRegistry(), subscribe_endpoints=subscribe)

    config = load_config(text, default_registry())
    return build_scheduler(config, SchedulerDeps(extras={PREFIX_BACKEND_FACTORY: factory}))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    model_dir = write_model_dir(tmp_path / "model")
    sidecar = SidecarDouble({MODEL: model_dir})
    await sidecar.start(short_socket_path())
    events = f"tcp://127.0.0.1:{free_port()}"
    process, engines = start_engines(tmp_path, model_dir, events, 2)
    scheduler = scheduler_for(guide_config(sidecar.socket_file, events), [e for _, e in engines])
    try:
        await scheduler.start()
        yield Cluster(scheduler, sidecar, engines, model_dir)
    finally:
        await scheduler.stop()
        process.stop()
        await sidecar.stop()


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def completion(prompt: str) -> LLMRequest:
    return LLMRequest(
        request_id="r", path="/v1/completions", model=MODEL, base_model=MODEL, prompt=prompt
    )


def chat(messages: list[dict[str, Any]]) -> LLMRequest:
    return LLMRequest(
        request_id="c",
        path="/v1/chat/completions",
        model=MODEL,
        base_model=MODEL,
        messages=messages,
    )


def expected_fraction(cached: Sequence[int], asked: Sequence[int]) -> float:
    """The fraction of the request's full blocks the engine holds: the blocks of the common
    prefix of the two id lists (the engine caches the full blocks of its prompt)."""
    common = 0
    for a, b in zip(cached, asked, strict=False):
        if a != b:
            break
        common += 1
    matched = min(common, len(cached)) // BLOCK
    return matched / (len(asked) // BLOCK)


async def until_scored(cluster: Cluster, make: Callable[[], LLMRequest], key: str) -> float:
    deadline = time.monotonic() + 20
    while True:
        request = make()
        got = await cluster.backend.score(request, [e.key for e in cluster.endpoints])
        if got.get(key, 0.0) > 0:
            return got[key]
        assert time.monotonic() < deadline, "the engine's blocks never reached the index"
        await asyncio.sleep(0.05)


async def test_guide_config_scores_a_cached_prompt_through_the_sidecar(cluster: Cluster) -> None:
    local = load_tokenizer(cluster.model_dir)
    (holder_url, holder), (_, other) = cluster.engines
    context = "The shared context of this tenant, line after line.\n" * 60
    cached_prompt = context + "first question"
    post(f"{holder_url}/v1/completions", {"model": MODEL, "prompt": cached_prompt, "max_tokens": 1})

    asked = context + "second question"
    # The scorer's own path (indexerConfig.tokenizersPoolConfig): the sidecar tokenizes.
    score = await until_scored(cluster, lambda: completion(asked), holder.key)
    ids = local.encode(asked, True)
    assert score == pytest.approx(expected_fraction(local.encode(cached_prompt, True), ids))
    assert score > 0.8

    # The whole scheduler: the guide's `tokenizer` plugin tokenizes first (over the socket),
    # the scorer uses its ids, and the holder wins.
    calls = len(cluster.sidecar.rpcs("RenderCompletion"))
    request = completion(asked)
    result = await cluster.scheduler.schedule(request, cluster.endpoints)
    assert result.endpoints[0].key == holder.key
    assert request.token_ids == ids
    assert len(cluster.sidecar.rpcs("RenderCompletion")) == calls + 1  # tokenized once
    precise = await cluster.backend.score(completion(asked), [holder.key, other.key])
    assert precise == {holder.key: score, other.key: 0.0}


async def test_guide_config_scores_a_cached_chat_through_the_sidecar(cluster: Cluster) -> None:
    local = load_tokenizer(cluster.model_dir)
    _, (holder_url, holder) = cluster.engines
    history = [
        {"role": "system", "content": "You answer in full sentences. " * 80},
        {"role": "user", "content": "What is a KV cache?"},
    ]
    post(
        f"{holder_url}/v1/chat/completions",
        {"model": MODEL, "messages": history, "max_tokens": 1},
    )
    follow_up = [
        *history,
        {"role": "assistant", "content": "A cache."},
        {"role": "user", "content": "More?"},
    ]
    score = await until_scored(cluster, lambda: chat(follow_up), holder.key)
    cached = local.apply_chat_template(history)
    assert score == pytest.approx(expected_fraction(cached, local.apply_chat_template(follow_up)))
    assert cluster.sidecar.rpcs("RenderChatCompletion")
    request = chat(follow_up)
    result = await cluster.scheduler.schedule(request, cluster.endpoints)
    assert result.endpoints[0].key == holder.key
    assert request.token_ids == local.apply_chat_template(follow_up)


async def test_guide_config_without_its_sidecar_fails_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(uds_module, "_INIT_BACKOFF_S", 0.01)
    missing = short_socket_path()
    scheduler = scheduler_for(guide_config(missing, f"tcp://127.0.0.1:{free_port()}"), [])
    with pytest.raises(ConfigError, match=f"socket {missing} does not exist"):
        await scheduler.start()
    await scheduler.stop()


async def test_precise_scorer_with_no_way_to_tokenize_fails_at_start() -> None:
    text = (
        "plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n"
        f"    kvEventsConfig: {{zmqEndpoint: 'tcp://127.0.0.1:{free_port()}'}}\n"
    )
    scheduler = scheduler_for(text, [])
    with pytest.raises(ConfigError, match="no way to tokenize prompts"):
        await scheduler.start()
    # With a token producer in the config, its ids are what the scorer scores: it starts.
    producer = "- type: token-producer\n  parameters: {modelName: m}\n"
    with_producer = scheduler_for(text.replace("plugins:\n", "plugins:\n" + producer), [])
    await with_producer.start()
    await with_producer.stop()
