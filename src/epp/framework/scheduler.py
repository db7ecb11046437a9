"""The framework's `Scheduler`: candidates -> saturation check -> profile handler loop ->
result -> pre-request hooks; and the response hooks that let plugins learn."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence

from epp.framework import observer as ext
from epp.framework.cycle import CycleState
from epp.framework.eager import bounded
from epp.framework.flowgate import FlowGate
from epp.framework.observer import SchedulerObserver
from epp.framework.plugin import (
    Admitter,
    DataProducer,
    Lifecycle,
    Plugin,
    PreRequest,
    ProfileHandler,
    ResponseComplete,
    ResponseHeaders,
    SaturationDetectorPlugin,
)
from epp.framework.profile import PluginCallStats, SchedulingProfile
from epp.framework.saturation import SaturationDetector
from epp.types import (
    Endpoint,
    LLMRequest,
    ProfileResult,
    ResponseStats,
    SchedulingError,
    SchedulingResult,
)

REJECTED_NO_ENDPOINTS = "rejected-no-endpoints"
REJECTED_SATURATED = "rejected-saturated"
REJECTED_ADMISSION = "rejected-admission"
# llm-d gives its data producers together this long per request (director.go).
DATA_PRODUCER_TIMEOUT_S = 0.4

log = logging.getLogger(__name__)


class FrameworkScheduler:
    """Satisfies `epp.types.Scheduler`. Build it with `epp.framework.build_scheduler`."""

    def __init__(
        self,
        profiles: Mapping[str, SchedulingProfile],
        handler: ProfileHandler,
        plugins: Sequence[Plugin],
        saturation: SaturationDetector,
        *,
        clock: Callable[[], float],
        timer: Callable[[], float],
        observer: SchedulerObserver | None,
        stats: PluginCallStats,
        saturation_plugin: SaturationDetectorPlugin | None = None,
        flow_control: FlowGate | None = None,
    ) -> None:
        self.profiles = dict(profiles)
        self.handler = handler
        self.plugins = list(plugins)
        self.saturation = saturation
        self._profile_names = list(self.profiles)
        self._clock = clock
        self._timer = timer
        self._observer = observer
        self.stats = stats
        self._pre_request = [p for p in self.plugins if isinstance(p, PreRequest)]
        self._response_headers = [p for p in self.plugins if isinstance(p, ResponseHeaders)]
        self._response_complete = [p for p in self.plugins if isinstance(p, ResponseComplete)]
        self._lifecycle = [p for p in self.plugins if isinstance(p, Lifecycle)]
        self._producers = sorted(
            (p for p in self.plugins if isinstance(p, DataProducer)),
            key=lambda p: p.produce_stage,
        )
        self._admitters = [p for p in self.plugins if isinstance(p, Admitter)]
        # The detector `saturationDetector.pluginRef` names replaces the built-in thresholds.
        self.saturation_plugin = saturation_plugin
        # With `flowControl` enabled: requests pass this gate (queued, prioritised, shed)
        # instead of the sheddable-request saturation check.
        self.flow_control = flow_control

    def plugin(self, name: str) -> Plugin:
        for p in self.plugins:
            if p.name == name:
                return p
        raise KeyError(name)

    async def start(self) -> None:
        for p in self._lifecycle:
            await p.start()

    async def stop(self) -> None:
        if self.flow_control is not None:
            await self.flow_control.stop()
        for p in reversed(self._lifecycle):
            try:
                await p.stop()
            except Exception:
                self._failed("Stop", p)

    def _failed(self, point: str, plugin: Plugin) -> None:
        self.stats.error(plugin)
        if self._observer is not None:
            self._observer.plugin_error(point, plugin.type_name, plugin.name)

    def _timed(self, point: str, plugin: Plugin, t0: float) -> None:
        if self._observer is not None:
            self._observer.plugin_duration(point, plugin.type_name, plugin.name, self._timer() - t0)

    async def schedule(
        self, request: LLMRequest, endpoints: Sequence[Endpoint]
    ) -> SchedulingResult:
        now = self._clock()
        candidates = list(endpoints)
        if not candidates:
            raise SchedulingError(503, REJECTED_NO_ENDPOINTS, "no ready endpoints in the pool")
        cycle = CycleState(now)
        if request.subset_hint is not None:
            hint = request.subset_hint
            candidates = [e for e in candidates if cycle.key(e) in hint]
            if not candidates:
                raise SchedulingError(
                    503,
                    REJECTED_NO_ENDPOINTS,
                    f"none of the {len(hint)} endpoints in the subset hint is ready",
                )
        if self.flow_control is not None:
            await self.flow_control.admit(request, candidates)
            now = self._clock()
            cycle = CycleState(now)
        elif request.priority < 0 and self._saturated(candidates, now):
            raise SchedulingError(
                429,
                REJECTED_SATURATED,
                f"all {len(candidates)} candidate endpoints are saturated; "
                f"sheddable request (priority {request.priority}) rejected",
            )
        if self._producers:
            await self._produce(cycle, request, candidates)
        for admitter in self._admitters:
            try:
                reason = admitter.admit(cycle, request, candidates)
            except Exception:
                self._failed(ext.ADMIT_REQUEST, admitter)
                continue
            if reason is not None:
                raise SchedulingError(
                    429, REJECTED_ADMISSION, f"{admitter.type_name} {admitter.name!r}: {reason}"
                )
        results: dict[str, ProfileResult | None] = {}
        handler, obs = self.handler, self._observer
        while True:
            t0 = self._timer() if obs else 0.0
            to_run = handler.pick_profiles(cycle, request, self._profile_names, results)
            self._timed(ext.PROFILE_PICKER, handler, t0)
            to_run = [name for name in to_run if name not in results]
            if not to_run:
                break
            for name in to_run:
                profile = self.profiles.get(name)
                if profile is None:
                    raise SchedulingError(
                        500, "scheduler-error", f"profile handler chose unknown profile {name!r}"
                    )
                results[name] = await profile.run(cycle, request, candidates)
        t0 = self._timer() if obs else 0.0
        result = handler.process_results(cycle, request, results)
        self._timed(ext.PROCESS_RESULTS, handler, t0)
        for p in self._pre_request:
            t0 = self._timer() if obs else 0.0
            try:
                p.pre_request(cycle, request, result)
            except Exception:
                self._failed(ext.PRE_REQUEST, p)
                continue
            self._timed(ext.PRE_REQUEST, p, t0)
        if self.flow_control is not None:
            self.flow_control.started(request)
        return result

    def _saturated(self, candidates: list[Endpoint], now: float) -> bool:
        detector = self.saturation_plugin
        if detector is None:
            return self.saturation.all_saturated(candidates, now)
        return detector.pool_saturation(candidates, now) >= 1.0

    def pool_saturation(self, endpoints: Sequence[Endpoint], now: float) -> float:
        """The pool's saturation as flow control reads it: the configured detector's, else
        the built-in thresholds' mean (llm-d's default utilization-detector)."""
        detector = self.saturation_plugin
        if detector is None:
            return self.saturation.pool_saturation(endpoints, now)
        return detector.pool_saturation(endpoints, now)

    async def _produce(
        self, cycle: CycleState, request: LLMRequest, candidates: list[Endpoint]
    ) -> None:
        """Run the data producers in stage order; failures are counted and skipped (llm-d
        logs them and schedules anyway), all of them together bounded by
        DATA_PRODUCER_TIMEOUT_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DATA_PRODUCER_TIMEOUT_S
        obs = self._observer
        for producer in self._producers:
            t0 = self._timer() if obs else 0.0
            try:
                pending = producer.produce(cycle, request, candidates)
                if inspect.isawaitable(pending):
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise TimeoutError
                    # Not wait_for, which runs it in a new task: a producer that never
                    # suspends (the in-process index) runs to the end without yielding to
                    # other requests, so a burst of requests is scheduled one after the
                    # other, each seeing the picks - and speculative entries - before it.
                    await bounded(pending, remaining)
            except Exception:
                self._failed(ext.PREPARE_DATA, producer)
                log.debug("data producer %s failed", producer.name, exc_info=True)
                continue
            self._timed(ext.PREPARE_DATA, producer, t0)

    def on_response_headers(self, request: LLMRequest, served: str | None) -> None:
        for p in self._response_headers:
            try:
                p.on_response_headers(request, served)
            except Exception:
                self._failed(ext.RESPONSE_HEADERS, p)

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        if self.flow_control is not None:
            self.flow_control.finished(request)
        for p in self._response_complete:
            t0 = self._timer() if self._observer else 0.0
            try:
                p.on_response_complete(request, stats)
            except Exception:
                self._failed(ext.RESPONSE_COMPLETE, p)
                continue
            self._timed(ext.RESPONSE_COMPLETE, p, t0)
