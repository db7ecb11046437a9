"""The plugin extension points of the scheduling framework.

A plugin is one configured instance (`name`, `type_name`) of a registered type. What it does
is decided by which base classes it derives from: a scorer is a `Scorer`, a plugin that learns
from its picks is also a `PreRequest`, one that learns from responses a `ResponseComplete`.
The framework sorts plugins into extension points with `isinstance`, once, at build time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Mapping, Sequence
from typing import ClassVar

from epp.framework.cycle import CycleState
from epp.types import Endpoint, LLMRequest, ProfileResult, ResponseStats, SchedulingResult

Scores = Sequence[float]  # one score in [0, 1] per endpoint, in the order given


class Plugin(ABC):  # noqa: B024 - a marker base; each extension point adds the abstract method
    """One configured plugin instance."""

    type_name: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Filter(Plugin):
    @abstractmethod
    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        """The subset of `endpoints` that may serve `request` (order preserved)."""


class Scorer(Plugin):
    # Scorers run in ascending `stage` order (stable within a stage), so a scorer that reads
    # what another writes into the cycle state (prefix match info) runs after it.
    stage: ClassVar[int] = 0
    # A gating scorer can also narrow the candidates after scoring (see `eligible`).
    gates: ClassVar[bool] = False

    @abstractmethod
    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> Scores | Awaitable[Scores]:
        """One score in [0, 1] per endpoint, aligned with `endpoints` (values outside are
        clamped). May return an awaitable (a remote index); the framework awaits it."""

    def eligible(self, cycle: CycleState, endpoints: list[Endpoint]) -> Sequence[bool] | None:
        """For `gates = True` scorers, called after all scoring: which of `endpoints` (as
        given to `score` in this cycle) the picker may choose from; None for all. An all-False
        mask is ignored."""
        return None


class ScoredEndpoint:
    __slots__ = ("endpoint", "score")

    def __init__(self, endpoint: Endpoint, score: float) -> None:
        self.endpoint = endpoint
        self.score = score


class Picker(Plugin):
    @abstractmethod
    def pick(
        self, cycle: CycleState, request: LLMRequest, scored: list[ScoredEndpoint]
    ) -> list[Endpoint]:
        """The pick first, then fallbacks; never empty when `scored` is not."""


class ProfileHandler(Plugin):
    @abstractmethod
    def pick_profiles(
        self,
        cycle: CycleState,
        request: LLMRequest,
        profiles: Sequence[str],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        """Which profiles to run next, given those run so far (`None`: ran, picked nothing).
        An empty list ends the cycle."""

    @abstractmethod
    def process_results(
        self,
        cycle: CycleState,
        request: LLMRequest,
        results: Mapping[str, ProfileResult | None],
    ) -> SchedulingResult:
        """The decision from the profile results; raise SchedulingError when there is none."""


class PreRequest(Plugin):
    """Told about every decision before the request is sent (learn from own picks)."""

    @abstractmethod
    def pre_request(
        self, cycle: CycleState, request: LLMRequest, result: SchedulingResult
    ) -> None: ...


class ResponseHeaders(Plugin):
    @abstractmethod
    def on_response_headers(self, request: LLMRequest, served: str | None) -> None: ...


class ResponseComplete(Plugin):
    # What `on_response_complete` reads of the response. "end": the status, the served
    # endpoint and the end time (in-flight counters); no response body needed, so Envoy can
    # be told not to send bodies (docs/epp-server.md, "Response processing"). "body": also
    # the first body byte's time and the token usage (latency models). Unknown plugins are
    # assumed to need the body.
    response_data: ClassVar[str] = "body"

    @abstractmethod
    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None: ...


class DataProducer(Plugin):
    """Runs once per request before the profiles (llm-d's DataProducer / PrepareData): fills
    the cycle state (or the request) with data that filters, scorers and admitters of this
    request read, e.g. prefix matches, in-flight load, latency predictions, token ids.
    Producers run in ascending `produce_stage` (stable within a stage); one that raises or
    overruns its time is counted and skipped, the request is still scheduled (as llm-d)."""

    # 0: the request itself (tokens); 1: per-endpoint facts (prefix, load); 2: facts
    # derived from those (latency predictions read prefix matches).
    produce_stage: ClassVar[int] = 0

    @abstractmethod
    def produce(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> Awaitable[None] | None: ...


class Admitter(Plugin):
    """Decides, after the producers and before the profiles, whether to serve the request at
    all (llm-d's Admitter): None admits, a string is the reason for turning it away."""

    @abstractmethod
    def admit(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[Endpoint]
    ) -> str | None: ...


class SaturationDetectorPlugin(Plugin):
    """A configured saturation detector (llm-d's `utilization-detector`,
    `concurrency-detector`): the pool's saturation over the candidates, where 1.0 or more
    means full. When a config defines one, the scheduler's sheddable-request check uses it
    instead of the built-in thresholds."""

    @abstractmethod
    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float: ...


class Lifecycle(Plugin):
    """Plugins owning background resources (a remote index connection, a model file)."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...
