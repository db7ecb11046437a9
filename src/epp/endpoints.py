"""The endpoint datastore and its non-Kubernetes sources (a static list, a watched file).

The Datastore holds one `Endpoint` per `ip:port`. Each source replaces its own set; an
endpoint that stays keeps its object, so the metrics scraped for it survive an update. The
InferencePool source lives in `epp.discovery`. The `ip:port` parser and the file watch are
the index's (`kvindex.hostport`, `kvindex.filewatch`): one discovery stack for both.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from epp.errors import EPPError
from epp.metrics import EppMetrics
from epp.types import Endpoint, Role
from kvindex.filewatch import WatchedFile, poll_every
from kvindex.hostport import HostPortError
from kvindex.hostport import split_host_port as _split_host_port

log = logging.getLogger(__name__)

ROLE_LABEL = "llm-d.ai/role"
ENGINE_TYPE_LABEL = "llm-d.ai/engine-type"
DEFAULT_ENGINE_TYPE = "vllm"


class EndpointSpecError(EPPError, ValueError):
    """An endpoint description is invalid; the message names the entry and the problem."""


# llm-d's combined E/P/D role values, by the P/D role they include.
_COMBINED_ROLES = {
    "prefill-decode": Role.BOTH,
    "encode-prefill": Role.PREFILL,
    "encode-prefill-decode": Role.BOTH,
}


def role_from_labels(labels: Mapping[str, str]) -> Role:
    value = labels.get(ROLE_LABEL, Role.BOTH.value)
    if value in _COMBINED_ROLES:
        return _COMBINED_ROLES[value]
    try:
        return Role(value)
    except ValueError:
        raise EndpointSpecError(
            f"label {ROLE_LABEL}={value!r} is not one of prefill, decode, both, encode, "
            "prefill-decode, encode-prefill, encode-prefill-decode"
        ) from None


def make_endpoint(
    address: str, port: int, labels: Mapping[str, str] | None = None, pod_name: str = ""
) -> Endpoint:
    labels = dict(labels or {})
    return Endpoint(
        address=address,
        port=port,
        labels=labels,
        role=role_from_labels(labels),
        engine_type=labels.get(ENGINE_TYPE_LABEL, DEFAULT_ENGINE_TYPE),
        pod_name=pod_name,
    )


def split_host_port(text: str) -> tuple[str, int]:
    """`ip:port` or `[v6]:port` -> (address, port) (`kvindex.hostport`, raising
    EndpointSpecError)."""
    try:
        return _split_host_port(text)
    except HostPortError as exc:
        raise EndpointSpecError(str(exc)) from None


def parse_static(spec: str) -> list[Endpoint]:
    """`--endpoints ip:port,ip:port,...`"""
    return [make_endpoint(*split_host_port(item)) for item in spec.split(",") if item.strip()]


def _endpoint_from_entry(index: int, entry: Any) -> Endpoint:
    if isinstance(entry, str):
        return make_endpoint(*split_host_port(entry))
    if not isinstance(entry, dict):
        raise EndpointSpecError(f"entry {index}: must be 'ip:port' or a mapping")
    labels = entry.get("labels", {}) or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise EndpointSpecError(f"entry {index}: labels must map strings to strings")
    labels = dict(labels)
    # Shorthands for the two labels the picker reads.
    if isinstance(entry.get("role"), str):
        labels[ROLE_LABEL] = entry["role"]
    if isinstance(entry.get("engine_type"), str):
        labels[ENGINE_TYPE_LABEL] = entry["engine_type"]
    if "address" in entry:
        address, port = entry.get("address"), entry.get("port")
        if not isinstance(address, str) or isinstance(port, bool) or not isinstance(port, int):
            raise EndpointSpecError(f"entry {index}: needs address (string) and port (int)")
        if not 0 < port < 65536:
            raise EndpointSpecError(f"entry {index}: port must be 1..65535")
    elif isinstance(entry.get("endpoint"), str):
        address, port = split_host_port(entry["endpoint"])
    else:
        raise EndpointSpecError(f"entry {index}: needs 'address' and 'port' or 'endpoint'")
    pod_name = entry.get("pod_name", "")
    try:
        return make_endpoint(address, port, labels, pod_name if isinstance(pod_name, str) else "")
    except EndpointSpecError as exc:
        raise EndpointSpecError(f"entry {index}: {exc}") from None


def parse_endpoints_document(text: str) -> list[Endpoint]:
    """An endpoints file: YAML or JSON, a list of entries or `{endpoints: [...]}`. An entry is
    `"ip:port"` or `{address, port, labels?, role?, engine_type?, pod_name?}` (or
    `{endpoint: "ip:port", ...}`)."""
    try:
        doc = yaml.safe_load(text) if text.strip() else []
    except yaml.YAMLError as exc:
        raise EndpointSpecError(f"not valid YAML/JSON: {exc}") from None
    if isinstance(doc, dict):
        doc = doc.get("endpoints")
    if not isinstance(doc, list):
        raise EndpointSpecError("must be a list of endpoints or a mapping with 'endpoints'")
    endpoints = [_endpoint_from_entry(i, entry) for i, entry in enumerate(doc)]
    keys = [e.key for e in endpoints]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise EndpointSpecError(f"duplicate endpoints: {', '.join(duplicates)}")
    return endpoints


class Datastore:
    """Endpoints by key, merged from named sources. Single event loop; sources that run in
    threads hand their updates over with `loop.call_soon_threadsafe`."""

    def __init__(self) -> None:
        self._by_source: dict[str, dict[str, Endpoint]] = {}
        self._by_key: dict[str, Endpoint] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self.version = 0
        self._listeners: list[Callable[[], None]] = []
        self.sources_reported: set[str] = set()

    def endpoints(self) -> Sequence[Endpoint]:
        return self._snapshot

    def get(self, key: str) -> Endpoint | None:
        return self._by_key.get(key)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def replace(self, source: str, endpoints: Iterable[Endpoint]) -> None:
        """Set `source`'s endpoints. Kept keys keep their Endpoint object (and metrics);
        labels, role and engine type are refreshed."""
        fresh: dict[str, Endpoint] = {}
        for endpoint in endpoints:
            existing = self._by_key.get(endpoint.key)
            if existing is not None:
                existing.labels = endpoint.labels
                existing.role = endpoint.role
                existing.engine_type = endpoint.engine_type
                existing.pod_name = endpoint.pod_name
                endpoint = existing
            fresh[endpoint.key] = endpoint
        self._by_source[source] = fresh
        self.sources_reported.add(source)
        merged: dict[str, Endpoint] = {}
        for members in self._by_source.values():
            merged.update(members)
        self._by_key = merged
        self._snapshot = tuple(sorted(merged.values(), key=lambda e: e.key))
        self.version += 1
        for listener in self._listeners:
            listener()


class EndpointsFileSource:
    """Watches an endpoints file by polling its mtime and size (`kvindex.filewatch`, on the
    event loop). An invalid file keeps the last good set; the error is logged and counted
    (`endpoint_source_errors_total{source=file}`)."""

    SOURCE = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        datastore: Datastore,
        metrics: EppMetrics,
        interval_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.datastore = datastore
        self.metrics = metrics
        self.interval_s = interval_s
        self.file = WatchedFile(self.path, self._parse)
        self._logged: str | None = None

    @property
    def last_error(self) -> str | None:
        return self.file.last_error

    @property
    def loads(self) -> int:
        return self.file.loads

    def _parse(self, text: str) -> list[Endpoint]:
        try:
            return parse_endpoints_document(text)
        except EndpointSpecError as exc:
            raise EndpointSpecError(f"{self.path}: {exc}") from None

    def poll(self) -> bool:
        """Reload if the file changed; True when a new set was applied."""
        return self.file.poll(self._loaded, self._failed)

    def _loaded(self, endpoints: list[Endpoint]) -> None:
        self._logged = None
        self.datastore.replace(self.SOURCE, endpoints)
        log.info("endpoints file %s: %d endpoints", self.path, len(endpoints))

    def _failed(self, message: str) -> None:
        if message != self._logged:
            log.error("keeping the last good endpoints: %s", message)
        self._logged = message
        self.metrics.endpoint_source_errors.labels(source=self.SOURCE).inc()

    async def run(self) -> None:
        await poll_every(self.poll, self.interval_s)


def dump_endpoints(endpoints: Iterable[Endpoint]) -> str:
    """The endpoints-file form of `endpoints` (JSON, a valid YAML document too)."""
    return json.dumps(
        [
            {"address": e.address, "port": e.port, "labels": dict(e.labels), "pod_name": e.pod_name}
            for e in endpoints
        ],
        indent=2,
    )
