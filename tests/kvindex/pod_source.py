"""A PodEventSource for the discovery tests: it stands in for the Kubernetes API (none can run
in this sandbox)."""

from __future__ import annotations

import queue
from collections.abc import Iterator

from kvindex.podwatch import PodInfo


class FakePodSource:
    """`list()` returns `pods` (resourceVersion `list<n>`), then a watch yields whatever the
    test puts on `events` (None ends one watch, an exception raises out of it);
    `watched_from` records the resourceVersion each watch started from."""

    def __init__(self, pods: list[PodInfo]) -> None:
        self.pods = pods
        self.events: queue.Queue[tuple[str, PodInfo] | Exception | None] = queue.Queue()
        self.lists = 0
        self.watched_from: list[str] = []

    def list(self) -> tuple[list[PodInfo], str]:
        self.lists += 1
        return list(self.pods), f"list{self.lists}"

    def watch(self, resource_version: str) -> Iterator[tuple[str, PodInfo]]:
        self.watched_from.append(resource_version)
        while True:
            item = self.events.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self.events.put(None)
