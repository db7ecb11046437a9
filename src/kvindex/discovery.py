"""Engine discovery: which engines exist, where their ZMQ PUB and replay ROUTER sockets are.

Sources (all behind :class:`EngineDiscovery`): a static list, a watched engines file
(:class:`FileDiscovery`, polled by mtime) and Kubernetes pods
(:mod:`kvindex.discovery_k8s`). :class:`DiscoveryHub` merges the sources and hands the union
to a callback (the ingest service connects to new engines and purges those that left).

The mechanics are shared with the picker (``epp``): ``ip:port`` parsing in
:mod:`kvindex.hostport`, the file watch in :mod:`kvindex.filewatch`, the pod list + watch in
:mod:`kvindex.podwatch`. This module holds only what is particular to engines.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import yaml

from kvindex.errors import KVIndexError
from kvindex.filewatch import PollingThread, WatchedFile
from kvindex.hostport import HostPortError, split_host_port

__all__ = [
    "DiscoveryHub",
    "EngineDiscovery",
    "EngineEntry",
    "EnginesFileError",
    "FileDiscovery",
    "RankSource",
    "StaticDiscovery",
    "offset_endpoint",
    "parse_engines_document",
    "parse_engines_file",
    "parse_engines_text",
]

log = logging.getLogger("kvindex.discovery")

OnChange = Callable[[Mapping[str, "EngineEntry"]], None]
OnError = Callable[[str], None]


class EngineEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One engine (with ``dp_size`` > 1: one engine per DP rank).

    ``endpoint`` is the ``ip:port`` key the picker uses (rank 0); ``zmq`` the PUB endpoint to
    connect to (connect mode; None in bind mode), ``replay`` its ROUTER endpoint."""

    endpoint: str
    zmq: str | None = None
    replay: str | None = None
    model: str | None = None
    dp_size: int = 1


@dataclass(frozen=True, slots=True)
class RankSource:
    """One DP rank of an engine entry: its endpoint key and its sockets."""

    endpoint: str
    zmq: str | None
    replay: str | None
    model: str | None
    rank: int


def offset_endpoint(url: str, rank: int) -> str:
    """The socket of DP rank ``rank`` as vLLM derives it: tcp port + rank, otherwise a
    ``_dp<rank>`` suffix (rank 0 unchanged)."""
    if rank == 0:
        return url
    if url.startswith("tcp://"):
        host, _, port = url[6:].rpartition(":")
        if port.isdigit():
            return f"tcp://{host}:{int(port) + rank}"
    return f"{url}_dp{rank}"


def offset_host_port(endpoint: str, offset: int) -> str:
    host, _, port = endpoint.rpartition(":")
    if not offset or not port.isdigit():
        return endpoint
    return f"{host}:{int(port) + offset}"


def rank_sources(entry: EngineEntry, dp_port_stride: int = 1) -> list[RankSource]:
    return [
        RankSource(
            endpoint=offset_host_port(entry.endpoint, rank * dp_port_stride),
            zmq=None if entry.zmq is None else offset_endpoint(entry.zmq, rank),
            replay=None if entry.replay is None else offset_endpoint(entry.replay, rank),
            model=entry.model,
            rank=rank,
        )
        for rank in range(max(1, entry.dp_size))
    ]


class EnginesFileError(KVIndexError, ValueError):
    """An engines file that cannot be used (the message names the file and the entry)."""


def _check_entry(entry: EngineEntry, where: str) -> None:
    try:
        split_host_port(entry.endpoint)
    except HostPortError as exc:
        raise EnginesFileError(f"{where}: {exc}") from None
    if entry.dp_size < 1:
        raise EnginesFileError(f"{where}: dp_size must be >= 1")
    for name, url in (("zmq", entry.zmq), ("replay", entry.replay)):
        if url is not None and "://" not in url:
            raise EnginesFileError(f"{where}: {name} {url!r} is not a ZMQ endpoint (tcp://...)")


