"""The scheduler: weighted scoring, async scorers, failure isolation, candidates, saturation,
hooks and the observer."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from epp.framework import (
    ConfigError,
    CycleState,
    DataProducer,
    DepKey,
    PluginType,
    RecordingObserver,
    ResponseComplete,
    SchedulerDeps,
    Scorer,
    build_scheduler,
    load_config,
)
from epp.framework.eager import Resume
from epp.framework.params import Params
from epp.framework.registry import BuildContext, Registry
from epp.plugins import default_registry, new_registry
from epp.types import (
    Endpoint,
    EngineMetrics,
    LLMRequest,
    ResponseStats,
    Scheduler,
    SchedulingError,
)

NOW = 1000.0


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def endpoint(i: int, *, waiting: int = 0, kv: float = 0.0, age: float = 0.0) -> Endpoint:
    return Endpoint(
        f"10.0.0.{i}",
        8000,
        metrics=EngineMetrics(waiting=waiting, kv_usage=kv, updated_at=NOW - age),
    )


def request(rid: str = "r1", **kw: object) -> LLMRequest:
    return LLMRequest(request_id=rid, path="/v1/completions", model="m", prompt="p", **kw)  # type: ignore[arg-type]


class FixedScorer(Scorer):
    """Scores from a table (endpoint key -> score); async when asked."""

    type_name = "fixed-scorer"

    def __init__(self, name: str, table: dict[str, float], asynchronous: bool) -> None:
        super().__init__(name)
        self.table = table
        self.asynchronous = asynchronous

    def score(self, cycle: CycleState, req: LLMRequest, endpoints: list[Endpoint]) -> object:  # type: ignore[override]
        values = [self.table.get(cycle.key(e), 0.0) for e in endpoints]
        if not self.asynchronous:
            return values

        async def later() -> list[float]:
            await asyncio.sleep(0)
            return values

        return later()


class BrokenScorer(Scorer):
    type_name = "broken-scorer"

    def score(self, cycle: CycleState, req: LLMRequest, endpoints: list[Endpoint]) -> list[float]:
        raise RuntimeError("index unavailable")


class CompletionRecorder(ResponseComplete):
    type_name = "completion-recorder"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.seen: list[tuple[str, int]] = []

    def on_response_complete(self, req: LLMRequest, stats: ResponseStats) -> None:
        self.seen.append((req.request_id, stats.status))


def registry_with_test_plugins() -> Registry:
    registry = new_registry()

    def parse_fixed(p: Params) -> tuple[dict[str, float], bool]:
        table = {k: float(v) for k, v in p.string_map("table").items()}
        return table, p.boolean("async", False)

    def build_fixed(name: str, arg: tuple[dict[str, float], bool], _c: BuildContext) -> Scorer:
        return FixedScorer(name, arg[0], arg[1])

    registry.register(PluginType("fixed-scorer", FixedScorer, parse_fixed, build_fixed))
    registry.register(
        PluginType("broken-scorer", BrokenScorer, lambda p: None, lambda n, _a, _c: BrokenScorer(n))
    )
    registry.register(
        PluginType(
            "completion-recorder",
            CompletionRecorder,
            lambda p: None,
            lambda n, _a, _c: CompletionRecorder(n),
        )
    )
    return registry


def scheduler_from(text: str, **deps: object) -> tuple[Scheduler, object]:
    registry = registry_with_test_plugins()
    config = load_config(text, registry)
    d = SchedulerDeps(clock=FakeClock(), rng=random.Random(7), **deps)  # type: ignore[arg-type]
    s = build_scheduler(config, d)
    return s, s


WEIGHTED = """\
kind: EndpointPickerConfig
plugins:
- {type: fixed-scorer, name: a, parameters: {table: {"10.0.0.1:8000": 1.0, "10.0.0.2:8000": 0.0}}}
- {type: fixed-scorer, name: b, parameters: {async: true,
   table: {"10.0.0.1:8000": 0.0, "10.0.0.2:8000": 1.0}}}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: a, weight: 1}
  - {pluginRef: b, weight: 3}
  - {pluginRef: max-score-picker}
