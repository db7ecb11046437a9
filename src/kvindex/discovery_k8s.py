"""Kubernetes pod discovery: engines are the Ready, not-terminating pods matching a label
selector; ``podIP:serving_port`` is the endpoint, ``tcp://podIP:socket_port`` the PUB socket
(llm-d's ``kvEventsConfig.podDiscoveryConfig.socketPort``, default 5557) and, when set,
``tcp://podIP:replay_port`` the replay ROUTER.

The logic (:class:`PodSet`, the list/watch loop of :class:`KubernetesDiscovery`) runs against
the small :class:`PodEventSource` interface; :class:`KubernetesPodSource` implements it with
the official ``kubernetes`` client (list, then watch from the list's resourceVersion,
relisting when the watch expires with 410 Gone).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvindex.config import KubernetesConfig
from kvindex.discovery import EngineEntry, OnChange, OnError

__all__ = [
    "KubernetesDiscovery",
    "KubernetesPodSource",
    "PodEventSource",
    "PodSet",
    "PodView",
    "WatchExpired",
]

log = logging.getLogger("kvindex.discovery.k8s")


@dataclass(frozen=True, slots=True)
class PodView:
    """What discovery needs of a pod."""

    name: str
    ip: str | None
    ready: bool
    deleting: bool
    labels: Mapping[str, str] = field(default_factory=dict)


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (HTTP 410 Gone): list again."""


class PodEventSource(Protocol):
    def list(self) -> tuple[list[PodView], str]:
        """Current pods and the list's resourceVersion."""
        ...

    def watch(self, resource_version: str) -> Iterator[tuple[str, PodView]]:
        """Events ``(ADDED|MODIFIED|DELETED, pod)`` after ``resource_version``; ends when the
        server closes the watch; raises WatchExpired on 410."""
        ...

    def close(self) -> None: ...


class PodSet:
    """Pure bookkeeping: pods -> engine entries."""

    def __init__(self, config: KubernetesConfig) -> None:
        self.config = config
        self._pods: dict[str, EngineEntry] = {}

    def entry_for(self, pod: PodView) -> EngineEntry | None:
        if not pod.ready or pod.deleting or not pod.ip:
            return None
        cfg = self.config
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        return EngineEntry(
            endpoint=f"{host}:{cfg.serving_port}",
            zmq=f"tcp://{host}:{cfg.socket_port}",
            replay=None if cfg.replay_port is None else f"tcp://{host}:{cfg.replay_port}",
            model=pod.labels.get(cfg.model_label) if cfg.model_label else None,
        )

    def reset(self, pods: list[PodView]) -> None:
        self._pods = {}
        for pod in pods:
            entry = self.entry_for(pod)
            if entry is not None:
                self._pods[pod.name] = entry

    def apply(self, kind: str, pod: PodView) -> bool:
        """One watch event; True when the engine set changed."""
        before = self._pods.get(pod.name)
        entry = None if kind == "DELETED" else self.entry_for(pod)
        if entry is None:
            self._pods.pop(pod.name, None)
        else:
            self._pods[pod.name] = entry
        return before != entry

    def entries(self) -> dict[str, EngineEntry]:
        return {entry.endpoint: entry for entry in self._pods.values()}


class KubernetesDiscovery:
    name = "kubernetes"

    def __init__(
        self, config: KubernetesConfig, source: PodEventSource, backoff_s: float = 2.0
    ) -> None:
        self.pods = PodSet(config)
        self.source = source
        self.backoff_s = backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: KubernetesConfig) -> KubernetesDiscovery:
        return cls(config, KubernetesPodSource(config.namespace, config.label_selector))

    def run_once(self, on_change: OnChange) -> None:
        """List, report, then follow the watch until it ends or expires."""
        pods, version = self.source.list()
        self.pods.reset(pods)
        on_change(self.pods.entries())
        for kind, pod in self.source.watch(version):
            if self._stop.is_set():
                return
            if self.pods.apply(kind, pod):
                on_change(self.pods.entries())

    def start(self, on_change: OnChange, on_error: OnError) -> None:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.run_once(on_change)
                except WatchExpired:
                    continue  # relist at once
                except Exception as exc:  # API server down, RBAC, ...: keep the last set
                    log.warning("event=k8s_discovery_error error=%r", str(exc))
                    on_error(str(exc))
                    self._stop.wait(self.backoff_s)

        self._thread = threading.Thread(target=run, name="kvindex-k8s-discovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.source.close()
        if self._thread is not None:
            self._thread.join(timeout=2)


class KubernetesPodSource:
    """:class:`PodEventSource` over the official client (in-cluster config, else kubeconfig)."""

    def __init__(self, namespace: str, label_selector: str, watch_timeout_s: int = 60) -> None:
        self.namespace = namespace
        self.label_selector = label_selector
        self.watch_timeout_s = watch_timeout_s
        self._api: Any = None
        self._watch: Any = None

    def _core(self) -> Any:
        if self._api is None:
            import kubernetes

            k8s: Any = kubernetes  # the client is untyped
            try:
                k8s.config.load_incluster_config()
            except k8s.config.ConfigException:
                k8s.config.load_kube_config()
            client = k8s.client
            self._api = client.CoreV1Api()
        return self._api

    @staticmethod
    def view(pod: Any) -> PodView:
        status = pod.status
        conditions = (status.conditions if status is not None else None) or []
        ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
        return PodView(
            name=pod.metadata.name,
            ip=status.pod_ip if status is not None else None,
            ready=ready,
            deleting=pod.metadata.deletion_timestamp is not None,
            labels=dict(pod.metadata.labels or {}),
        )

    def list(self) -> tuple[list[PodView], str]:
        result = self._core().list_namespaced_pod(
            self.namespace, label_selector=self.label_selector
        )
        return [self.view(p) for p in result.items], result.metadata.resource_version

    def watch(self, resource_version: str) -> Iterator[tuple[str, PodView]]:
        import kubernetes.watch
        from kubernetes.client.exceptions import ApiException

        k8s_watch: Any = kubernetes.watch
        self._watch = k8s_watch.Watch()
        try:
            for event in self._watch.stream(
                self._core().list_namespaced_pod,
                self.namespace,
                label_selector=self.label_selector,
                resource_version=resource_version,
                timeout_seconds=self.watch_timeout_s,
            ):
                kind = event.get("type")
                if kind == "ERROR":
                    raw = event.get("raw_object") or {}
                    if raw.get("code") == 410:
                        raise WatchExpired(raw.get("message", "resourceVersion too old"))
                    raise RuntimeError(f"watch error: {raw}")
                yield kind, self.view(event["object"])
        except ApiException as exc:
            if exc.status == 410:
                raise WatchExpired(str(exc)) from exc
            raise

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
