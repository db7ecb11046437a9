"""The analysis' prefix policies are the picker's own scheduling framework
(kvtools.analyze.picker) with the config of kvtools.analyze.config, on hand-made traces with
known answers."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from analyze_helpers import by_policy, write_mooncake

from kvtools.analyze.config import PickerSetup
from kvtools.analyze.model import Trace, TraceRequest
from kvtools.analyze.picker import PickerScheduler
from kvtools.analyze.policies import EngineView
from kvtools.analyze.readers import mooncake_keys
from kvtools.analyze.simulation import CostModel, SimSettings, simulate
from kvtools.cli import main

BT = 16
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


def hits(trace: Trace, picker: PickerSetup | None = None, **kw: Any) -> int:
    settings = SimSettings(picker=picker or PickerSetup(), **kw)
    return simulate(trace, "precise-prefix", settings).hit_blocks


def test_alternating_families_follow_their_prefix() -> None:
    # Each family stays on one engine: the first X and Y miss, the rest hit 2 blocks.
    trace = trace_of([(i * GAP_MS, ids, 2) for i, ids in enumerate(ALTERNATING)])
    kw: dict[str, Any] = {"engines": 2, "capacity_blocks": 100}
    assert hits(trace, **kw) == 8
    result = simulate(trace, "approximate-prefix", SimSettings(**kw))
    assert result.hit_blocks == 8


def test_queue_only_config_makes_the_real_picker_balance(tmp_path: Path) -> None:
    trace = trace_of(BURST)
    kw: dict[str, Any] = {
        "engines": 2,
        "capacity_blocks": 1000,
        "cost": CostModel(max_running=1),
    }
    picker = hits(trace, **kw)
    # Default weights: every burst request lands on the engine that cached the prefix.
    assert picker == 12 * len(SHARED)
    config = tmp_path / "queue-only.yaml"
    config.write_text(QUEUE_ONLY)
    balanced = simulate(
        trace, "precise-prefix", SimSettings(picker=PickerSetup.from_file(config), **kw)
    )
    assert balanced.hit_blocks < picker
    loads = sorted(e.requests for e in balanced.engines)
    assert loads[0] >= 5  # the burst is split across both engines


def test_the_scheduler_scores_from_the_prefix_callable() -> None:
    asked: list[tuple[int, ...]] = []

    def prefix_scores(keys: Any, engines: Any) -> list[float]:
        asked.append(tuple(engines))
        return [1.0 if i == 2 else 0.0 for i in engines]

    config = PickerSetup().load("precise")
    scheduler = PickerScheduler(config, 3, BT, random.Random(0), prefix_scores)
    views = [EngineView(f"engine-{i}") for i in range(3)]
    keys = tuple(mooncake_keys([1, 2, 3]))
    assert scheduler.choose(0, keys, views) == 2
    assert asked == [(0, 1, 2)]
    # Queue 2 + kv 2 on the others < prefix 3 + kv 2 on engine 2, however long its queue.
    views[2].waiting = 10
    assert scheduler.choose(1, keys, views) == 2
    scheduler.finished(0, 2)
    scheduler.finished(1, 2)
    scheduler.close()


def test_cli_runs_both_prefix_policies_through_the_picker(
    tmp_path: Path, run_analyze: Callable[..., dict[str, Any]]
) -> None:
    rows = [(i * 100_000, 3 * BT, 2, ids) for i, ids in enumerate(ALTERNATING)]
    trace = write_mooncake(tmp_path / "t.jsonl", rows)
    common = ["--trace", str(trace), "--engines", "2", "--capacity", "100"]
    common += ["--block-tokens", str(BT), "--policies", "approximate-prefix,precise-prefix"]
    # --scheduler picker is accepted (the only scheduler) and changes nothing.
    for extra in ([], ["--scheduler", "picker"]):
        point = run_analyze(*common, *extra)["points"][0]
        results = by_policy(point)
        assert results["precise-prefix"]["hit_blocks"] == 8
        assert results["approximate-prefix"]["hit_blocks"] == 8
        assert point["settings"]["weights"]["prefix"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "bogus=1"], "unknown scorer weight 'bogus'"),
        (["--sweep", "weights=bogus:1,2"], "unknown scorer weight 'bogus'"),
        (["--scheduler", "builtin"], "invalid choice: 'builtin'"),
        # The picker's own loader refuses an unknown plugin.
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
    try:
        code = main(["analyze", "--trace", str(trace), "--quiet", *args])
    except SystemExit as e:  # argparse's own refusal
        code = int(e.code or 0)
    assert code == 2
    captured = capsys.readouterr()
    assert message in " ".join((captured.out + captured.err).split())


def test_shipped_conversation_trace_precise_beats_round_robin(
    run_analyze: Callable[..., dict[str, Any]],
) -> None:
    common = ["--trace", "mooncake-conversation", "--limit", "2000"]
    common += ["--policies", "round-robin,approximate-prefix,precise-prefix"]
    results = by_policy(run_analyze(*common)["points"][0])
    precise = results["precise-prefix"]["hit_rate_blocks"]
    assert precise > 0.1
    assert precise > results["round-robin"]["hit_rate_blocks"]
    assert precise >= results["approximate-prefix"]["hit_rate_blocks"] - 0.01
