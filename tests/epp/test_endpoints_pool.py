"""InferencePool discovery.

No Kubernetes API server can run here, so (1) the reconciliation logic is driven by a fake
event source (plain DiscoveryEvents), and (2) the real `kubernetes` client wiring - list,
watch, JSON conversion, v1 -> v1alpha2 fallback, re-list after a dropped watch - is run
against a small aiohttp server that answers the few API paths the watcher uses, in the API
server's wire format (lists, newline-delimited watch events, 404 Status)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fake_kube_api import FakeApiServer

from epp.discovery.kubernetes import KubernetesPoolWatcher, pod_info_from_object
from epp.discovery.pool import (
    PodEvent,
    PodInfo,
    PodsListed,
    PoolChanged,
    PoolReconciler,
    PoolSpec,
    PoolSpecError,
    pool_spec_from_object,
)
from epp.endpoints import Datastore
from epp.metrics import EppMetrics
from epp.types import Role
from tests.polling import wait_until_async as wait_for

V1_POOL = {
    "apiVersion": "inference.networking.k8s.io/v1",
    "kind": "InferencePool",
    "metadata": {"name": "llm", "namespace": "ns", "resourceVersion": "10"},
    "spec": {
        "selector": {"matchLabels": {"app": "vllm"}},
        "targetPorts": [{"number": 8000}, {"number": 8001}],
        "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
    },
}
ALPHA_POOL = {
    "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
    "kind": "InferencePool",
    "metadata": {"name": "llm", "namespace": "ns", "resourceVersion": "11"},
    "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000, "extensionRef": {}},
}


def pod(name: str, ip: str = "", ready: bool = True, deleting: bool = False, **labels: str):
    obj: dict[str, Any] = {
        "metadata": {"name": name, "labels": {"app": "vllm", **labels}, "resourceVersion": "1"},
        "status": {
            "podIP": ip or None,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
    if deleting:
        obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return obj


def keys(store: Datastore) -> list[str]:
    return [e.key for e in store.endpoints()]


def test_pool_spec_versions_and_errors() -> None:
    assert pool_spec_from_object(V1_POOL) == PoolSpec({"app": "vllm"}, (8000, 8001))
    assert pool_spec_from_object(ALPHA_POOL) == PoolSpec({"app": "vllm"}, (8000,))
    bad = [
        ({"spec": {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 1}]}}, "selector"),
        ({"spec": {"selector": {"a": "b"}}}, "targetPorts"),
        ({"spec": {"selector": {"a": "b"}, "targetPorts": [{"number": 0}]}}, "1..65535"),
        ({"spec": {"selector": {"a": "b"}, "targetPorts": [{"number": 1}] * 9}}, "1..8"),
        ({"spec": {"selector": {"a": "b"}, "targetPorts": [{"number": 1}] * 2}}, "twice"),
        ({}, "no spec"),
    ]
    for obj, why in bad:
        with pytest.raises(PoolSpecError, match=why):
            pool_spec_from_object(obj)


def test_reconciler_counts_only_ready_matching_live_pods_per_port() -> None:
    store, metrics = Datastore(), EppMetrics()
    rec = PoolReconciler(store, metrics)
    rec.apply(
        PodsListed(
            tuple(
                pod_info_from_object(p)
                for p in [
                    pod(
                        "a",
                        "10.0.0.1",
                        **{"llm-d.ai/role": "decode", "llm-d.ai/engine-type": "sglang"},
                    ),
                    pod("b", "10.0.0.2", ready=False),
                    pod("c", "10.0.0.3", deleting=True),
                    pod("d"),  # no IP yet
                    {**pod("e", "10.0.0.5"), "metadata": {"name": "e", "labels": {"app": "other"}}},
                ]
            )
        )
    )
    assert keys(store) == [] and not rec.synced  # no pool yet
    rec.apply(PoolChanged(pool_spec_from_object(V1_POOL)))
    assert rec.synced
    assert keys(store) == ["10.0.0.1:8000", "10.0.0.1:8001"]
    a = store.get("10.0.0.1:8000")
    assert a is not None and a.role is Role.DECODE and a.engine_type == "sglang"
    assert a.pod_name == "a"
    rec.apply(PodEvent("MODIFIED", pod_info_from_object(pod("b", "10.0.0.2"))))
    assert keys(store)[-2:] == ["10.0.0.2:8000", "10.0.0.2:8001"]
    rec.apply(PodEvent("DELETED", PodInfo("a")))
    assert keys(store) == ["10.0.0.2:8000", "10.0.0.2:8001"]
    rec.apply(PoolChanged(None, error="spec.targetPorts missing"))  # bad edit: keep last good
    assert len(keys(store)) == 2
    assert metrics.endpoint_source_errors.labels(source="pool")._value.get() == 1
    rec.apply(PoolChanged(pool_spec_from_object(ALPHA_POOL)))
    assert keys(store) == ["10.0.0.2:8000"]
    rec.apply(
        PodEvent("ADDED", pod_info_from_object(pod("x", "10.0.0.9", **{"llm-d.ai/role": "chef"})))
    )
    assert keys(store) == ["10.0.0.2:8000"]  # invalid role label: skipped and counted
    assert metrics.endpoint_source_errors.labels(source="pool")._value.get() == 2
    rec.apply(PodEvent("MODIFIED", pod_info_from_object(pod("b", "10.0.0.2"))))
    assert metrics.endpoint_source_errors.labels(source="pool")._value.get() == 2  # once
    rec.apply(PoolChanged(None))  # pool deleted
    assert keys(store) == []


@pytest.mark.parametrize(
    ("pools", "expected_gv"),
    [
        ({"inference.networking.k8s.io/v1": V1_POOL}, ("inference.networking.k8s.io", "v1")),
        (
            {"inference.networking.x-k8s.io/v1alpha2": ALPHA_POOL},
            ("inference.networking.x-k8s.io", "v1alpha2"),
        ),
    ],
)
async def test_real_client_lists_and_watches(pools: dict, expected_gv: tuple) -> None:
    from kubernetes import client

    api = FakeApiServer(pools)
    api.pods = [pod("a", "10.0.0.1"), pod("b", "10.0.0.2", ready=False)]
    host = await api.start()
    configuration = client.Configuration(host=host)
    api_client = client.ApiClient(configuration)
    store, metrics = Datastore(), EppMetrics()
    rec = PoolReconciler(store, metrics)
    errors: list[str] = []
    watcher = KubernetesPoolWatcher(
        "ns", "llm", api_client, on_error=errors.append, retry_delay_s=0.05
    )
    watcher.start(asyncio.get_running_loop(), rec.apply)
    ports = [8000, 8001] if expected_gv[1] == "v1" else [8000]
    try:
        await wait_for(lambda: keys(store) == [f"10.0.0.1:{p}" for p in ports])
        assert watcher.group_version == expected_gv and rec.synced
        await api.pod_events.put({"type": "MODIFIED", "object": pod("b", "10.0.0.2")})
        await wait_for(lambda: f"10.0.0.2:{ports[0]}" in keys(store))
        await api.pod_events.put({"type": "BOOKMARK", "object": {"metadata": {}}})
        await api.pod_events.put({"type": "DELETED", "object": pod("a", "10.0.0.1")})
        await wait_for(lambda: keys(store) == [f"10.0.0.2:{p}" for p in ports])
        changed = json.loads(json.dumps(pools[f"{expected_gv[0]}/{expected_gv[1]}"]))
        if "targetPorts" in changed["spec"]:
            changed["spec"]["targetPorts"] = [{"number": 9000}]
        else:
            changed["spec"]["targetPortNumber"] = 9000
        await api.pool_events.put({"type": "MODIFIED", "object": changed})
        await wait_for(lambda: keys(store) == ["10.0.0.2:9000"])
        # A dropped watch resumes from the last resourceVersion without a re-list...
        lists = api.pod_lists
        await api.pod_events.put(None)
        await api.pod_events.put({"type": "ADDED", "object": pod("c", "10.0.0.3")})
        await wait_for(lambda: keys(store) == ["10.0.0.2:9000", "10.0.0.3:9000"])
        assert api.pod_lists == lists
        # ...while 410 Gone (history expired) makes it re-list.
        api.pods = [pod("d", "10.0.0.4")]
        gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
        await api.pod_events.put({"type": "ERROR", "object": gone})
        await wait_for(lambda: keys(store) == ["10.0.0.4:9000"])
        assert api.pod_lists == lists + 1 and errors == ["pods"]
    finally:
        watcher.stop()
        await api.stop()
        await asyncio.to_thread(watcher.join, 5.0)
        api_client.close()


def test_missing_credentials_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from epp.discovery.kubernetes import load_kube_config

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match="--endpoints or --endpoints-file"):
        load_kube_config()