"""


async def test_profile_score_is_weighted_sum_and_async_scorers_are_awaited() -> None:
    s, _ = scheduler_from(WEIGHTED)
    result = await s.schedule(request(), [endpoint(1), endpoint(2)])
    assert [e.key for e in result.endpoints] == ["10.0.0.2:8000", "10.0.0.1:8000"]
    assert result.profiles["default"].scores == {"10.0.0.1:8000": 1.0, "10.0.0.2:8000": 3.0}


async def test_scores_are_clamped_to_unit_interval() -> None:
    text = WEIGHTED.replace('"10.0.0.1:8000": 1.0,', '"10.0.0.1:8000": 7.0,').replace(
        '"10.0.0.2:8000": 1.0}', '"10.0.0.2:8000": -4.0}'
    )
    s, _ = scheduler_from(text)
    result = await s.schedule(request(), [endpoint(1), endpoint(2)])
    assert result.profiles["default"].scores == {"10.0.0.1:8000": 1.0, "10.0.0.2:8000": 0.0}


async def test_failing_scorer_is_counted_and_skipped() -> None:
    observer = RecordingObserver()
    s, fs = scheduler_from(
        "kind: EndpointPickerConfig\nplugins:\n- {type: broken-scorer}\n- {type: queue-scorer}\n",
        observer=observer,
    )
    result = await s.schedule(request(), [endpoint(1, waiting=3), endpoint(2, waiting=0)])
    assert result.endpoints[0].key == "10.0.0.2:8000"
    assert fs.stats.errors == {"broken-scorer": 1}  # type: ignore[attr-defined]
    assert observer.errors == [("Scorer", "broken-scorer", "broken-scorer")]


async def test_no_endpoints_is_503() -> None:
    s, _ = scheduler_from("kind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n")
    with pytest.raises(SchedulingError) as err:
        await s.schedule(request(), [])
    assert (err.value.status, err.value.reason) == (503, "rejected-no-endpoints")


async def test_subset_hint_restricts_candidates_and_empty_intersection_is_503() -> None:
    s, _ = scheduler_from("kind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n")
    eps = [endpoint(1, waiting=0), endpoint(2, waiting=5)]
    r = request(subset_hint=frozenset({"10.0.0.2:8000"}))
    assert (await s.schedule(r, eps)).endpoints[0].key == "10.0.0.2:8000"
    with pytest.raises(SchedulingError) as err:
        await s.schedule(request(subset_hint=frozenset({"10.9.9.9:8000"})), eps)
    assert err.value.status == 503
    assert "subset hint" in err.value.message


async def test_saturated_pool_sheds_only_sheddable_requests() -> None:
    s, _ = scheduler_from(
        "kind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n"
        "saturationDetector: {queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8}\n"
    )
    saturated = [endpoint(1, waiting=6), endpoint(2, kv=0.9), endpoint(3, age=0.5)]
    with pytest.raises(SchedulingError) as err:
        await s.schedule(request(priority=-1), saturated)
    assert (err.value.status, err.value.reason) == (429, "rejected-saturated")
    # Non-sheddable requests are still placed.
    assert (await s.schedule(request(priority=0), saturated)).endpoints
    # One endpoint with room (at the threshold, fresh) means not saturated.
    roomy = [*saturated, endpoint(4, waiting=5, kv=0.8)]
    assert (await s.schedule(request(priority=-1), roomy)).endpoints


async def test_filters_leaving_nothing_is_503() -> None:
    s, _ = scheduler_from(
        "kind: EndpointPickerConfig\nplugins:\n"
        "- {type: label-selector-filter, parameters: {matchLabels: {tier: gold}}}\n"
    )
    with pytest.raises(SchedulingError) as err:
        await s.schedule(request(), [endpoint(1)])
    assert err.value.status == 503


async def test_observer_gets_plugin_durations_per_extension_point() -> None:
    observer = RecordingObserver()
    s, _ = scheduler_from(
        "kind: EndpointPickerConfig\nplugins:\n- {type: queue-scorer}\n- {type: decode-filter}\n"
        "- {type: prefix-cache-scorer}\n",
        observer=observer,
    )
    await s.schedule(request(), [endpoint(1), endpoint(2)])
    points = {(p, t) for p, t, _n, _s in observer.durations}
    assert {
        ("Filter", "decode-filter"),
        ("Scorer", "queue-scorer"),
        ("Scorer", "prefix-cache-scorer"),
        ("Picker", "max-score-picker"),
        ("ProfilePicker", "single-profile-handler"),
        ("PreRequest", "prefix-cache-scorer"),
    } <= points
    assert all(seconds >= 0 for *_x, seconds in observer.durations)


async def test_response_complete_reaches_plugins() -> None:
    s, fs = scheduler_from(
        "kind: EndpointPickerConfig\nplugins:\n- {type: queue-scorer}\n"
        "- {type: completion-recorder}\n"
    )
    r = request("abc")
    await s.schedule(r, [endpoint(1)])
    s.on_response_headers(r, "10.0.0.1:8000")
    s.on_response_complete(r, ResponseStats(served="10.0.0.1:8000", status=200))
    recorder = fs.plugin("completion-recorder")  # type: ignore[attr-defined]
    assert recorder.seen == [("abc", 200)]


async def test_max_score_ties_are_broken_at_random_but_reproducibly() -> None:
    picks = []
    for _ in range(2):
        s, _ = scheduler_from("kind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n")
        eps = [endpoint(i) for i in range(1, 9)]
        picks.append([(await s.schedule(request(str(i)), eps)).endpoints[0].key for i in range(20)])
    assert picks[0] == picks[1]  # same seed, same picks
    assert len(set(picks[0])) > 1  # all tied: spread across endpoints


def test_framework_scheduler_satisfies_the_protocol() -> None:
    s: Scheduler = build_scheduler(load_config(None, default_registry()))
    assert callable(s.schedule)


def test_a_plugin_declares_its_own_dependency_and_the_builder_supplies_it() -> None:
    # What the precise prefix scorer does with its backend factory, for any plugin type.
    table_key: DepKey[dict[str, float]] = DepKey("fixed-table")

    def build(name: str, _a: None, ctx: BuildContext) -> Scorer:
        table = ctx.deps.get(table_key)
        if table is None:
            raise ConfigError("fixed-from-deps needs its table")
        return FixedScorer(name, table, False)

    registry = new_registry()
    registry.register(PluginType("fixed-from-deps", FixedScorer, lambda p: None, build))
    config = load_config("plugins: [{type: fixed-from-deps}]\n", registry)
    with pytest.raises(ConfigError, match="needs its table"):
        build_scheduler(config, SchedulerDeps())
    other_key_same_name: DepKey[dict[str, float]] = DepKey("fixed-table")
    with pytest.raises(ConfigError, match="needs its table"):
        build_scheduler(config, SchedulerDeps(extras={other_key_same_name: {}}))
    table = {"10.0.0.2:8000": 1.0}
    s = build_scheduler(config, SchedulerDeps(extras={table_key: table}))
    assert s.plugin("fixed-from-deps").table is table  # type: ignore[attr-defined]
    assert repr(table_key) == "DepKey('fixed-table')"


class StuckProducer(DataProducer):
    """A producer whose backend never answers."""

    type_name = "stuck-producer"

    def produce(self, cycle: CycleState, req: LLMRequest, endpoints: list[Endpoint]) -> object:  # type: ignore[override]
        return asyncio.sleep(3600)


async def test_a_producer_that_never_answers_is_cut_off_and_the_request_scheduled() -> None:
    registry = registry_with_test_plugins()
    registry.register(
        PluginType(
            "stuck-producer", StuckProducer, lambda p: None, lambda n, _a, _c: StuckProducer(n)
        )
    )
    text = """\
