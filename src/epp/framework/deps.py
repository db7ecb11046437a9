"""The injectable dependencies of a scheduler: time, randomness, the observer, and the
factory for the precise prefix scorer's index backend. Tests pass fakes for time and a
seeded `random.Random`; the server passes its Prometheus observer and the kvindex backend."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epp.framework.observer import SchedulerObserver

if TYPE_CHECKING:
    from epp.plugins.precise_prefix import PrecisePrefixParams, PrefixIndexBackend


@dataclass
class SchedulerDeps:
    # Monotonic seconds; compared with EngineMetrics.updated_at (time.monotonic()).
    clock: Callable[[], float] = time.monotonic
    # High-resolution timer for plugin durations.
    timer: Callable[[], float] = time.perf_counter
    rng: random.Random = field(default_factory=random.Random)
    observer: SchedulerObserver | None = None
    # Builds the precise-prefix-cache-scorer's backend from its parsed parameters; without
    # one, configuring that scorer fails at build time with a message saying so.
    prefix_backend_factory: Callable[[PrecisePrefixParams], PrefixIndexBackend] | None = None
