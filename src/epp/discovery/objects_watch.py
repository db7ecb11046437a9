"""List + watch the InferenceObjectives and InferenceModelRewrites
(`inference.networking.x-k8s.io/v1alpha2`) of the pool's namespace with the `kubernetes`
client, each on its own thread (`kvindex.podwatch.ListWatch`), and apply them to the
picker's `ObjectStore` on the event loop as source `kubernetes`. The store keeps only the
objects whose `spec.poolRef` names the picker's pool. A kind whose CRD is not installed
(404) is empty and listed again later; an object that cannot be used is skipped and reported
to `on_error`."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from epp.objects import (
    GROUP,
    OBJECTIVES_PLURAL,
    REWRITES_PLURAL,
    VERSION,
    ObjectError,
    ObjectStore,
    objective_from_object,
    rewrite_from_object,
)
from kvindex.podwatch import ListWatch, kube_module, object_version, raw_watch, watch_events

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
# What this module reads (deploy/base/rbac.yaml grants it).
REQUIRED_RBAC: dict[tuple[str, str], tuple[str, ...]] = {
    (GROUP, OBJECTIVES_PLURAL): ("get", "list", "watch"),
    (GROUP, REWRITES_PLURAL): ("get", "list", "watch"),
}
WATCH_TIMEOUT_S = 300
RETRY_DELAY_S = 1.0


class KubernetesObjectsWatcher:
    def __init__(
        self,
        namespace: str,
        api_client: Any,
        on_error: Callable[[str], None] | None = None,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        retry_delay_s: float = RETRY_DELAY_S,
    ) -> None:
        self.namespace = namespace
        self.custom = kube_module("client").CustomObjectsApi(api_client)
        self.on_error = on_error or (lambda what: None)
        self.watch_timeout_s = watch_timeout_s
        self._stopped = threading.Event()
        self._emit: Callable[[Callable[[ObjectStore], None]], None] = lambda change: None
        self._watches: dict[str, Any] = {}
        self.listed: set[str] = set()  # plurals listed at least once (read on the loop)
        self._loops = [
            self._list_watch(p, retry_delay_s) for p in (OBJECTIVES_PLURAL, REWRITES_PLURAL)
        ]

    def _list_watch(self, plural: str, retry_delay_s: float) -> ListWatch:
        def relist() -> str | None:
            return self._relist(plural)

        def follow(version: str) -> str:
            return self._follow(plural, version)

        def failed(exc: Exception) -> None:
            self._failed(plural, exc)

        def stop_watch() -> None:
            self._stop_watch(plural)

        return ListWatch(
            f"epp-k8s-{plural}",
            relist,
            follow,
            failed,
            retry_delay_s,
            idle_s=retry_delay_s * 5,
            on_stop=stop_watch,
        )

    def start(self, loop: asyncio.AbstractEventLoop, store: ObjectStore) -> None:
        def emit(change: Callable[[ObjectStore], None]) -> None:
            if not self._stopped.is_set():
                loop.call_soon_threadsafe(change, store)

        self._emit = emit
        for watch in self._loops:
            watch.start()

    @property
    def synced(self) -> bool:
        """Both kinds were listed at least once (read on the loop)."""
        return self.listed >= {OBJECTIVES_PLURAL, REWRITES_PLURAL}

    def stop(self) -> None:
        self._stopped.set()
        for watch in self._loops:
            watch.stop()

    def join(self, timeout: float) -> None:
        for watch in self._loops:
            thread = watch._thread
            if thread is not None:
                thread.join(timeout)

    def _failed(self, what: str, exc: Exception) -> None:
        log.warning("kubernetes %s watch failed, re-listing: %s", what, exc)
        self.on_error(what)

    def _parse(self, plural: str, obj: Mapping[str, Any]) -> Any:
        try:
            if plural == OBJECTIVES_PLURAL:
                return objective_from_object(obj)
            return rewrite_from_object(obj)
        except ObjectError as exc:
            log.warning("ignoring %s: %s", plural, exc)
            self.on_error(plural)
            return None

    def _relist(self, plural: str) -> str | None:
        api_exception = kube_module("client.exceptions").ApiException
        try:
            listed = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural
            )
        except api_exception as exc:
            if exc.status != 404:
                raise
            log.info("%s/%s %s: not installed; looking again later", GROUP, VERSION, plural)
            listed = {"items": [], "metadata": {}}
        items = [p for p in (self._parse(plural, o) for o in listed.get("items") or []) if p]

        def apply(store: ObjectStore) -> None:
            self.listed.add(plural)  # first: the store's change listeners read `synced`
            if plural == OBJECTIVES_PLURAL:
                store.replace(SOURCE, objectives=items)
            else:
                store.replace(SOURCE, rewrites=items)

        self._emit(apply)
        version = object_version(listed)
        return version or None

    def _follow(self, plural: str, version: str) -> str:
        watch = self._watches[plural] = raw_watch()
        if self._stopped.is_set():
            return version
        for kind, raw in watch_events(
            watch,
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            plural,
            resource_version=version,
            timeout_seconds=self.watch_timeout_s,
        ):
            version = object_version(raw) or version
            name = (raw.get("metadata") or {}).get("name")
            if not isinstance(name, str):
                continue
            if kind == "DELETED":
                self._emit(_deleter(plural, name))
                continue
            parsed = self._parse(plural, raw)
            if parsed is None:
                self._emit(_deleter(plural, name))  # an unusable edit: not applied any more
            else:
                self._emit(_setter(plural, parsed))
        return version

    def _stop_watch(self, plural: str) -> None:
        watch = self._watches.get(plural)
        if watch is not None:
            watch.stop()


def _deleter(plural: str, name: str) -> Callable[[ObjectStore], None]:
    if plural == OBJECTIVES_PLURAL:
        return lambda store: store.delete_objective(SOURCE, name)
    return lambda store: store.delete_rewrite(SOURCE, name)


def _setter(plural: str, obj: Any) -> Callable[[ObjectStore], None]:
    if plural == OBJECTIVES_PLURAL:
        return lambda store: store.set_objective(SOURCE, obj)
    return lambda store: store.set_rewrite(SOURCE, obj)
