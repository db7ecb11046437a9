"""Discovery: engines file (real file, real sockets in connect mode), DP rank expansion and
Kubernetes pod logic. No Kubernetes API server can run here, so the pod watch is fed by a fake
PodEventSource; the real client wiring (KubernetesPodSource) is exercised only for its pure
pod-conversion step."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ingest_helpers import keys_for, metric, probe, wait_for
from pod_source import FakePodSource
from vllm_publisher import VllmPublisher, stored

from kvindex.config import KubernetesConfig
from kvindex.discovery import (
    EngineEntry,
    EnginesFileError,
    FileDiscovery,
    offset_endpoint,
    parse_engines_document,
    rank_sources,
)
from kvindex.discovery_k8s import (
    KubernetesDiscovery,
    KubernetesPodSource,
    PodSet,
    PodView,
    WatchExpired,
)
from kvindex.index import MemoryIndex
from kvindex.index.locked import LockedIndex
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from kvindex.service.app import IndexService
from tests.ports import free_port

T = list(range(32))


def test_parse_engines_document_forms_and_errors() -> None:
    doc = {"engines": [{"endpoint": "10.0.0.1:8000", "zmq": "tcp://10.0.0.1:5557", "x": 1}]}
    (entry,) = parse_engines_document(doc)
    assert entry == EngineEntry("10.0.0.1:8000", "tcp://10.0.0.1:5557")  # unknown key ignored
    assert parse_engines_document([]) == []
    with pytest.raises(EnginesFileError, match=r"engines\[0\].*ip:port"):
        parse_engines_document([{"endpoint": "10.0.0.1"}])
    with pytest.raises(EnginesFileError, match=r"engines\[1\]"):
        parse_engines_document([{"endpoint": "a:1"}, {"zmq": "tcp://x:1"}])
    with pytest.raises(EnginesFileError, match="not a ZMQ endpoint"):
        parse_engines_document([{"endpoint": "a:1", "replay": "a:2"}])


def test_dp_ranks_expand_ports() -> None:
    entry = EngineEntry("10.0.0.1:8000", "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5600", "m", 2)
    ranks = rank_sources(entry)
    assert [(r.endpoint, r.zmq, r.replay) for r in ranks] == [
        ("10.0.0.1:8000", "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5600"),
        ("10.0.0.1:8001", "tcp://10.0.0.1:5558", "tcp://10.0.0.1:5601"),
    ]
    assert rank_sources(entry, dp_port_stride=0)[1].endpoint == "10.0.0.1:8000"
    assert offset_endpoint("inproc://x", 2) == "inproc://x_dp2"


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"engines": entries}))
    tmp.replace(path)


def test_engines_file_connects_and_purges(tmp_path: Path) -> None:
    pub = VllmPublisher(f"tcp://*:{free_port()}", topic="kv@ignored@m")
    zmq_endpoint = pub.endpoint.replace("0.0.0.0", "127.0.0.1")
    engines = tmp_path / "engines.json"
    # Discovery names the endpoint: it wins over the topic (which here has no port).
    _write(engines, [{"endpoint": "10.1.1.1:8000", "zmq": zmq_endpoint, "model": "m"}])
    index = LockedIndex(MemoryIndex())
    metrics = KvindexMetrics()
    service = IngestService(IngestServiceConfig(), index, metrics=metrics)
    discovery = FileDiscovery(engines, interval_s=0.02)
    service.expect_discovery()
    service.start()
    discovery.start(
        service.update_engines, lambda msg: metrics.discovery_errors.labels("file").inc()
    )
    try:
        probe(pub, index, "10.1.1.1:8000")
        pub.publish(stored([1, 2], None, T))
        wait_for(
            lambda: (
                (index.lookup(keys_for(T)).get("10.1.1.1:8000") or SimpleNamespace(blocks=0)).blocks
                == 2
            )
        )
        assert (
            metric(metrics, "kvindex_ingest_topic_without_port_total", engine="10.1.1.1:8000") == 0
        )
        # An invalid file keeps the last good set.
        engines.write_text("{not json")
        wait_for(lambda: metric(metrics, "kvindex_discovery_errors_total", source="file") == 1)
        assert index.engines() == ["10.1.1.1:8000"]
        # The engine leaves: purged, socket closed.
        _write(engines, [])
        wait_for(lambda: index.engines() == [], what="purge")
        assert metric(metrics, "kvindex_discovery_purges_total") == 1
        wait_for(lambda: metric(metrics, "kvindex_ingest_sources", mode="connect") == 0)
    finally:
        discovery.stop()
        service.stop()
        pub.close()


def pod(name: str, ip: str | None, ready: bool = True, deleting: bool = False) -> PodView:
    return PodView(name, ip, ready, deleting, {"model": "llama"})


K8S = KubernetesConfig(label_selector="app=vllm", replay_port=5558, model_label="model")


def test_pod_set_rules() -> None:
    pods = PodSet(K8S)
    pods.reset([pod("a", "10.0.0.1"), pod("b", "10.0.0.2", ready=False), pod("c", None)])
    assert pods.entries() == {
        "10.0.0.1:8000": EngineEntry(
            "10.0.0.1:8000", "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558", "llama"
        )
    }
    assert pods.apply("MODIFIED", pod("b", "10.0.0.2"))  # became Ready
    assert not pods.apply("MODIFIED", pod("b", "10.0.0.2"))  # no change
    assert pods.apply("MODIFIED", pod("a", "10.0.0.1", deleting=True))  # terminating
    assert pods.apply("DELETED", pod("b", "10.0.0.2"))
    assert pods.entries() == {}
    assert PodSet(KubernetesConfig("x")).entry_for(pod("v6", "fd00::1")) == EngineEntry(
        "[fd00::1]:8000", "tcp://[fd00::1]:5557"
    )


def test_kubernetes_discovery_list_watch_relist() -> None:
    source = FakePodSource([pod("a", "10.0.0.1")])
    seen: list[set[str]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def changed(entries: Any) -> None:
        with lock:
            seen.append(set(entries))

    discovery = KubernetesDiscovery(K8S, source, backoff_s=0.01)
    discovery.start(changed, errors.append)
    try:
        wait_for(lambda: seen and seen[-1] == {"10.0.0.1:8000"})
        source.events.put(("ADDED", pod("b", "10.0.0.2")))
        wait_for(lambda: seen[-1] == {"10.0.0.1:8000", "10.0.0.2:8000"})
        source.pods = [pod("b", "10.0.0.2")]
        source.events.put(WatchExpired("410"))  # relist: a was deleted meanwhile
        wait_for(lambda: seen[-1] == {"10.0.0.2:8000"})
        source.events.put(RuntimeError("apiserver down"))
        wait_for(lambda: errors == ["apiserver down"])
        wait_for(lambda: source.lists >= 3, what="relist after error")
    finally:
        discovery.stop()


def test_real_client_pod_conversion() -> None:
    from kubernetes import client

    v1 = client.V1Pod(
        metadata=client.V1ObjectMeta(name="p", labels={"model": "m"}),
        status=client.V1PodStatus(
            pod_ip="10.0.0.5", conditions=[client.V1PodCondition(type="Ready", status="True")]
        ),
    )
    view = KubernetesPodSource.view(v1)
    assert view == PodView("p", "10.0.0.5", True, False, {"model": "m"})


async def test_service_purges_engine_leaving_static_discovery() -> None:
    from kvindex.config import ServiceConfig
    from kvindex.discovery import StaticDiscovery

    static = StaticDiscovery([EngineEntry("127.0.0.1:8000")])
    config = ServiceConfig(zmq_bind=["tcp://127.0.0.1:*"], http_host="127.0.0.1", http_port=0)
    service = IndexService(config, discovery=[static])
    await service.start()
    pub = VllmPublisher(service.zmq_bound[0])
    try:
        probe(pub, service.index, "127.0.0.1:8000")
        service.ingest.update_engines({})
        wait_for(lambda: service.index.engines() == [])
    finally:
        pub.close()
        await service.stop()