def parse_engines_document(data: Any, origin: str = "<engines>") -> list[EngineEntry]:
    """Entries from a decoded document: a list of entries or ``{"engines": [...]}``."""
    if isinstance(data, dict) and "engines" in data:
        data = data["engines"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise EnginesFileError(f"{origin}: expected a list of engines or {{engines: [...]}}")
    entries: list[EngineEntry] = []
    for i, raw in enumerate(data):
        where = f"{origin}: engines[{i}]"
        try:
            entry = msgspec.convert(raw, EngineEntry)
        except msgspec.ValidationError as exc:
            raise EnginesFileError(f"{where}: {exc}") from exc
        _check_entry(entry, where)
        entries.append(entry)
    return entries


def parse_engines_text(text: str, path: str | Path) -> list[EngineEntry]:
    """The entries of an engines file's text (JSON when ``path`` ends in ``.json``, else
    YAML); errors name ``path``."""
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise EnginesFileError(f"{path}: {exc}") from exc
    return parse_engines_document(data, str(path))


def parse_engines_file(path: str | Path) -> list[EngineEntry]:
    return parse_engines_text(Path(path).read_text(), path)


class EngineDiscovery(Protocol):
    name: str

    def start(self, on_change: OnChange, on_error: OnError) -> None:
        """Begin reporting: ``on_change`` gets the full current set (endpoint -> entry) each
        time it changes; ``on_error`` a message when the source failed (the last good set
        stays in force). Callbacks may come from another thread."""
        ...

    def stop(self) -> None: ...


def _by_endpoint(entries: Sequence[EngineEntry]) -> dict[str, EngineEntry]:
    return {entry.endpoint: entry for entry in entries}


class StaticDiscovery:
    """A fixed set of engines (from flags or the config file)."""

    name = "static"

    def __init__(self, entries: Sequence[EngineEntry]) -> None:
        self._entries = _by_endpoint(entries)

    def start(self, on_change: OnChange, on_error: OnError) -> None:
        on_change(dict(self._entries))

    def stop(self) -> None:
        pass


class FileDiscovery:
    """An engines file (YAML or JSON), re-read when its mtime or size changes
    (:class:`~kvindex.filewatch.WatchedFile` on a :class:`~kvindex.filewatch.PollingThread`).
    An invalid or missing file is logged and counted; the last good set stays."""

    name = "file"

    def __init__(self, path: str | Path, interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.file = WatchedFile(self.path, lambda text: parse_engines_text(text, self.path))
        self._thread: PollingThread | None = None

    def load_now(self) -> list[EngineEntry]:
        """Parse the file once (startup validation); raises EnginesFileError / OSError."""
        return parse_engines_file(self.path)

    def start(self, on_change: OnChange, on_error: OnError) -> None:
        def loaded(entries: list[EngineEntry]) -> None:
            on_change(_by_endpoint(entries))

        def failed(message: str) -> None:
            log.warning("event=engines_file_invalid error=%r (keeping the last good set)", message)
            on_error(message)

        self.file.reset()
        self._thread = PollingThread(
            "kvindex-engines-file", lambda: self.file.poll(loaded, failed), self.interval_s
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop(timeout=5)


class DiscoveryHub:
    """Merges several discovery sources into one set and reports changes to ``on_change``
    (sources named later win when two list the same endpoint)."""

    def __init__(
        self,
        sources: Sequence[EngineDiscovery],
        on_change: OnChange,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self._sources = list(sources)
        self._on_change = on_change
        self._on_error = on_error
        self._sets: dict[int, dict[str, EngineEntry]] = {}
        self._lock = threading.Lock()
        self._started = False

    def _changed(self, i: int, entries: Mapping[str, EngineEntry]) -> None:
        with self._lock:
            self._sets[i] = dict(entries)
            merged: dict[str, EngineEntry] = {}
            for j in sorted(self._sets):
                merged.update(self._sets[j])
        self._on_change(merged)

    def start(self) -> None:
        self._started = True
        for i, source in enumerate(self._sources):

            def changed(entries: Mapping[str, EngineEntry], i: int = i) -> None:
                self._changed(i, entries)

            def failed(message: str, name: str = source.name) -> None:
                if self._on_error is not None:
                    self._on_error(name, message)

            source.start(changed, failed)

    def stop(self) -> None:
        for source in self._sources:
            source.stop()

    def __bool__(self) -> bool:
        return bool(self._sources)
