"""The Kubernetes edge of InferencePool discovery: list + watch the pool object and the pods
of its namespace with the official `kubernetes` client (blocking, so each watch runs in its
own thread) and hand `DiscoveryEvent`s to the event loop. The reconciliation logic is pure
(`epp.discovery.pool`). The watch mechanics are the index's (`kvindex.podwatch`): the pods
are its `PodWatcher` over a `KubernetesPodSource`, the pool object its `ListWatch` loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from epp.discovery.objects_watch import REQUIRED_RBAC as OBJECTS_RBAC
from epp.discovery.pool import (
    DiscoveryEvent,
    PoolChanged,
    PoolSpecError,
    pool_spec_from_object,
)
from kvindex.podwatch import (
    KubernetesPodSource,
    ListWatch,
    PodWatcher,
    kube_api_client,
    kube_module,
    object_version,
    pod_info_from_object,
    raw_watch,
    watch_events,
)

__all__ = [
    "POOL_GROUP_VERSIONS",
    "POOL_PLURAL",
    "REQUIRED_RBAC",
    "KubernetesPoolWatcher",
    "load_kube_config",
    "pod_info_from_object",
]

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
    # InferenceObjectives and InferenceModelRewrites of the pool's namespace.
    **OBJECTS_RBAC,
}
WATCH_TIMEOUT_S = 300
RETRY_DELAY_S = 1.0


def load_kube_config() -> Any:
    """In-cluster service account first, then ~/.kube/config; returns an ApiClient."""
    config = kube_module("config")
    try:
        return kube_api_client()
    except (config.ConfigException, OSError) as exc:
        raise ValueError(
            f"--pool-name needs Kubernetes credentials (in-cluster service account or "
            f"a kubeconfig): {exc}; outside Kubernetes use --endpoints or --endpoints-file"
        ) from None


class KubernetesPoolWatcher:
    """Emits PoolChanged for pool `name` in `namespace`, and PodsListed/PodEvent for the
    namespace's pods (filtering by the pool's selector is the reconciler's job, so a changed
    selector needs no new watch). Threads stop at `stop()` or when a watch times out after
    stop was requested. A failed watch is logged, reported to `on_error` ("pods" or "pool")
    and re-listed."""

    def __init__(
        self,
        namespace: str,
        pool_name: str,
        api_client: Any,
        on_error: Callable[[str], None] | None = None,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        retry_delay_s: float = RETRY_DELAY_S,
    ) -> None:
        self.namespace = namespace
        self.pool_name = pool_name
        self.api_client = api_client
        self.pods = KubernetesPodSource(
            namespace, api_client=api_client, watch_timeout_s=watch_timeout_s
        )
        self.core = self.pods.core()
        self.custom = kube_module("client").CustomObjectsApi(api_client)
        self.on_error = on_error or (lambda what: None)
        self.watch_timeout_s = watch_timeout_s
        self.retry_delay_s = retry_delay_s
        self._stopped = threading.Event()
        self._emit: Callable[[DiscoveryEvent], None] = lambda event: None
        self._pool_watch: Any = None
        self.group_version: tuple[str, str] | None = None
        self._pod_loop = PodWatcher(
            self.pods,
            lambda change: self._emit(change),
            lambda exc: self._failed("pods", exc),
            retry_delay_s,
            name="epp-k8s-pods",
        )
        self._pool_loop = ListWatch(
            "epp-k8s-pool",
            self._relist_pool,
            self._follow_pool,
            lambda exc: self._failed("pool", exc),
            retry_delay_s,
            idle_s=retry_delay_s * 5,
            on_stop=self._stop_pool_watch,
        )

    def start(
        self, loop: asyncio.AbstractEventLoop, sink: Callable[[DiscoveryEvent], None]
    ) -> None:
        def emit(event: DiscoveryEvent) -> None:
            if not self._stopped.is_set():
                loop.call_soon_threadsafe(sink, event)

        self._emit = emit
        self._pool_loop.start()
        self._pod_loop.start()

    def stop(self) -> None:
        self._stopped.set()
        self._pod_loop.stop()
        self._pool_loop.stop()

    def join(self, timeout: float) -> None:
        self._pool_loop.join(timeout)
        self._pod_loop.join(timeout)

    def _failed(self, what: str, exc: Exception) -> None:
        log.warning("kubernetes %s watch failed, re-listing: %s", what, exc)
        self.on_error(what)

    # -- pool ------------------------------------------------------------------------

    def _get_pool(self) -> tuple[Mapping[str, Any] | None, str]:
        api_exception = kube_module("client.exceptions").ApiException
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
            return obj, object_version(obj)
        self.group_version = None
        return None, ""

    def _emit_pool(self, obj: Mapping[str, Any] | None) -> None:
        if obj is None:
            self._emit(PoolChanged(None))
            return
        try:
            self._emit(PoolChanged(pool_spec_from_object(obj)))
        except PoolSpecError as exc:
            self._emit(PoolChanged(None, error=str(exc)))

    def _relist_pool(self) -> str | None:
        obj, version = self._get_pool()
        self._emit_pool(obj)
        if self.group_version is None:
            log.warning(
                "InferencePool %s/%s not found (tried %s); retrying",
                self.namespace,
                self.pool_name,
                ", ".join(f"{g}/{v}" for g, v in POOL_GROUP_VERSIONS),
            )
            return None
        return version

    def _follow_pool(self, version: str) -> str:
        if self.group_version is None:  # _relist_pool found it: cannot happen
            raise RuntimeError(f"InferencePool {self.pool_name}: no API version to watch")
        group, api_version = self.group_version
        self._pool_watch = raw_watch()
        if self._stopped.is_set():  # stop() ran before the assignment
            return version
        for kind, raw in watch_events(
            self._pool_watch,
            self.custom.list_namespaced_custom_object,
            group,
            api_version,
            self.namespace,
            POOL_PLURAL,
            field_selector=f"metadata.name={self.pool_name}",
            resource_version=version,
            timeout_seconds=self.watch_timeout_s,
        ):
            if kind == "DELETED":
                self._emit(PoolChanged(None))
            else:
                self._emit_pool(raw)
            version = object_version(raw) or version
        return version

    def _stop_pool_watch(self) -> None:
        if self._pool_watch is not None:
            self._pool_watch.stop()
