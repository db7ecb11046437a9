"""Fault suite with a ground-truth oracle (issue 18): simulated vLLM engines (kvtools.sim: real
block pools with LRU eviction, vLLM 0.33 events, replay buffers) publish over ZMQ on
loopback into an IngestService. After each fault (index restart, engine restart, a restart
whose new sequence overtakes the old one, a gap beyond the replay buffer, a dropped last
batch, a dead engine, static or discovered), within a bounded time, for every prompt the
index's prefix for the engine equals what the engine's pool holds, or the engine is reported
not in sync and its scores are withheld; degraded (a loss reported) claims never more than
the pool holds. Never a wrong score while the engine is reported in sync."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator

import pytest

from kvindex.discovery import EngineEntry
from kvindex.index import MemoryIndex
from kvindex.index.locked import LockedIndex
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from kvindex.scoring import Scorer, ScoringConfig, prompt_keys
from kvindex.sync import SCORED_STATES, SyncConfig, SyncReason, SyncState
from kvtools.sim.engine import EngineConfig, EngineCore, EngineRequest, KVCacheReportMode
from kvtools.sim.publisher import EventPublisher
from kvtools.sim.timing import TimingModel
from tests.metrics import sample
from tests.polling import wait_until

MODEL = "sim-model"
BS = 16
_ports = itertools.count(8101)


def prompts(seed: int, n: int, aligned: bool = False) -> list[list[int]]:
    """``n`` prompts of 2-5 blocks, pairs sharing a first block; not block-aligned unless
    asked (a block-aligned prompt's last block is recomputed: docs/index.md "Duplicates")."""
    out = []
    for i in range(n):
        shared = [seed * 1000 + (i // 2) * 7 + t for t in range(BS)]
        rest = [seed * 100_000 + i * 97 + t for t in range(BS * (1 + i % 4))]
        tail = [] if aligned else [5, 6, 7, 8, 9]
        out.append(shared + rest + tail)
    return out


class Sim:
    """One simulated engine: its pool is the truth."""

    def __init__(self, buffer_steps: int = 10_000, num_blocks: int = 40) -> None:
        self.key = f"127.0.0.1:{next(_ports)}"
        self.pub = EventPublisher(
            "tcp://127.0.0.1:*",
            "tcp://127.0.0.1:*",
            topic=f"kv@{self.key}@{MODEL}",
            buffer_steps=buffer_steps,
        )
        self.core = EngineCore(
            EngineConfig(
                model=MODEL,
                block_size=BS,
                num_gpu_blocks=num_blocks,
                timing=TimingModel(time_scale=0.0),
            ),
            self.pub,
        )
        self.loop = asyncio.new_event_loop()

    def run(
        self,
        batch: list[list[int]],
        max_tokens: int = 3,
        report_mode: KVCacheReportMode | None = None,
    ) -> None:
        """Serve ``batch``; ``report_mode`` "full" asks vLLM (vllm_xargs) to re-announce the
        prompt's cached blocks too, as a request of the engine's default "incremental" does
        not."""

        async def go() -> None:
            for tokens in batch:
                request = EngineRequest(
                    self.core.new_request_id(),
                    tokens,
                    max_tokens,
                    kv_cache_report_mode=report_mode,
                )
                async for _ in self.core.generate(request):
                    pass

        self.loop.run_until_complete(go())
        assert self.pub.flush()

    def truth(self, tokens: list[int]) -> int:
        """Leading blocks of the prompt the engine's pool holds."""
        request = EngineRequest("oracle", tokens, 1)
        digests = self.core.block_digests(tokens, self.core.extras_for(request))
        return sum(1 for _ in itertools.takewhile(self.core.pool.is_cached, digests))

    def restart(self) -> None:
        self.pub.restart()
        self.core.restart()

    def close(self) -> None:
        self.pub.close()
        self.loop.close()


class Harness:
    def __init__(self, sims: list[Sim], discovered: bool = False, copy_ttl_s: float = 1.0):
        self.index = LockedIndex(MemoryIndex())
        self.metrics = KvindexMetrics()
        static = () if discovered else tuple(s.pub.bound_endpoint for s in sims)
        replay = {} if discovered else {s.key: s.pub.bound_replay_endpoint or "" for s in sims}
        self.service = IngestService(
            IngestServiceConfig(
                zmq_connect=static,
                replay_endpoints=replay,
                replay_timeout_s=0.5,
                seq_confirm_s=0.2,
                sync=SyncConfig(stale_after_s=1.0, drop_after_s=3.0, degraded_for_s=60.0),
                copy_ttl_s=copy_ttl_s,
            ),
            self.index,
            metrics=self.metrics,
        )
        self.scorer = Scorer(self.index, ScoringConfig(block_size=BS))
        sync = self.service.sync
        self.scorer.engine_factors = lambda: sync.factors
        if discovered:
            self.service.expect_discovery()
        self.service.open()
        self.service.start()

    def discover(self, sims: list[Sim]) -> None:
        self.service.update_engines(
            {
                s.key: EngineEntry(
                    endpoint=s.key, zmq=s.pub.bound_endpoint, replay=s.pub.bound_replay_endpoint
                )
                for s in sims
            }
        )

    def blocks(self, engine: str, tokens: list[int]) -> int:
        match = self.index.lookup(prompt_keys(MODEL, tokens, block_size=BS), [engine]).get(engine)
        return 0 if match is None else match.blocks

    def state(self, engine: str) -> SyncState | None:
        return self.service.sync.state(engine)

    def scored(self, engine: str) -> float:
        """The engine's best score over the prompts' first block (0 when withheld)."""
        tokens = list(range(BS))
        result = self.scorer.score_keys(prompt_keys(MODEL, tokens, block_size=BS), [engine])
        return result[0].score

    def m(self, name: str, **labels: str) -> float:
        return sample(self.metrics, name, **labels)

    def close(self) -> None:
        self.service.stop()


def poke_until(sim: Sim, batch: list[list[int]], seen: Callable[[], bool]) -> None:
    """Run ``batch`` until ``seen()``: a connecting subscriber misses the first batches (ZMQ's
    slow joiner), so the engine keeps serving until the index has heard from it."""

    def poke() -> bool:
        sim.run(batch, report_mode="full")  # re-announced even when already cached
        return seen()

    wait_until(poke, what="the index hears from the engine")


def true_or_withheld(h: Harness, sim: Sim, batch: list[list[int]]) -> bool:
    """The oracle: the index equals the pool for every prompt, or the engine is withheld.
    Degraded: never more than the pool holds."""
    state = h.state(sim.key)
    if state not in SCORED_STATES:
        return True
    pairs = [(h.blocks(sim.key, p), sim.truth(p)) for p in batch]
    if state is SyncState.DEGRADED:
        return all(ours <= truth for ours, truth in pairs)
    return all(ours == truth for ours, truth in pairs)


def converge(h: Harness, sim: Sim, batch: list[list[int]], state: SyncState) -> None:
    """Within a bounded time: the given state, and the index equals the truth."""

    def ok() -> bool:
        return h.state(sim.key) is state and true_or_withheld(h, sim, batch)

    try:
        wait_until(ok, timeout=10.0, what=f"{sim.key} {state.value} and equal to its pool")
    except AssertionError:
        pairs = [(h.blocks(sim.key, p), sim.truth(p)) for p in batch]
        raise AssertionError(f"{h.service.sync.get(sim.key)} {pairs}") from None
    pairs = [(h.blocks(sim.key, p), sim.truth(p)) for p in batch]
    assert any(truth for _, truth in pairs)  # the oracle compared something held


@pytest.fixture
def sims() -> Iterator[list[Sim]]:
    made: list[Sim] = []
    yield made
    for sim in made:
        sim.close()


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for h in made:
        h.close()


def test_index_restart_replays_from_0(sims: list[Sim], harnesses: list[Harness]) -> None:
    sim = Sim()
    sims.append(sim)
    first = prompts(1, 8)
    sim.run(first)  # nobody listens yet
    h = Harness([sim])
    harnesses.append(h)
    later = prompts(2, 2)
    # The first batch seen has seq > 0: replay from 0 (batches are published until the
    # subscriber is connected: a slow joiner sees none of them).
    poke_until(sim, later[:1], lambda: h.state(sim.key) not in (None, SyncState.UNSYNCED))
    converge(h, sim, first + later, SyncState.SYNCED)
    h.close()
    harnesses.remove(h)
    # The index restarts (a new process: empty index): the same again.
    h2 = Harness([sim])
    harnesses.append(h2)
    poke_until(sim, later[1:], lambda: h2.state(sim.key) not in (None, SyncState.UNSYNCED))
    converge(h2, sim, first + later, SyncState.SYNCED)
    assert h2.m("kvindex_ingest_replays_total", reason="first_contact", outcome="succeeded") >= 1


def _started(sim: Sim, h: Harness, batch: list[list[int]]) -> None:
    poke_until(sim, batch[:1], lambda: h.state(sim.key) not in (None, SyncState.UNSYNCED))
    sim.run(batch)
    converge(h, sim, batch, SyncState.SYNCED)


def test_engine_restart(sims: list[Sim], harnesses: list[Harness]) -> None:
    sim = Sim()
    sims.append(sim)
    h = Harness([sim])
    harnesses.append(h)
    before = prompts(3, 8)
    _started(sim, h, before)
    sim.restart()  # the engine process restarts: empty pool, seq from 0
    after = prompts(4, 4)
    poke_until(sim, after[:1], lambda: h.m("kvindex_ingest_resets_total") >= 1)
    sim.run(after)
    converge(h, sim, before + after, SyncState.SYNCED)
    assert all(h.blocks(sim.key, p) == 0 for p in before)


def test_engine_restart_overtaking_the_old_sequence(
    sims: list[Sim], harnesses: list[Harness]
) -> None:
    sim = Sim()
    sims.append(sim)
    h = Harness([sim])
    harnesses.append(h)
    before = prompts(5, 6)
    _started(sim, h, before)
    old_seq = sim.pub.next_seq
    sim.restart()
    # The new process publishes more batches than the old one did before the index sees any
    # of them (they reach only its replay buffer): its first seen seq is past the old last.
    sim.pub.drop_fraction = 1.0
    after = prompts(6, 12)
    while sim.pub.next_seq <= old_seq + 1:
        sim.run(after)
    sim.pub.drop_fraction = 0.0
    sim.run(after[:1])
    converge(h, sim, before + after, SyncState.SYNCED)
    assert all(h.blocks(sim.key, p) == 0 for p in before)  # the old process's blocks: gone
    assert h.m("kvindex_ingest_resets_total") >= 1  # told apart from a gap


def test_gap_beyond_the_replay_buffer(sims: list[Sim], harnesses: list[Harness]) -> None:
    sim = Sim(buffer_steps=3)
    sims.append(sim)
    h = Harness([sim])
    harnesses.append(h)
    first = prompts(7, 6)
    _started(sim, h, first)
    sim.pub.drop_fraction = 1.0  # a long gap: evictions and stores the index never sees
    lost = prompts(8, 10)
    sim.run(lost)
    sim.pub.drop_fraction = 0.0
    sim.run(lost[:1])
    # Rebuilt from what the buffer held plus the live stream: degraded, a subset of the pool.
    converge(h, sim, first + lost, SyncState.DEGRADED)
    assert h.m("kvindex_ingest_resyncs_total") >= 1
    summary = h.service.sync_summary()
    assert sim.key in summary["not_synced"]  # type: ignore[operator]
    # Requests that ask for full reports re-announce their cached blocks from block 0: the
    # index then equals the pool again.
    sim.run(first + lost, report_mode="full")
    wait_until(
        lambda: all(h.blocks(sim.key, p) == sim.truth(p) for p in first + lost),
        what="re-learned",
    )


def test_dropped_last_batch_found_by_the_liveness_probe(
    sims: list[Sim], harnesses: list[Harness]
) -> None:
    sim = Sim()
    sims.append(sim)
    h = Harness([sim])
    harnesses.append(h)
    batch = prompts(9, 6)
    _started(sim, h, batch)
    sim.pub.drop_fraction = 1.0
    last = prompts(10, 1)
    sim.run(last)  # its batch is lost on the wire, and the engine goes idle
    sim.pub.drop_fraction = 0.0
    # Silent for stale_after_s: a replay from the newest applied seq brings the lost batch.
    converge(h, sim, batch + last, SyncState.SYNCED)
    assert h.blocks(sim.key, last[0]) == sim.truth(last[0]) > 0
    assert h.m("kvindex_ingest_replays_total", reason="probe", outcome="succeeded") >= 1
    assert h.m("kvindex_ingest_resets_total") == 0


@pytest.mark.parametrize("discovered", [False, True])
def test_dead_engine_withheld_then_dropped(
    sims: list[Sim], harnesses: list[Harness], discovered: bool
) -> None:
    sim = Sim()
    sims.append(sim)
    h = Harness([sim], discovered=discovered)
    harnesses.append(h)
    if discovered:
        h.discover([sim])
    batch = [[*range(BS), 1, 2, 3], *prompts(11, 4)]
    _started(sim, h, batch)
    assert h.scored(sim.key) > 0
    sim.close()  # killed: no events, no replay answers
    sims.remove(sim)
    wait_until(lambda: h.state(sim.key) is SyncState.UNSYNCED, what="withheld")
    assert h.scored(sim.key) == 0.0  # its entries are withheld from scores
    assert h.service.sync_summary()["counts"]["unsynced"] == 1  # type: ignore[index]
    wait_until(lambda: sim.key not in h.index.engines(), what="entries dropped")
    if discovered:
        record = h.service.sync.get(sim.key)
        assert record is not None and record.reason is SyncReason.DEAD
        h.service.update_engines({})  # discovery removes it: forgotten
        wait_until(lambda: h.state(sim.key) is None, what="purged")
    else:
        assert h.state(sim.key) is None  # a static engine no discovery names: forgotten


def test_block_aligned_prompt_two_copies(sims: list[Sim], harnesses: list[Harness]) -> None:
    """A block-aligned prompt run twice: vLLM recomputes its last block, so the pool holds two
    physical copies under one hash; evicting one leaves the block cached, and the index too."""
    sim = Sim(num_blocks=24)
    sims.append(sim)
    h = Harness([sim], copy_ttl_s=600.0)  # no copy aging during the test
    harnesses.append(h)
    _started(sim, h, prompts(13, 2))
    aligned = prompts(12, 1, aligned=True)[0]
    sim.run([aligned, aligned])  # the second run recomputes the last block: a second copy
    request = EngineRequest("oracle", aligned, 1)
    last = sim.core.block_digests(aligned, sim.core.extras_for(request))[-1]
    copies = sim.core.pool._cached  # the pool's digest -> physical blocks (a test reads it)
    assert len(copies[last]) == 2
    filler = itertools.count(500_000)
    while len(copies.get(last, {})) == 2:  # one request caching one block evicts one block
        sim.run([[next(filler) for _ in range(BS + 5)]])
    assert len(copies.get(last, {})) == 1  # the older copy went first
    assert sim.truth(aligned) == len(aligned) // BS
    wait_until(
        lambda: (
            h.m("kvindex_ingest_removed_blocks_total") >= 1
            and h.blocks(sim.key, aligned) == sim.truth(aligned)
        ),
        what="the block still held after one copy's BlockRemoved",
    )
    assert h.state(sim.key) is SyncState.SYNCED
