"""Kubernetes pods, listed and watched: the one pod watcher behind the index's pod discovery
(:mod:`kvindex.discovery_k8s`) and the picker's InferencePool (``epp.discovery``).

* Pure data: :class:`PodInfo` (what both need of a pod, from its JSON by
  :func:`pod_info_from_object`), :func:`pod_is_serving` (Ready, has an IP, not terminating)
  and the changes a watch reports, :class:`PodsListed` (a full list) and :class:`PodEvent`.
  What a pod becomes (an engine, a pool endpoint per target port) is the caller's.
* :class:`ListWatch`: the list + watch loop on its own thread. It lists, watches from the
  list's resourceVersion, resumes a watch the server ended from the last resourceVersion
  seen, relists at once on 410 Gone (:class:`WatchExpired`) and after ``backoff_s`` on any
  other error; every failure goes to ``on_error``. :class:`PodWatcher` runs it over a
  :class:`PodEventSource`; the picker's pool-object watch runs it too.
* :class:`KubernetesPodSource`: the :class:`PodEventSource` over the official ``kubernetes``
  client (blocking, hence threads), reading raw JSON. Tests feed fake sources (no API server
  runs here).
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from kvindex.threads import named_thread

__all__ = [
    "KubernetesPodSource",
    "ListWatch",
    "PodChange",
    "PodEvent",
    "PodEventKind",
    "PodEventSource",
    "PodInfo",
    "PodWatcher",
    "PodsListed",
    "WatchExpired",
    "kube_api_client",
    "kube_module",
    "object_version",
    "pod_info_from_object",
    "pod_is_serving",
    "raw_watch",
    "watch_events",
]

PodEventKind = Literal["ADDED", "MODIFIED", "DELETED"]
_KINDS: dict[str, PodEventKind] = {"ADDED": "ADDED", "MODIFIED": "MODIFIED", "DELETED": "DELETED"}


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What discovery needs of a pod (``ip`` empty until the pod has one)."""

    name: str
    ip: str = ""
    ready: bool = False
    deleting: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    # Where a watch resumes after this pod's event; not part of the pod's identity.
    resource_version: str = field(default="", compare=False)


def pod_is_serving(pod: PodInfo) -> bool:
    """Ready, has a pod IP and is not being deleted: the rule both callers apply."""
    return pod.ready and not pod.deleting and bool(pod.ip)


@dataclass(frozen=True, slots=True)
class PodEvent:
    kind: PodEventKind
    pod: PodInfo


@dataclass(frozen=True, slots=True)
class PodsListed:
    """A full (re-)list: replaces every pod known so far."""

    pods: tuple[PodInfo, ...]


PodChange = PodEvent | PodsListed


def object_version(obj: Mapping[str, Any]) -> str:
    """An API object's ``metadata.resourceVersion`` ("" if absent)."""
    metadata = obj.get("metadata") or {}
    return str(metadata.get("resourceVersion") or "") if isinstance(metadata, Mapping) else ""


def pod_info_from_object(obj: Mapping[str, Any]) -> PodInfo:
    """A pod's JSON (as the API server sends it) -> :class:`PodInfo`."""
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
        ip=str(status.get("podIP") or ""),
        ready=ready,
        deleting=metadata.get("deletionTimestamp") is not None,
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        resource_version=object_version(obj),
    )


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (HTTP 410 Gone): list again."""


class PodEventSource(Protocol):
    def list(self) -> tuple[list[PodInfo], str]:
        """Current pods and the list's resourceVersion."""
        ...

    def watch(self, resource_version: str) -> Iterator[tuple[str, PodInfo]]:
        """Events ``(ADDED|MODIFIED|DELETED, pod)`` after ``resource_version``; ends when the
        server closes the watch; raises WatchExpired on 410."""
        ...

    def close(self) -> None:
        """Stop the current watch (called from another thread)."""
        ...


