"""InferencePool -> endpoints, as pure logic over pool and pod events.

A pod counts only if it matches the pool's selector (all matchLabels), is Ready, has a pod IP
and is not being deleted; each of the pool's target ports on such a pod is its own endpoint
`podIP:port` (how data-parallel ranks are exposed). Reads `inference.networking.k8s.io/v1`
(`spec.selector.matchLabels`, `spec.targetPorts[].number`) and the older
`inference.networking.x-k8s.io/v1alpha2` (`spec.selector` as a plain label map,
`spec.targetPortNumber`). The pod records and the events (`PodInfo`, `PodEvent`, `PodsListed`)
are the shared pod watcher's (`kvindex.podwatch`); pool selection is this module's."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from epp.endpoints import Datastore, EndpointSpecError, make_endpoint
from epp.errors import EPPError
from epp.metrics import EppMetrics
from epp.types import Endpoint
from kvindex.podwatch import PodEvent, PodInfo, PodsListed, pod_is_serving

log = logging.getLogger(__name__)

MAX_TARGET_PORTS = 8


class PoolSpecError(EPPError, ValueError):
    """The InferencePool object cannot be used; the message says which field is wrong."""


@dataclass(frozen=True, slots=True)
class PoolSpec:
    selector: Mapping[str, str]
    target_ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PoolChanged:
    """The pool object (None: deleted or not found) or an unusable one (error)."""

    spec: PoolSpec | None
    error: str | None = None


DiscoveryEvent = PodEvent | PodsListed | PoolChanged


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise PoolSpecError(f"{where} must be a port number 1..65535, got {value!r}")
    return value


def pool_spec_from_object(obj: Mapping[str, Any]) -> PoolSpec:
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise PoolSpecError("InferencePool has no spec")
    selector = spec.get("selector")
    if isinstance(selector, Mapping) and "matchLabels" in selector:
        labels = selector.get("matchLabels")  # v1: LabelSelector
    else:
        labels = selector  # v1alpha2: a plain label map
    if not isinstance(labels, Mapping) or not labels:
        raise PoolSpecError("spec.selector.matchLabels must be a non-empty label map")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise PoolSpecError("spec.selector labels must map strings to strings")
    if "targetPorts" in spec:
        entries = spec["targetPorts"]
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_TARGET_PORTS:
            raise PoolSpecError(f"spec.targetPorts must list 1..{MAX_TARGET_PORTS} ports")
        ports = tuple(
            _port(e.get("number") if isinstance(e, Mapping) else None, f"spec.targetPorts[{i}]")
            for i, e in enumerate(entries)
        )
    elif "targetPortNumber" in spec:
        ports = (_port(spec["targetPortNumber"], "spec.targetPortNumber"),)
    else:
        raise PoolSpecError("spec.targetPorts (v1) or spec.targetPortNumber (v1alpha2) missing")
    if len(set(ports)) != len(ports):
        raise PoolSpecError("spec.targetPorts lists a port twice")
    return PoolSpec(selector=dict(labels), target_ports=ports)


class PoolReconciler:
    """Applies discovery events and publishes the resulting endpoints to the datastore."""

    SOURCE = "pool"

    def __init__(self, datastore: Datastore, metrics: EppMetrics) -> None:
        self.datastore = datastore
        self.metrics = metrics
        self.spec: PoolSpec | None = None
        self.pods: dict[str, PodInfo] = {}
        self.synced_pool = False
        self.synced_pods = False
        # (pod, its labels) already counted as unusable: counted once, not at every reconcile
        self._rejected: set[tuple[str, tuple[tuple[str, str], ...]]] = set()

    def apply(self, event: DiscoveryEvent) -> None:
        if isinstance(event, PoolChanged):
            self.synced_pool = True
            if event.error is not None:
                # Keep serving the last good spec; a broken edit must not empty the pool.
                log.error("InferencePool unusable, keeping the last good spec: %s", event.error)
                self.metrics.endpoint_source_errors.labels(source=self.SOURCE).inc()
                return
            self.spec = event.spec
        elif isinstance(event, PodsListed):
            self.synced_pods = True
            self.pods = {pod.name: pod for pod in event.pods}
        elif event.kind == "DELETED":
            self.pods.pop(event.pod.name, None)
        else:
            self.pods[event.pod.name] = event.pod
        self.datastore.replace(self.SOURCE, self.endpoints())

    @property
    def synced(self) -> bool:
        return self.synced_pool and self.synced_pods

    def _eligible(self, pod: PodInfo, spec: PoolSpec) -> bool:
        if not pod_is_serving(pod):
            return False
        return all(pod.labels.get(k) == v for k, v in spec.selector.items())

    def endpoints(self) -> list[Endpoint]:
        spec = self.spec
        if spec is None:
            return []
        out: list[Endpoint] = []
        for pod in sorted(self.pods.values(), key=lambda p: p.name):
            if not self._eligible(pod, spec):
                continue
            try:
                out.extend(
                    make_endpoint(pod.ip, port, pod.labels, pod.name) for port in spec.target_ports
                )
            except EndpointSpecError as exc:
                identity = (pod.name, tuple(sorted(pod.labels.items())))
                if identity not in self._rejected:
                    self._rejected.add(identity)
                    log.warning("skipping pod %s: %s", pod.name, exc)
                    self.metrics.endpoint_source_errors.labels(source=self.SOURCE).inc()
        self._rejected = {r for r in self._rejected if r[0] in self.pods}
        return out
