"""``kvindex analyze --scheduler picker``: the precise-prefix policy routed by the picker's
real scheduling framework (kvtools.analyze.picker, found through the entry point), against the
analysis' own model of the scorers on hand-made traces with known answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from analyze_helpers import by_policy, write_mooncake

from kvtools.analyze import schedulers
from kvtools.analyze.model import Trace, TraceRequest
from kvtools.analyze.picker import make_scheduler
from kvtools.analyze.policies import EngineView
from kvtools.analyze.readers import mooncake_keys
from kvtools.analyze.schedulers import (
    ENTRY_POINT_GROUP,
    SchedulerUnavailable,
    available_schedulers,
    load_scheduler_factory,
)
from kvtools.analyze.simulation import CostModel, SimSettings, simulate
from kvtools.cli import main

BT = 4
GAP_MS = 100_000.0

QUEUE_ONLY = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
"""


def request(arrival_ms: float, ids: list[int], output: int) -> TraceRequest:
    keys = tuple(mooncake_keys(ids))
    return TraceRequest(arrival_ms, len(ids) * BT, output, keys, tuple(ids), "mooncake")


def trace_of(rows: list[tuple[float, list[int], int]]) -> Trace:
    return Trace("hand-made", "mooncake", BT, requests=[request(t, i, o) for t, i, o in rows])


X = [1, 2]
Y = [11, 12]
ALTERNATING = [[*X, 101], [*Y, 102], [*X, 103], [*Y, 104], [*X, 105], [*Y, 106]]
# One long shared prefix: a first request caches it, then a burst queues up behind one
# running slot per engine. Prefix scoring keeps the burst on the cached engine; a queue-only
# picker spreads it and loses the hits on the other engine.
SHARED = list(range(1, 11))
BURST = [(0.0, [*SHARED, 900], 2)] + [(GAP_MS + i, [*SHARED, 1000 + i], 50) for i in range(12)]


def hits(trace: Trace, scheduler: str, config: str | None = None, **kw: Any) -> int:
    settings = SimSettings(scheduler=scheduler, scheduler_config=config, **kw)
    return simulate(trace, "precise-prefix", settings).hit_blocks


def test_the_picker_is_registered_under_the_entry_point() -> None:
    assert "picker" in available_schedulers()
    assert load_scheduler_factory("picker") is make_scheduler


def test_alternating_families_picker_and_builtin_agree() -> None:
    # Both keep each family on one engine: the first X and Y miss, the rest hit 2 blocks.
    trace = trace_of([(i * GAP_MS, ids, 2) for i, ids in enumerate(ALTERNATING)])
    kw: dict[str, Any] = {"engines": 2, "capacity_blocks": 100}
    assert hits(trace, "picker", **kw) == hits(trace, "builtin", **kw) == 8


def test_queue_only_config_makes_the_real_picker_balance(tmp_path: Path) -> None:
    trace = trace_of(BURST)
    kw: dict[str, Any] = {
        "engines": 2,
        "capacity_blocks": 1000,
        "cost": CostModel(max_running=1),
    }
    builtin = hits(trace, "builtin", **kw)
    picker = hits(trace, "picker", **kw)
    # Default weights: every burst request lands on the engine that cached the prefix.
    assert picker == builtin == 12 * len(SHARED)
    config = tmp_path / "queue-only.yaml"
    config.write_text(QUEUE_ONLY)
    balanced = simulate(
        trace, "precise-prefix", SimSettings(scheduler="picker", scheduler_config=str(config), **kw)
    )
    assert balanced.hit_blocks < picker
    loads = sorted(e.requests for e in balanced.engines)
    assert loads[0] >= 5  # the burst is split across both engines


def test_the_adapter_scores_from_the_prefix_callable() -> None:
    asked: list[tuple[int, ...]] = []

    def prefix_scores(keys: Any, engines: Any) -> list[float]:
        asked.append(tuple(engines))
        return [1.0 if i == 2 else 0.0 for i in engines]

    scheduler = make_scheduler(None, 3, prefix_scores)
    views = [EngineView(f"engine-{i}") for i in range(3)]
    keys = tuple(mooncake_keys([1, 2, 3]))
    assert scheduler.choose(keys, views) == 2
    assert asked == [(0, 1, 2)]
    # Queue 2 + kv 2 on the others < prefix 3 + kv 2 on engine 2, however long its queue.
    views[2].waiting = 10
    assert scheduler.choose(keys, views) == 2
    scheduler.close()


def test_cli_picker_runs_precise_prefix(
    tmp_path: Path, run_analyze: Callable[..., dict[str, Any]]
) -> None:
    rows = [(i * 100_000, 12, 2, ids) for i, ids in enumerate(ALTERNATING)]
    trace = write_mooncake(tmp_path / "t.jsonl", rows)
    common = ["--trace", str(trace), "--engines", "2", "--capacity", "100"]
    common += ["--block-tokens", "4", "--policies", "precise-prefix"]
    picker = by_policy(run_analyze(*common, "--scheduler", "picker")["points"][0])
    builtin = by_policy(run_analyze(*common)["points"][0])
    assert picker["precise-prefix"]["hit_blocks"] == builtin["precise-prefix"]["hit_blocks"] == 8


def test_no_provider_is_a_clear_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_entry_points(group: str) -> list[Any]:
        assert group == ENTRY_POINT_GROUP
        return []

    monkeypatch.setattr(schedulers, "entry_points", no_entry_points)
    with pytest.raises(SchedulerUnavailable, match="--scheduler builtin"):
        load_scheduler_factory("picker")
    trace = write_mooncake(tmp_path / "t.jsonl", [(0, 12, 2, [1, 2, 3])])
    code = main(["analyze", "--trace", str(trace), "--scheduler", "picker", "--quiet"])
    assert code == 2
    err = " ".join(capsys.readouterr().out.split())
    assert "no scheduler 'picker' is registered" in err
    assert "pip install -e ." in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "prefix=1"], "put the weights in the --config file"),
        (["--sweep", "weights=prefix:1,2"], "put the weights in the --config file"),
        # The builtin parser only warns of an unknown plugin; the real loader refuses it.
        (["--config", "BAD"], "unknown plugin type 'no-such-scorer'"),
    ],
)
def test_picker_input_errors_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    trace = write_mooncake(tmp_path / "t.jsonl", [(0, 12, 2, [1, 2, 3])])
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUEUE_ONLY.replace("queue-scorer", "no-such-scorer"))
    args = [a.replace("BAD", str(bad)) for a in extra]
    code = main(["analyze", "--trace", str(trace), "--scheduler", "picker", "--quiet", *args])
    assert code == 2
    assert message in " ".join(capsys.readouterr().out.split())


def test_shipped_conversation_trace_picker_close_to_builtin(
    run_analyze: Callable[..., dict[str, Any]],
) -> None:
    common = ["--trace", "mooncake-conversation", "--limit", "2000"]
    common += ["--policies", "precise-prefix"]
    picker = by_policy(run_analyze(*common, "--scheduler", "picker")["points"][0])
    builtin = by_policy(run_analyze(*common)["points"][0])
    rate = picker["precise-prefix"]["hit_rate_blocks"]
    assert rate > 0.1
    assert abs(rate - builtin["precise-prefix"]["hit_rate_blocks"]) < 0.01
