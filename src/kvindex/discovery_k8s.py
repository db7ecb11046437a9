"""Kubernetes pod discovery: engines are the Ready, not-terminating pods matching a label
selector; ``podIP:serving_port`` is the endpoint, ``tcp://podIP:socket_port`` the PUB socket
(llm-d's ``kvEventsConfig.podDiscoveryConfig.socketPort``, default 5557) and, when set,
``tcp://podIP:replay_port`` the replay ROUTER.

:class:`PodSet` (pods -> engine entries) is pure; the list/watch mechanics (list, watch from
the list's resourceVersion, relist on 410 Gone, back off on errors) are the shared pod
watcher of :mod:`kvindex.podwatch`, which the picker's InferencePool discovery runs too.
:class:`KubernetesDiscovery` runs it over a :class:`PodEventSource`
(:class:`KubernetesPodSource`, the official ``kubernetes`` client, in production).
"""

from __future__ import annotations

import logging

from kvindex.config import KubernetesConfig
from kvindex.discovery import EngineEntry, OnChange, OnError
from kvindex.hostport import join_host_port
from kvindex.podwatch import (
    KubernetesPodSource,
    PodChange,
    PodEventSource,
    PodInfo,
    PodsListed,
    PodWatcher,
    WatchExpired,
    pod_is_serving,
)

__all__ = [
    "KubernetesDiscovery",
    "KubernetesPodSource",
    "PodEventSource",
    "PodSet",
    "PodView",
    "WatchExpired",
]

log = logging.getLogger("kvindex.discovery.k8s")


# The name this module gave the shared pod record.
PodView = PodInfo


class PodSet:
    """Pure bookkeeping: pods -> engine entries."""

    def __init__(self, config: KubernetesConfig) -> None:
        self.config = config
        self._pods: dict[str, EngineEntry] = {}

    def entry_for(self, pod: PodView) -> EngineEntry | None:
        if not pod_is_serving(pod):
            return None
        cfg = self.config
        return EngineEntry(
            endpoint=join_host_port(pod.ip, cfg.serving_port),
            # socket_port 0: the engines connect to our bind socket; discovery only names them.
            zmq=f"tcp://{join_host_port(pod.ip, cfg.socket_port)}" if cfg.socket_port else None,
            replay=(
                None
                if cfg.replay_port is None
                else f"tcp://{join_host_port(pod.ip, cfg.replay_port)}"
            ),
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

    def apply_change(self, change: PodChange) -> bool:
        """A list (always reported) or one watch event; True when the set should be
        reported."""
        if isinstance(change, PodsListed):
            self.reset(list(change.pods))
            return True
        return self.apply(change.kind, change.pod)

    def entries(self) -> dict[str, EngineEntry]:
        return {entry.endpoint: entry for entry in self._pods.values()}


class KubernetesDiscovery:
    """Engines from pods: the shared :class:`~kvindex.podwatch.PodWatcher` feeding a
    :class:`PodSet`. A 410 Gone relists at once and is not counted; other errors are
    reported to ``on_error`` and retried after ``backoff_s``, the last set kept."""

    name = "kubernetes"

    def __init__(
        self, config: KubernetesConfig, source: PodEventSource, backoff_s: float = 2.0
    ) -> None:
        self.pods = PodSet(config)
        self.source = source
        self.backoff_s = backoff_s
        self._watcher: PodWatcher | None = None

    @classmethod
    def from_config(cls, config: KubernetesConfig) -> KubernetesDiscovery:
        return cls(config, KubernetesPodSource(config.namespace, config.label_selector))

    def start(self, on_change: OnChange, on_error: OnError) -> None:
        def changed(change: PodChange) -> None:
            if self.pods.apply_change(change):
                on_change(self.pods.entries())

        def failed(exc: Exception) -> None:
            if isinstance(exc, WatchExpired):
                return  # relisted at once: not a failure
            log.warning("event=k8s_discovery_error error=%r", str(exc))
            on_error(str(exc))

        self._watcher = PodWatcher(
            self.source, changed, failed, self.backoff_s, name="kvindex-k8s-discovery"
        )
        self._watcher.start()

    def stop(self) -> None:
        if self._watcher is None:
            self.source.close()
            return
        self._watcher.stop()
        self._watcher.join(timeout=2)
