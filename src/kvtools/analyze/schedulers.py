"""The plugin point through which another package (the picker, ``epp``) lends the analysis
its real scheduler: kvindex never imports it, it looks the provider up by name in the
``kvtools.analyze.schedulers`` entry-point group.

A provider is a :class:`SchedulerFactory`; the scheduler it builds chooses an engine per
request from the engines' views and the analysis index's prefix fractions, which it asks
for through ``prefix_scores``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

from kvindex.keys import ContentKey

if TYPE_CHECKING:
    from kvtools.analyze.policies import EngineView

__all__ = [
    "BUILTIN_SCHEDULER",
    "ENTRY_POINT_GROUP",
    "ExternalScheduler",
    "PrefixScores",
    "SchedulerFactory",
    "SchedulerUnavailable",
    "available_schedulers",
    "load_scheduler_factory",
]

ENTRY_POINT_GROUP = "kvtools.analyze.schedulers"
BUILTIN_SCHEDULER = "builtin"  # the analysis' own model of the scorers (policies.py)

PrefixScores = Callable[[Sequence[ContentKey], Sequence[int]], Sequence[float]]
"""``(request keys, engine indices) -> matched / total blocks`` per listed engine, from the
analysis index (fed by the simulated engines' events)."""


class ExternalScheduler(Protocol):
    def choose(self, keys: Sequence[ContentKey], engines: Sequence[EngineView]) -> int:
        """Index into ``engines`` of the engine that serves the request with ``keys``."""
        ...


class SchedulerFactory(Protocol):
    def __call__(
        self, config_path: str | None, n_engines: int, prefix_scores: PrefixScores
    ) -> ExternalScheduler:
        """``config_path``: an EndpointPickerConfig YAML (None: the provider's defaults)."""
        ...


class SchedulerUnavailable(LookupError):
    """No provider is registered under the name (or it failed to load)."""


def available_schedulers() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_scheduler_factory(name: str) -> SchedulerFactory:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        others = available_schedulers()
        listed = ", ".join(others) if others else "none"
        raise SchedulerUnavailable(
            f"no scheduler {name!r} is registered in entry-point group {ENTRY_POINT_GROUP!r} "
            f"(registered: {listed}); install the package that provides it (for 'picker': "
            f"`pip install -e .` in this repository, which registers kvtools.analyze.picker), "
            f"or use --scheduler {BUILTIN_SCHEDULER}"
        )
    try:
        factory = found[0].load()
    except Exception as e:  # an installed but broken provider: say which and why
        raise SchedulerUnavailable(
            f"scheduler {name!r} ({found[0].value}) failed to load: {e}"
        ) from e
    if not callable(factory):
        raise SchedulerUnavailable(f"scheduler {name!r} ({found[0].value}) is not callable")
    return factory  # type: ignore[no-any-return]
