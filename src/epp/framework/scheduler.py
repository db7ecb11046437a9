"""The framework's `Scheduler`: candidates -> saturation check -> profile handler loop ->
result -> pre-request hooks; and the response hooks that let plugins learn."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from epp.framework import observer as ext
from epp.framework.cycle import CycleState
from epp.framework.observer import SchedulerObserver
from epp.framework.plugin import (
    Lifecycle,
    Plugin,
    PreRequest,
    ProfileHandler,
    ResponseComplete,
    ResponseHeaders,
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

    def plugin(self, name: str) -> Plugin:
        for p in self.plugins:
            if p.name == name:
                return p
        raise KeyError(name)

    async def start(self) -> None:
        for p in self._lifecycle:
            await p.start()

    async def stop(self) -> None:
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
        if request.priority < 0 and self.saturation.all_saturated(candidates, now):
            raise SchedulingError(
                429,
                REJECTED_SATURATED,
                f"all {len(candidates)} candidate endpoints are saturated; "
                f"sheddable request (priority {request.priority}) rejected",
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
        return result

    def on_response_headers(self, request: LLMRequest, served: str | None) -> None:
        for p in self._response_headers:
            try:
                p.on_response_headers(request, served)
            except Exception:
                self._failed(ext.RESPONSE_HEADERS, p)

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        for p in self._response_complete:
            t0 = self._timer() if self._observer else 0.0
            try:
                p.on_response_complete(request, stats)
            except Exception:
                self._failed(ext.RESPONSE_COMPLETE, p)
                continue
            self._timed(ext.RESPONSE_COMPLETE, p, t0)
