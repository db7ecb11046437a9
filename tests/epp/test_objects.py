"""InferenceObjective and InferenceModelRewrite: parsing the CRD shapes, the store's
precedence, weighted (and per-session) target picks, the watched objects file, the Kubernetes
watch against the fake API server, and the rewritten body the ext_proc edge sends on."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from extproc_client import LeastWaitingScheduler, endpoints, header_mutation, request_body
from extproc_client import request_headers as headers_message
from fake_kube_api import FakeApiServer

from epp.extproc import PickerContext, RequestStream
from epp.metrics import EppMetrics
from epp.objects import (
    ObjectError,
    ObjectsFileSource,
    ObjectStore,
    PoolRef,
    parse_objects_document,
    rewrite_from_object,
)
from epp.requests import ModelRegistry, RequestParser

OBJECTS = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10, poolRef: {name: llm}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: llm}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: canary, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  poolRef: {name: llm}
  rules:
  - matches: [{model: {type: Exact, value: chat}}]
    targets: [{modelRewrite: chat-v1, weight: 90}, {modelRewrite: chat-v2, weight: 10}]
"""


def _rewrite(name: str, created: str, models: list[str], targets: list[tuple[str, int]]) -> dict:
    return {
        "kind": "InferenceModelRewrite",
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {
            "poolRef": {"name": "llm"},
            "rules": [
                {
                    "matches": [{"model": {"value": m}} for m in models],
                    "targets": [{"modelRewrite": t, "weight": w} for t, w in targets],
                }
            ],
        },
    }


def test_parse_and_validate() -> None:
    objectives, rewrites = parse_objects_document(OBJECTS)
    assert [(o.name, o.priority, o.pool_ref) for o in objectives] == [
        ("critical", 10, PoolRef("llm")),
        ("batch", -1, PoolRef("llm")),
    ]
    assert rewrites[0].rules[0].models == ("chat",)
    with pytest.raises(ObjectError, match="every target or on none"):
        rewrite_from_object(_rewrite("x", "", ["m"], [("a", 1), ("b", 0)]))
    with pytest.raises(ObjectError, match="poolRef is required"):
        rewrite_from_object({"kind": "InferenceModelRewrite", "metadata": {"name": "x"}})
    with pytest.raises(ObjectError, match="kind must be"):
        parse_objects_document("kind: InferencePool\nmetadata: {name: p}\n")
    with pytest.raises(ObjectError, match="must be Exact"):
        rewrite_from_object(
            {
                "metadata": {"name": "x"},
                "spec": {
                    "poolRef": {"name": "p"},
                    "rules": [{"matches": [{"model": {"type": "Re", "value": "a"}}]}],
                },
            }
        )


def test_precedence_exact_then_oldest_then_generic() -> None:
    store = ObjectStore(PoolRef("llm", ""))
    store.replace(
        "kubernetes",
        rewrites=[
            rewrite_from_object(_rewrite("generic-old", "2020-01-01T00:00:00Z", [], [("any", 0)])),
            rewrite_from_object(_rewrite("exact-new", "2026-01-01T00:00:00Z", ["m"], [("new", 0)])),
            rewrite_from_object(_rewrite("exact-old", "2025-01-01T00:00:00Z", ["m"], [("old", 0)])),
        ],
    )
    assert store.rewrite("m").target == "old"  # type: ignore[union-attr]
    assert store.rewrite("other").target == "any"  # type: ignore[union-attr]
    other_pool = _rewrite("elsewhere", "2000-01-01T00:00:00Z", ["m"], [("x", 0)])
    other_pool["spec"]["poolRef"]["name"] = "other"
    store.set_rewrite("kubernetes", rewrite_from_object(other_pool))
    assert store.rewrite("m").target == "old"  # type: ignore[union-attr]
    # Kubernetes over file over flag for objectives.
    objectives, _ = parse_objects_document(OBJECTS)
    store.replace("file", objectives)
    store.replace("flag", [type(objectives[0])("critical", 1)])
    assert store.objective("critical").priority == 10  # type: ignore[union-attr]


def test_weights_90_10_within_3_percent_and_sessions_stick() -> None:
    decisions: list[str] = []
    store = ObjectStore(rng=random.Random(1), on_rewrite=lambda d: decisions.append(d.target))
    store.replace("file", *parse_objects_document(OBJECTS))
    picks = Counter(store.rewrite("chat").target for _ in range(2000))  # type: ignore[union-attr]
    assert abs(picks["chat-v1"] / 2000 - 0.9) <= 0.03
    assert sum(picks.values()) == 2000 and len(decisions) == 2000
    # A session key always gets the same target; sessions still split ~90/10.
    by_session = {s: store.rewrite("chat", f"s{s}").target for s in range(2000)}  # type: ignore[union-attr]
    assert all(store.rewrite("chat", f"s{s}").target == t for s, t in list(by_session.items())[:50])  # type: ignore[union-attr]
    assert abs(Counter(by_session.values())["chat-v1"] / 2000 - 0.9) <= 0.03
    assert store.rewrite("other-model") is None


