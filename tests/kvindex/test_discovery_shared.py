"""The discovery stack the index and the picker share: the `ip:port` parser
(`kvindex.hostport`), the file watch (`kvindex.filewatch`) and the pod list + watch loop
(`kvindex.podwatch`). The loop runs against fake sources and, with the real `kubernetes`
client, against a small aiohttp stand-in for the API server (no cluster runs here)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pod_source import FakePodSource

from kvindex.config import KubernetesConfig
from kvindex.discovery_k8s import KubernetesDiscovery
from kvindex.filewatch import PollingThread, WatchedFile
from kvindex.hostport import HostPortError, join_host_port, split_host_port
from kvindex.podwatch import (
    KubernetesPodSource,
    ListWatch,
    PodEvent,
    PodInfo,
    PodsListed,
    PodWatcher,
    WatchExpired,
    pod_info_from_object,
    pod_is_serving,
)
from tests.polling import wait_until as wait_for
from tests.polling import wait_until_async

# -- ip:port ---------------------------------------------------------------------------------


def test_host_port_round_trip_and_errors() -> None:
    assert split_host_port(" 10.0.0.1:8000 ") == ("10.0.0.1", 8000)
    assert split_host_port("[fd00::1]:9000") == ("fd00::1", 9000)
    assert join_host_port("fd00::1", 9000) == "[fd00::1]:9000"
    assert join_host_port("10.0.0.1", 1) == "10.0.0.1:1"
    for bad, why in [
        ("10.0.0.1", "ip:port"),
        (":80", "ip:port"),
        ("[fd00::1]", "ip:port"),
        ("h:x", "non-numeric"),
        ("h:+1", "non-numeric"),
        ("h:0", "1..65535"),
        ("h:65536", "1..65535"),
    ]:
        with pytest.raises(HostPortError, match=why):
            split_host_port(bad)


# -- the watched file ------------------------------------------------------------------------


def _write(path: Path, text: str | bytes) -> None:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    st = path.stat()  # a new mtime even within the filesystem's granularity
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _parse(text: str) -> list[int]:
    if not text.startswith("["):
        raise ValueError(f"bad: {text}")
    return list(json.loads(text))


def test_watched_file_reports_each_change_and_each_failure_once(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    watched = WatchedFile(path, _parse)
    loaded: list[list[int]] = []
    errors: list[str] = []

    def poll() -> bool:
        return watched.poll(loaded.append, errors.append)

    assert not poll() and errors == [f"cannot read {path}: No such file or directory"]
    assert not poll() and len(errors) == 1  # missing still: reported already
    _write(path, "[1]")
    assert poll() and loaded == [[1]] and watched.last_error is None and watched.loads == 1
    assert not poll()  # unchanged: not read again
    _write(path, "x")
    assert not poll() and errors[-1] == "bad: x" and watched.last_error == "bad: x"
    assert not poll() and len(errors) == 2
    _write(path, "[2, 3]")
    assert poll() and loaded[-1] == [2, 3]
    _write(path, b"[\xff]")  # not UTF-8
    assert not poll() and errors[-1].startswith(f"cannot read {path}: ")
    watched.reset()
    _write(path, "[4]")
    assert poll() and loaded[-1] == [4]


def test_polling_thread_drives_the_watch(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    _write(path, "[1]")
    watched = WatchedFile(path, _parse)
    loaded: list[list[int]] = []
    thread = PollingThread("test-poll", lambda: watched.poll(loaded.append, print), 0.01)
    thread.start()
    try:
        wait_for(lambda: loaded == [[1]])
        _write(path, "[5]")
        wait_for(lambda: loaded[-1] == [5])
    finally:
        thread.stop()


# -- the list + watch loop -------------------------------------------------------------------


def test_pod_watcher_resumes_relists_and_backs_off() -> None:
    source = FakePodSource([PodInfo("a", "10.0.0.1", ready=True)])
    changes: list[PodsListed | PodEvent] = []
    errors: list[Exception] = []
    watcher = PodWatcher(source, changes.append, errors.append, backoff_s=0.01, name="t")
    watcher.start()
    try:
        wait_for(lambda: source.watched_from == ["list1"])
        assert changes == [PodsListed((PodInfo("a", "10.0.0.1", ready=True),))]
        b = PodInfo("b", "10.0.0.2", ready=True, resource_version="7")
        source.events.put(("ADDED", b))
        source.events.put(("BOOKMARK", PodInfo("")))  # not a pod change
        source.events.put(None)  # the server ends the watch: resume from "7", no relist
        wait_for(lambda: source.watched_from == ["list1", "7"])
        assert changes[1:] == [PodEvent("ADDED", b)] and source.lists == 1
        source.events.put(WatchExpired("410"))  # relist at once, reported
        wait_for(lambda: source.watched_from[-1] == "list2")
        source.events.put(RuntimeError("apiserver down"))  # relist after the backoff
        wait_for(lambda: source.watched_from[-1] == "list3")
        assert [type(e) for e in errors] == [WatchExpired, RuntimeError]
    finally:
        watcher.stop()
        watcher.join(2)
    assert errors[-1].args == ("apiserver down",)  # nothing reported while stopping


def test_list_watch_waits_while_there_is_nothing_to_watch() -> None:
    lists: list[int] = []
    stop = threading.Event()

    def relist() -> str | None:
        lists.append(1)
        if len(lists) >= 3:
            stop.set()
        return None

    loop = ListWatch("t", relist, lambda version: version, print, backoff_s=1, idle_s=0.01)
    loop.start()
    stop.wait(5)
    loop.stop()
    loop.join(2)
    assert len(lists) >= 3


def test_pod_conversion_and_the_serving_rule() -> None:
    obj = {
        "metadata": {
            "name": "p",
            "labels": {"app": "vllm"},
            "resourceVersion": "42",
            "deletionTimestamp": None,
        },
        "status": {"podIP": "10.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    pod = pod_info_from_object(obj)
    assert pod == PodInfo("p", "10.0.0.5", True, False, {"app": "vllm"})
    assert pod.resource_version == "42" and pod_is_serving(pod)
    assert not pod_is_serving(PodInfo("p", "", ready=True))
    assert not pod_is_serving(PodInfo("p", "10.0.0.5", ready=True, deleting=True))
    assert not pod_is_serving(PodInfo("p", "10.0.0.5", ready=False))


# -- the real client against a stand-in API server --------------------------------------------


def _pod(name: str, ip: str, version: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": "vllm"}, "resourceVersion": version},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


async def test_index_pod_discovery_over_the_real_client() -> None:
    """kvindex's KubernetesDiscovery over KubernetesPodSource (label selector, raw JSON
    list and watch, resume, 410 Gone) with the official client."""
    from kubernetes import client

    pods = [_pod("a", "10.0.0.1", "3")]
    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    queries: list[dict[str, str]] = []
    lists = 0
    closing = False

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal lists
        if closing:
            raise web.HTTPServiceUnavailable()
        queries.append(dict(request.query))
        if request.query.get("watch") not in ("true", "True", "1"):
            lists += 1
            return web.json_response({"metadata": {"resourceVersion": "5"}, "items": pods})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while not closing:
            try:
                event = await asyncio.wait_for(events.get(), 0.05)
            except TimeoutError:
                continue
            if event is None:
                break
            await response.write(json.dumps(event).encode() + b"\n")
        return response

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/{ns}/pods", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api_client = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
    config = KubernetesConfig(label_selector="app=vllm", namespace="ns")
    source = KubernetesPodSource(config.namespace, config.label_selector, api_client, 5)
    discovery = KubernetesDiscovery(config, source, backoff_s=0.01)
    seen: list[set[str]] = []
    errors: list[str] = []
    discovery.start(lambda entries: seen.append(set(entries)), errors.append)
    try:
        await wait_until_async(lambda: seen and seen[-1] == {"10.0.0.1:8000"})
        assert all(q.get("labelSelector") == "app=vllm" for q in queries)
        await events.put({"type": "ADDED", "object": _pod("b", "10.0.0.2", "6")})
        await wait_until_async(lambda: seen[-1] == {"10.0.0.1:8000", "10.0.0.2:8000"})
        await events.put(None)  # dropped watch: resumed from "6", no relist
        await events.put({"type": "DELETED", "object": _pod("a", "10.0.0.1", "7")})
        await wait_until_async(lambda: seen[-1] == {"10.0.0.2:8000"})
        assert lists == 1 and queries[-1].get("resourceVersion") == "6"
        pods[:] = [_pod("c", "10.0.0.3", "8")]
        gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
        await events.put({"type": "ERROR", "object": gone})
        await wait_until_async(lambda: seen[-1] == {"10.0.0.3:8000"})
        assert lists == 2 and errors == []  # 410 relists and is not a failure
    finally:
        stopping = asyncio.create_task(asyncio.to_thread(discovery.stop))
        closing = True  # ends the open watch, so the watcher thread sees the stop
        await stopping
        await runner.cleanup()
        api_client.close()
