"""The injectable dependencies of a scheduler: time, randomness, the observer, and whatever
a plugin needs beyond those (`extras`, by a `DepKey` the plugin declares). Tests pass fakes
for time and a seeded `random.Random`; the server passes its Prometheus observer and, under
`epp.plugins.precise_prefix.PREFIX_BACKEND_FACTORY`, the kvindex backend."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from epp.framework.observer import SchedulerObserver

T = TypeVar("T")


class DepKey(Generic[T]):
    """Names one plugin-specific dependency in `SchedulerDeps.extras`. The plugin that needs
    it declares the key (and so the value's type); whoever builds the scheduler supplies the
    value. Keys compare by identity: two keys with the same name are different keys."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"DepKey({self.name!r})"


@dataclass
class SchedulerDeps:
    # Monotonic seconds; compared with EngineMetrics.updated_at (time.monotonic()).
    clock: Callable[[], float] = time.monotonic
    # High-resolution timer for plugin durations.
    timer: Callable[[], float] = time.perf_counter
    rng: random.Random = field(default_factory=random.Random)
    observer: SchedulerObserver | None = None
    # Plugin-specific dependencies, by the key their plugin declares; a builder whose key is
    # missing fails at build time with a message saying so.
    extras: Mapping[DepKey[Any], object] = field(default_factory=dict)

    def get(self, key: DepKey[T]) -> T | None:
        """The dependency supplied under `key`, or None."""
        return cast("T | None", self.extras.get(key))
