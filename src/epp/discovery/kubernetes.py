"""The Kubernetes edge of InferencePool discovery: list + watch the pool object and the pods
of its namespace with the official `kubernetes` client (blocking, so each watch runs in its
own thread) and hand `DiscoveryEvent`s to the event loop. The reconciliation logic is pure
(`epp.discovery.pool`); this module only talks to the API server and converts its JSON."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from epp.discovery.pool import (
    DiscoveryEvent,
    PodEvent,
    PodInfo,
    PodsListed,
    PoolChanged,
    PoolSpecError,
    pool_spec_from_object,
)

log = logging.getLogger(__name__)

POOL_PLURAL = "inferencepools"
# Tried in order: the GA group first, then the older alpha still deployed in places.
POOL_GROUP_VERSIONS: tuple[tuple[str, str], ...] = (
    ("inference.networking.k8s.io", "v1"),
    ("inference.networking.x-k8s.io", "v1alpha2"),
)
# What this module reads, as (API group, resource) -> verbs: the picker's Role must grant
# exactly this (deploy/base/rbac.yaml; tests/deploy checks it).
REQUIRED_RBAC: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "pods"): ("get", "list", "watch"),
    **{(group, POOL_PLURAL): ("get", "list", "watch") for group, _ in POOL_GROUP_VERSIONS},
}
WATCH_TIMEOUT_S = 300
RETRY_DELAY_S = 1.0


def pod_info_from_object(obj: Mapping[str, Any]) -> PodInfo:
    """A pod's JSON (as the API server sends it) -> what the reconciler needs."""
    metadata = obj.get("metadata") or {}
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
    )
    labels = metadata.get("labels") or {}
    return PodInfo(
        name=str(metadata.get("name", "")),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        ip=str(status.get("podIP") or ""),
        ready=ready,
        deleting=metadata.get("deletionTimestamp") is not None,
    )


def _k8s(module: str) -> Any:
    """A `kubernetes` submodule, typed loosely: the client's partial annotations do not
    cover the raw (`_preload_content=False`) and watch calls used here."""
    return importlib.import_module(f"kubernetes.{module}")


def _event_object(event: Any) -> Any:
    """A watch event's object: `object` with deserialize=False, `raw_object` otherwise."""
    if not isinstance(event, dict):
        return None
    return event.get("raw_object", event.get("object"))


def load_kube_config() -> Any:
    """In-cluster service account first, then ~/.kube/config; returns an ApiClient."""
    config = _k8s("config")
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise ValueError(
                f"--pool-name needs Kubernetes credentials (in-cluster service account or "
                f"a kubeconfig): {exc}; outside Kubernetes use --endpoints or --endpoints-file"
            ) from None
    return _k8s("client").ApiClient()