kind: EndpointPickerConfig
plugins:
- {type: stuck-producer}
- {type: fixed-scorer, parameters: {table: {"10.0.0.1:8000": 1.0}}}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: fixed-scorer
"""
    observer = RecordingObserver()
    s = build_scheduler(
        load_config(text, registry), SchedulerDeps(clock=FakeClock(), observer=observer)
    )
    # Bounded by DATA_PRODUCER_TIMEOUT_S (0.4 s); the deadline here only guards the test.
    result = await asyncio.wait_for(s.schedule(request(), [endpoint(1), endpoint(2)]), 30)
    assert result.endpoints[0].key == "10.0.0.1:8000"
    assert [e[1] for e in observer.errors] == ["stuck-producer"]


class NoWaitProducer(DataProducer):
    """An async producer that never suspends (like the in-process index): it names the
    endpoint the `cycle-scorer` should prefer."""

    type_name = "no-wait-producer"

    def produce(self, cycle: CycleState, req: LLMRequest, endpoints: list[Endpoint]) -> object:  # type: ignore[override]
        async def fill() -> None:
            cycle.write("preferred", "10.0.0.2:8000")

        return fill()


class CycleScorer(Scorer):
    type_name = "cycle-scorer"

    def score(self, cycle: CycleState, req: LLMRequest, endpoints: list[Endpoint]) -> list[float]:
        preferred = cycle.read("preferred", str)
        return [1.0 if cycle.key(e) == preferred else 0.0 for e in endpoints]


def _eager_scheduler(producer: str) -> Scheduler:
    registry = registry_with_test_plugins()
    for cls in (StuckProducer, NoWaitProducer, CycleScorer):
        registry.register(
            PluginType(cls.type_name, cls, lambda p: None, lambda n, _a, _c, cls=cls: cls(n))
        )
    text = f"""\
