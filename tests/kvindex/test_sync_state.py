"""kvindex.sync: the per-engine sync state machine, pure (time is passed in)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex.index import MemoryIndex, Store, StoredBlock, Tier
from kvindex.scoring import Scorer, ScoringConfig, prompt_keys
from kvindex.sync import (
    SCORED_STATES,
    SyncConfig,
    SyncReason,
    SyncState,
    SyncTable,
)

CONFIG = SyncConfig(stale_after_s=30, drop_after_s=300, degraded_for_s=100)
ENGINES = ["a:1", "b:1", "c:1"]

op = st.one_of(
    st.tuples(st.sampled_from(["known", "seen", "replayed", "restarted", "unavailable"])),
    st.tuples(st.sampled_from(["probing", "silent", "dropped", "forget", "tick"])),
    st.tuples(st.just("synced"), st.sampled_from([SyncReason.STREAM_START, SyncReason.REPLAYED])),
    st.tuples(
        st.just("replaying"),
        st.sampled_from([SyncReason.GAP, SyncReason.FIRST_CONTACT, SyncReason.RESTART]),
    ),
    st.tuples(st.just("lost"), st.integers(0, 50)),
)
step = st.tuples(st.sampled_from(ENGINES), op, st.floats(0, 400, allow_nan=False))


def _run(table: SyncTable, engine: str, action: tuple[Any, ...], now: float) -> None:
    name, *args = action
    if name == "tick":
        tick = table.tick(now)
        for dead in tick.drop:
            table.dropped(dead, now)
        for silent in tick.probe:
            table.probing(silent, now)
        return
    if name == "forget":
        table.forget(engine)
        return
    getattr(table, name)(engine, now, *args)


@settings(max_examples=400, deadline=None)
@given(st.lists(step, max_size=60), st.sampled_from(["withhold", "downweight"]))
def test_invariants(steps: list[tuple[str, tuple[Any, ...], float]], policy: str) -> None:
    config = SyncConfig(
        unsynced_scores=policy, stale_after_s=30, drop_after_s=300, degraded_for_s=100
    )
    table = SyncTable(config)
    seen_by_listener: dict[str, SyncState] = {}

    def listener(engine: str, state: SyncState | None) -> None:
        if state is None:
            seen_by_listener.pop(engine, None)
        else:
            seen_by_listener[engine] = state

    table.listener = listener
    now = 0.0
    loss_at: dict[str, float] = {}  # newest loss not followed by a restart or forget
    for engine, action, dt in steps:
        now += dt
        _run(table, engine, action, now)
        if action[0] == "lost":
            loss_at[engine] = now
        elif action[0] in ("restarted", "forget"):
            loss_at.pop(engine, None)
        records = {r.engine: r for r in table.records()}
        # One place for each fact: the scorer's factors, the listener (metric) and the
        # records agree, always.
        factor = config.unsynced_factor
        assert dict(table.factors) == {
            e: factor for e, r in records.items() if r.state not in SCORED_STATES
        }
        assert seen_by_listener == {e: r.state for e, r in records.items()}
        for e, record in records.items():
            # Never synced while a loss is being reported; degraded only while it is.
            if e in loss_at and now < loss_at[e] + config.degraded_for_s:
                assert record.state is not SyncState.SYNCED, (e, record)
            if record.state is SyncState.DEGRADED:
                assert record.degraded_until > record.since
            # A dropped engine is never scored until its stream speaks again.
            if record.dropped:
                assert record.state not in SCORED_STATES or record.reason is not SyncReason.DEAD
    # Defined exits: whatever happened, an engine whose stream is whole again (a replay
    # completed, or a restart) is synced once its reported loss has aged out.
    for engine in ENGINES:
        table.replaying(engine, now, SyncReason.GAP)
        table.replayed(engine, now)
        assert table.state(engine) in SCORED_STATES
        table.tick(now + config.degraded_for_s)
        assert table.state(engine) is SyncState.SYNCED
        table.restarted(engine, now + 1000)
        assert table.state(engine) is SyncState.SYNCED


def test_first_contact_transitions() -> None:
    table = SyncTable(CONFIG)
    table.known("a:1", 0.0)  # discovered, nothing sent yet
    assert table.state("a:1") is SyncState.UNSYNCED
    table.synced("a:1", 1.0, SyncReason.STREAM_START)  # first seq 0: the whole stream
    assert table.state("a:1") is SyncState.SYNCED
    # first seq > 0 with a replay endpoint: replaying, withheld
    table.replaying("b:1", 1.0, SyncReason.FIRST_CONTACT)
    assert table.factors == {"b:1": 0.0}
    table.lost("b:1", 2.0, 5)  # the buffer no longer held batches 0..4
    assert table.state("b:1") is SyncState.REPLAYING  # still replaying
    table.replayed("b:1", 3.0)
    assert table.state("b:1") is SyncState.DEGRADED
    assert table.factors == {}  # degraded is scored (a subset of the truth)
    record = table.get("b:1")
    assert record is not None and record.lost_batches == 5
    # first seq > 0 without replay: degraded at once
    table.lost("c:1", 1.0, 7)
    table.synced("c:1", 1.0, SyncReason.FIRST_CONTACT)
    assert table.state("c:1") is SyncState.DEGRADED
    # the loss ages out
    assert table.tick(100.9).changed == ()
    assert set(table.tick(102.1).changed) == {"b:1", "c:1"}
    assert table.state("c:1") is SyncState.SYNCED


def test_restart_ends_a_loss_and_gap_replays_withhold() -> None:
    table = SyncTable(CONFIG)
    table.synced("a:1", 0.0, SyncReason.STREAM_START)
    table.replaying("a:1", 1.0, SyncReason.GAP)
    assert table.factors == {"a:1": 0.0}
    table.lost("a:1", 1.5, 10)  # the buffer did not cover the gap
    table.replayed("a:1", 2.0)
    assert table.state("a:1") is SyncState.DEGRADED
    table.restarted("a:1", 3.0)  # a new process: its cache starts empty, nothing is missing
    assert table.state("a:1") is SyncState.SYNCED


def test_liveness_probe_silent_dead() -> None:
    table = SyncTable(CONFIG)
    table.synced("a:1", 0.0, SyncReason.STREAM_START)
    assert table.tick(29.0).probe == ()
    tick = table.tick(31.0)
    assert tick.probe == ("a:1",)
    table.probing("a:1", 31.0)
    assert table.tick(32.0).probe == ()  # one probe per stale_after_s
    table.seen("a:1", 31.5)  # the probe answered: alive and idle
    assert table.state("a:1") is SyncState.SYNCED
    table.probing("a:1", 62.0)
    table.silent("a:1", 64.0)  # no answer: withheld
    assert table.factors == {"a:1": 0.0}
    assert table.tick(93.0).probe == ("a:1",)  # still probed, every stale_after_s
    table.probing("a:1", 93.0)
    assert table.tick(200.0).drop == ()
    assert table.tick(332.0).drop == ("a:1",)
    table.dropped("a:1", 332.0)
    assert table.tick(400.0).drop == ()  # dropped once
    record = table.get("a:1")
    assert record is not None and record.reason is SyncReason.DEAD
    # it speaks again: a first contact decides (the ingest service calls synced/replaying)
    table.synced("a:1", 401.0, SyncReason.STREAM_START)
    assert table.state("a:1") is SyncState.SYNCED


def test_silence_ends_with_a_batch() -> None:
    table = SyncTable(CONFIG)
    table.synced("a:1", 0.0, SyncReason.STREAM_START)
    table.silent("a:1", 40.0)
    assert table.state("a:1") is SyncState.UNSYNCED
    table.seen("a:1", 41.0)
    record = table.get("a:1")
    assert record is not None
    assert (record.state, record.reason) == (SyncState.SYNCED, SyncReason.RESUMED)


def test_downweight_factor() -> None:
    table = SyncTable(SyncConfig(unsynced_scores="downweight", unsynced_weight=0.25))
    table.replaying("a:1", 0.0, SyncReason.GAP)
    assert table.factors == {"a:1": 0.25}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"unsynced_scores": "drop"},
        {"unsynced_weight": 2.0},
        {"stale_after_s": 0},
        {"stale_after_s": 10, "drop_after_s": 5},
        {"degraded_for_s": -1},
    ],
)
def test_config_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SyncConfig(**kwargs)


@pytest.mark.parametrize(("factor", "expected"), [(None, 0.5), (0.0, 0.0), (0.5, 0.25)])
def test_scorer_withholds_or_downweights(factor: float | None, expected: float) -> None:
    """The scorer counts an untrusted engine's real matches by its factor (0: withheld)."""
    index = MemoryIndex()
    keys = prompt_keys("m", list(range(64)), block_size=16)
    index.apply("a:1", [Store(Tier.GPU, [StoredBlock(i, (k,)) for i, k in enumerate(keys[:2])])])
    scorer = Scorer(index, ScoringConfig(block_size=16))
    factors = {} if factor is None else {"a:1": factor}
    scorer.engine_factors = lambda: factors
    [score] = scorer.score_keys(keys, ["a:1"])
    assert score.score == pytest.approx(expected)