class KubernetesPoolWatcher:
    """Emits PoolChanged for pool `name` in `namespace`, and PodsListed/PodEvent for the
    namespace's pods (filtering by the pool's selector is the reconciler's job, so a changed
    selector needs no new watch). Threads stop at `stop()` or when a watch times out after
    stop was requested."""

    def __init__(
        self,
        namespace: str,
        pool_name: str,
        api_client: Any,
        on_error: Callable[[str], None] | None = None,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        retry_delay_s: float = RETRY_DELAY_S,
    ) -> None:
        client = _k8s("client")
        self.namespace = namespace
        self.pool_name = pool_name
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.on_error = on_error or (lambda what: None)
        self.watch_timeout_s = watch_timeout_s
        self.retry_delay_s = retry_delay_s
        self._stopped = threading.Event()
        self._watches: list[Any] = []
        self._threads: list[threading.Thread] = []
        self.group_version: tuple[str, str] | None = None

    def start(
        self, loop: asyncio.AbstractEventLoop, sink: Callable[[DiscoveryEvent], None]
    ) -> None:
        def emit(event: DiscoveryEvent) -> None:
            if not self._stopped.is_set():
                loop.call_soon_threadsafe(sink, event)

        for target, name in ((self._pool_loop, "pool"), (self._pods_loop, "pods")):
            thread = threading.Thread(
                target=target, args=(emit,), name=f"epp-k8s-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopped.set()
        for w in list(self._watches):
            w.stop()

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)

    # -- pods ------------------------------------------------------------------------

    def _list_pods(self) -> tuple[list[PodInfo], str]:
        response = self.core.list_namespaced_pod(self.namespace, _preload_content=False)
        doc = json.loads(response.data)
        pods = [pod_info_from_object(item) for item in doc.get("items") or []]
        return pods, str((doc.get("metadata") or {}).get("resourceVersion", ""))

    def _pods_loop(self, emit: Callable[[DiscoveryEvent], None]) -> None:
        watch = _k8s("watch")
        while not self._stopped.is_set():
            try:
                pods, version = self._list_pods()
                emit(PodsListed(tuple(pods)))
                while not self._stopped.is_set():
                    w = watch.Watch()
                    self._watches.append(w)
                    try:
                        for event in w.stream(
                            self.core.list_namespaced_pod,
                            self.namespace,
                            resource_version=version,
                            timeout_seconds=self.watch_timeout_s,
                            deserialize=False,
                        ):
                            version = self._on_pod_event(event, emit) or version
                    finally:
                        self._watches.remove(w)
            except Exception as exc:  # API errors, 410 Gone, broken connections: re-list
                self._failed("pods", exc)

    def _on_pod_event(self, event: Any, emit: Callable[[DiscoveryEvent], None]) -> str | None:
        kind = event.get("type") if isinstance(event, dict) else None
        raw = _event_object(event)
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not isinstance(raw, dict):
            if kind == "ERROR":
                raise RuntimeError(f"watch error: {raw}")
            return None  # BOOKMARK and unknown events carry no pod change
        emit(PodEvent(kind, pod_info_from_object(raw)))
        return str((raw.get("metadata") or {}).get("resourceVersion") or "") or None

    # -- pool ------------------------------------------------------------------------

    def _get_pool(self) -> tuple[Mapping[str, Any] | None, str]:
        api_exception = _k8s("client.exceptions").ApiException
        for group, version in POOL_GROUP_VERSIONS:
            try:
                obj = self.custom.get_namespaced_custom_object(
                    group, version, self.namespace, POOL_PLURAL, self.pool_name
                )
            except api_exception as exc:
                if exc.status == 404:
                    continue
                raise
            self.group_version = (group, version)
            if not isinstance(obj, dict):
                raise PoolSpecError(f"InferencePool {self.pool_name} is not an object")
            return obj, str((obj.get("metadata") or {}).get("resourceVersion", ""))
        self.group_version = None
        return None, ""

    def _emit_pool(
        self, obj: Mapping[str, Any] | None, emit: Callable[[DiscoveryEvent], None]
    ) -> None:
        if obj is None:
            emit(PoolChanged(None))
            return
        try:
            emit(PoolChanged(pool_spec_from_object(obj)))
        except PoolSpecError as exc:
            emit(PoolChanged(None, error=str(exc)))

    def _pool_loop(self, emit: Callable[[DiscoveryEvent], None]) -> None:
        watch = _k8s("watch")
        while not self._stopped.is_set():
            try:
                obj, version = self._get_pool()
                self._emit_pool(obj, emit)
                if self.group_version is None:
                    log.warning(
                        "InferencePool %s/%s not found (tried %s); retrying",
                        self.namespace,
                        self.pool_name,
                        ", ".join(f"{g}/{v}" for g, v in POOL_GROUP_VERSIONS),
                    )
                    self._stopped.wait(self.retry_delay_s * 5)
                    continue
                group, api_version = self.group_version
                w = watch.Watch()
                self._watches.append(w)
                try:
                    for event in w.stream(
                        self.custom.list_namespaced_custom_object,
                        group,
                        api_version,
                        self.namespace,
                        POOL_PLURAL,
                        field_selector=f"metadata.name={self.pool_name}",
                        resource_version=version,
                        timeout_seconds=self.watch_timeout_s,
                        deserialize=False,
                    ):
                        kind = event.get("type") if isinstance(event, dict) else None
                        raw = _event_object(event)
                        if kind == "DELETED":
                            emit(PoolChanged(None))
                        elif kind in ("ADDED", "MODIFIED") and isinstance(raw, dict):
                            self._emit_pool(raw, emit)
                        elif kind == "ERROR":
                            raise RuntimeError(f"watch error: {raw}")
                finally:
                    self._watches.remove(w)
            except Exception as exc:
                self._failed("pool", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        if self._stopped.is_set():
            return
        log.warning("kubernetes %s watch failed, re-listing: %s", what, exc)
        self.on_error(what)
        self._stopped.wait(self.retry_delay_s)