kind: EndpointPickerConfig
plugins:
- {{type: {producer}}}
- {{type: cycle-scorer}}
- {{type: fixed-scorer, parameters: {{table: {{"10.0.0.1:8000": 0.5}}}}}}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: cycle-scorer
  - pluginRef: fixed-scorer
"""
    return build_scheduler(load_config(text, registry), SchedulerDeps(clock=FakeClock()))


def _first_step_outside_any_task(coro: Any) -> asyncio.Future[tuple[str, Any]]:
    """Step `coro` once from a loop callback, where no task is current (as the picker's
    HTTP/2 edge does from `data_received`): ("done", result) or ("suspended", awaited)."""
    loop = asyncio.get_running_loop()
    out: asyncio.Future[tuple[str, Any]] = loop.create_future()

    def step() -> None:
        assert asyncio.current_task() is None
        try:
            out.set_result(("suspended", coro.send(None)))
        except StopIteration as done:
            out.set_result(("done", done.value))

    loop.call_soon(step)
    return out


async def test_driven_eagerly_a_producer_that_does_not_suspend_completes_in_the_first_step() -> (
    None
):
    """The picker's HTTP/2 edge steps each handler outside any task until it suspends; a
    decision whose producers never wait must complete in that first step, producers run."""
    s = _eager_scheduler("no-wait-producer")
    state, result = await _first_step_outside_any_task(
        s.schedule(request(), [endpoint(1), endpoint(2)])
    )
    assert state == "done"
    assert result.endpoints[0].key == "10.0.0.2:8000"


async def test_driven_eagerly_a_stuck_producer_is_still_cut_off() -> None:
    s = _eager_scheduler("stuck-producer")
    coro = s.schedule(request(), [endpoint(1), endpoint(2)])
    state, pending = await _first_step_outside_any_task(coro)
    assert state == "suspended"  # the edge finishes it in a task
    result = await asyncio.wait_for(asyncio.ensure_future(Resume(coro, pending)), 30)
    assert result.endpoints[0].key == "10.0.0.1:8000"  # the producer was cut off and skipped