class ListWatch:
    """List + watch on a daemon thread until :meth:`stop`.

    ``relist()`` lists, publishes the full state and returns the resourceVersion to watch
    from (None: nothing to watch yet; list again after ``idle_s``). ``follow(version)`` runs
    one watch from ``version``, publishing each event, and returns the last resourceVersion
    seen; a watch the server ends is resumed from there. :class:`WatchExpired` relists at
    once; any other error relists after ``backoff_s``. ``on_error`` hears of both (not while
    stopping): callers decide what counts as a failure."""

    def __init__(
        self,
        name: str,
        relist: Callable[[], str | None],
        follow: Callable[[str], str],
        on_error: Callable[[Exception], None],
        backoff_s: float,
        idle_s: float | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.relist = relist
        self.follow = follow
        self.on_error = on_error
        self.backoff_s = backoff_s
        self.idle_s = backoff_s if idle_s is None else idle_s
        self.on_stop = on_stop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """The loop itself (:meth:`start` runs it on a thread)."""
        while not self._stop.is_set():
            try:
                version = self.relist()
                if version is None:
                    self._stop.wait(self.idle_s)
                    continue
                while not self._stop.is_set():
                    version = self.follow(version)
            except WatchExpired as exc:
                if not self._stop.is_set():
                    self.on_error(exc)  # and relist at once
            except Exception as exc:  # API server down, RBAC, broken connection: relist
                if self._stop.is_set():
                    return
                self.on_error(exc)
                self._stop.wait(self.backoff_s)

    def start(self) -> None:
        self._thread = named_thread(self.run, self.name)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.on_stop is not None:
            self.on_stop()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


class PodWatcher:
    """:class:`ListWatch` over a :class:`PodEventSource`: ``sink`` gets a :class:`PodsListed`
    after each list and a :class:`PodEvent` per watch event, on the watcher's thread."""

    def __init__(
        self,
        source: PodEventSource,
        sink: Callable[[PodChange], None],
        on_error: Callable[[Exception], None],
        backoff_s: float = 2.0,
        name: str = "pod-watch",
    ) -> None:
        self.source = source
        self.sink = sink
        self.loop = ListWatch(
            name, self._relist, self._follow, on_error, backoff_s, on_stop=source.close
        )

    def _relist(self) -> str:
        pods, version = self.source.list()
        self.sink(PodsListed(tuple(pods)))
        return version

    def _follow(self, version: str) -> str:
        for kind, pod in self.source.watch(version):
            if self.loop.stopped:
                break
            known = _KINDS.get(kind)
            if known is not None:
                self.sink(PodEvent(known, pod))
            version = pod.resource_version or version
        return version

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    def join(self, timeout: float) -> None:
        self.loop.join(timeout)


# -- the kubernetes client ------------------------------------------------------------------


def kube_module(name: str) -> Any:
    """A ``kubernetes`` submodule, imported on first use and typed loosely: the client's
    partial annotations do not cover the raw (``_preload_content=False``) and watch calls."""
    return importlib.import_module(f"kubernetes.{name}")


def kube_api_client() -> Any:
    """In-cluster service account first, then ``~/.kube/config``; returns an ApiClient.
    Raises the client's ConfigException (or OSError) when neither is there."""
    config = kube_module("config")
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return kube_module("client").ApiClient()


_raw_watch_class: Any = None


def raw_watch() -> Any:
    """A ``kubernetes.watch.Watch`` that hands out each event's object as its JSON, without
    building the client's typed models (slow). Not ``deserialize=False``: in the client's
    releases that have it, an ERROR event (410 Gone) then fails with ``KeyError:
    'raw_object'`` instead of the ApiException this module turns into WatchExpired."""
    global _raw_watch_class
    if _raw_watch_class is None:
        base = kube_module("watch").Watch
        _raw_watch_class = type("RawWatch", (base,), {"get_return_type": lambda self, f: None})
    return _raw_watch_class()


def watch_events(
    watch: Any, func: Any, *args: Any, **kwargs: Any
) -> Iterator[tuple[PodEventKind, dict[str, Any]]]:
    """``watch.stream(func, *args, **kwargs)`` (``watch`` from :func:`raw_watch`) as
    ``(ADDED|MODIFIED|DELETED, object JSON)``; BOOKMARK and unknown events are skipped.
    410 Gone raises WatchExpired, another ERROR RuntimeError."""
    api_exception = kube_module("client.exceptions").ApiException
    try:
        for event in watch.stream(func, *args, **kwargs):
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            raw = event.get("raw_object", event.get("object"))
            if kind == "ERROR":
                if isinstance(raw, dict) and raw.get("code") == 410:
                    raise WatchExpired(str(raw.get("message") or "resourceVersion too old"))
                raise RuntimeError(f"watch error: {raw}")
            known = _KINDS.get(kind) if isinstance(kind, str) else None
            if known is not None and isinstance(raw, dict):
                yield known, raw
    except api_exception as exc:
        if exc.status == 410:
            raise WatchExpired(str(exc)) from exc
        raise


class KubernetesPodSource:
    """:class:`PodEventSource` over the official client: the pods of ``namespace`` (matching
    ``label_selector``, if given), as raw JSON. Without ``api_client`` the credentials are
    loaded on first use (:func:`kube_api_client`), on the watcher's thread."""

    def __init__(
        self,
        namespace: str,
        label_selector: str = "",
        api_client: Any = None,
        watch_timeout_s: int = 60,
    ) -> None:
        self.namespace = namespace
        self.label_selector = label_selector
        self.api_client = api_client
        self.watch_timeout_s = watch_timeout_s
        self._core: Any = None
        self._watch: Any = None
        self._closed = False

    def core(self) -> Any:
        """The CoreV1Api (credentials loaded now if no ApiClient was given)."""
        if self._core is None:
            client = self.api_client if self.api_client is not None else kube_api_client()
            self._core = kube_module("client").CoreV1Api(client)
        return self._core

    def _selector(self) -> dict[str, str]:
        return {"label_selector": self.label_selector} if self.label_selector else {}

    @staticmethod
    def view(pod: Any) -> PodInfo:
        """A typed client object (``V1Pod``) -> PodInfo, through its JSON form."""
        with kube_module("client").ApiClient() as client:
            return pod_info_from_object(client.sanitize_for_serialization(pod))

    def list(self) -> tuple[list[PodInfo], str]:
        response = self.core().list_namespaced_pod(
            self.namespace, _preload_content=False, **self._selector()
        )
        doc = json.loads(response.data)
        pods = [pod_info_from_object(item) for item in doc.get("items") or []]
        return pods, object_version(doc)

    def watch(self, resource_version: str) -> Iterator[tuple[str, PodInfo]]:
        self._watch = raw_watch()
        if self._closed:  # after the assignment: close() stops this watch or we see it here
            return
        for kind, raw in watch_events(
            self._watch,
            self.core().list_namespaced_pod,
            self.namespace,
            resource_version=resource_version,
            timeout_seconds=self.watch_timeout_s,
            **self._selector(),
        ):
            yield kind, pod_info_from_object(raw)

    def close(self) -> None:
        self._closed = True
        if self._watch is not None:
            self._watch.stop()