def test_parser_priority_and_rewrite() -> None:
    store = ObjectStore()
    store.replace("file", *parse_objects_document(OBJECTS))
    registry = ModelRegistry({"chat-v2": "base-model"})
    parser = RequestParser(registry, {"flagged": -5}, store)
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {
        ":path": "/v1/chat/completions",
        "x-gateway-inference-objective": "batch",
        "x-session-token": "s7",
    }
    request = parser.parse(headers, body)
    assert request.priority == -1
    assert request.requested_model == "chat" and request.model in ("chat-v1", "chat-v2")
    assert json.loads(request.raw_body)["model"] == request.model
    if request.model == "chat-v2":  # LoRA resolution follows the rewritten name
        assert request.base_model == "base-model" and request.lora == "chat-v2"
    assert (
        parser.parse({**headers, "x-gateway-inference-objective": "flagged"}, body).priority == -5
    )
    assert parser.parse({**headers, "x-gateway-inference-objective": "nope"}, body).priority == 0
    assert parser.unknown_objectives == 1
    plain = parser.parse(
        {":path": "/v1/completions"}, json.dumps({"model": "m", "prompt": "x"}).encode()
    )
    assert plain.requested_model == ""


async def test_objects_file_is_watched(tmp_path: Path) -> None:
    path = tmp_path / "objects.yaml"
    path.write_text(OBJECTS)
    store = ObjectStore(PoolRef("llm", ""))
    errors: list[int] = []
    source = ObjectsFileSource(path, store, lambda: errors.append(1))
    assert source.poll()
    assert store.objective("batch").priority == -1  # type: ignore[union-attr]
    path.write_text("kind: InferenceObjective\nmetadata: {name: batch}\nspec: {priority: x}\n")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert not source.poll() and errors == [1]
    assert store.objective("batch").priority == -1  # the last good objects stay
    path.write_text("- {kind: InferenceObjective, metadata: {name: batch}, spec: {priority: 3}}\n")
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert source.poll()
    assert store.objective("batch").priority == 3  # type: ignore[union-attr]
    assert store.objective("critical") is None and store.rewrites() == {}


async def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_kubernetes_watch_against_fake_api_server() -> None:
    from kubernetes import client

    from epp.discovery.objects_watch import KubernetesObjectsWatcher

    api = FakeApiServer({})
    api.objects["inferenceobjectives"] = [
        {
            "kind": "InferenceObjective",
            "metadata": {"name": "critical", "resourceVersion": "3"},
            "spec": {"priority": 10, "poolRef": {"name": "llm"}},
        },
        {
            "kind": "InferenceObjective",
            "metadata": {"name": "foreign"},
            "spec": {"priority": 99, "poolRef": {"name": "other"}},
        },
    ]
    host = await api.start()
    api_client = client.ApiClient(client.Configuration(host=host))
    store = ObjectStore(PoolRef("llm", ""))
    errors: list[str] = []
    watcher = KubernetesObjectsWatcher("ns", api_client, on_error=errors.append, retry_delay_s=0.05)
    watcher.start(asyncio.get_running_loop(), store)
    try:
        assert not watcher.synced
        await _wait(lambda: watcher.synced)
        assert watcher.listed == {"inferenceobjectives", "inferencemodelrewrites"}
        assert store.objective("critical").priority == 10  # type: ignore[union-attr]
        assert store.objective("foreign") is None  # another pool's
        await api.object_events["inferenceobjectives"].put(
            {
                "type": "MODIFIED",
                "object": {
                    "kind": "InferenceObjective",
                    "metadata": {"name": "critical", "resourceVersion": "9"},
                    "spec": {"priority": -2, "poolRef": {"name": "llm"}},
                },
            }
        )
        await _wait(lambda: store.objective("critical").priority == -2)  # type: ignore[union-attr]
        await api.object_events["inferencemodelrewrites"].put(
            {
                "type": "ADDED",
                "object": _rewrite("canary", "2026-01-01T00:00:00Z", ["chat"], [("chat-v2", 1)]),
            }
        )
        await _wait(lambda: store.rewrite("chat") is not None)
        assert store.rewrite("chat").target == "chat-v2"  # type: ignore[union-attr]
        await api.object_events["inferenceobjectives"].put(
            {"type": "DELETED", "object": {"metadata": {"name": "critical"}}}
        )
        await _wait(lambda: store.objective("critical") is None)
        bad = _rewrite("canary", "", ["chat"], [("a", 1), ("b", 0)])
        await api.object_events["inferencemodelrewrites"].put({"type": "MODIFIED", "object": bad})
        await _wait(lambda: store.rewrite("chat") is None)  # unusable edit: dropped, counted
        assert "inferencemodelrewrites" in errors
    finally:
        watcher.stop()
        await api.stop()
        await asyncio.to_thread(watcher.join, 5.0)
        api_client.close()


async def test_extproc_sends_the_rewritten_body() -> None:
    store = ObjectStore()
    store.replace(
        "file",
        rewrites=[rewrite_from_object(_rewrite("r", "", ["chat"], [("chat-canary-long-name", 1)]))],
    )
    scheduler = LeastWaitingScheduler()
    ctx = PickerContext(
        scheduler=scheduler,
        endpoints=lambda: endpoints(("10.0.0.1", 8000, 0)),
        parser=RequestParser(objects=store),
        metrics=EppMetrics(),
    )
    stream = RequestStream(ctx)
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert await stream.handle(headers_message()) == []
    responses = await stream.handle(request_body(body, end_of_stream=True))
    decision, sent = responses[0], responses[1]
    new_body = sent.request_body.response.body_mutation.streamed_response.body
    assert json.loads(new_body)["model"] == "chat-canary-long-name"
    assert header_mutation(decision)["content-length"] == str(len(new_body))
    assert scheduler.scheduled[0].model == "chat-canary-long-name"
