"""Property over real sockets: whatever batches the wire drops (within the engine's replay
buffer), the index ends in the state of applying every batch in order.

Streams are vLLM-realistic: a store's parent is a block the engine currently caches (or None),
removals name cached blocks, clears empty the cache."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_helpers import metric, probe, wait_for
from vllm_publisher import VllmPublisher

from kvindex.index import MemoryIndex
from kvindex.index.locked import LockedIndex
from kvindex.ingest import EventApplier
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from kvindex.wire import decode_batch
from tests.events import Ev, cleared, encode_batch, removed, stored
from tests.ports import free_port

ENGINE = "127.0.0.1:8000"
SENTINEL = 0xC0FFEE


@dataclass
class Step:
    kind: str  # store, remove, clear
    n: int  # blocks to store / remove
    pick: int  # which cached block to extend / remove from
    drop: bool


steps = st.lists(
    st.builds(
        Step,
        st.sampled_from(["store", "store", "store", "remove", "clear"]),
        st.integers(1, 3),
        st.integers(0, 1000),
        st.booleans(),
    ),
    min_size=1,
    max_size=12,
)


def simulate(plan: list[Step]) -> list[tuple[list[Ev], bool]]:
    """Turn a plan into batches an engine could emit."""
    cached: list[int] = []
    next_hash = 1
    out: list[tuple[list[Ev], bool]] = []
    for step in plan:
        if step.kind == "store":
            parent = cached[step.pick % len(cached)] if cached and step.pick % 3 else None
            hashes = list(range(next_hash, next_hash + step.n))
            next_hash += step.n
            tokens = [(h * 16 + i) % 50_000 for h in hashes for i in range(16)]
            cached += hashes
            out.append(([stored(hashes, parent, tokens)], step.drop))
        elif step.kind == "remove" and cached:
            victims = cached[step.pick % len(cached) :][: step.n]
            cached = [h for h in cached if h not in victims]
            out.append(([removed(victims)], step.drop))
        elif step.kind == "clear":
            cached = []
            out.append(([cleared()], step.drop))
    return out


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_any_drop_pattern_is_repaired(plan: list[Step]) -> None:
    batches = simulate(plan)
    port = free_port()
    index = LockedIndex(MemoryIndex())
    metrics = KvindexMetrics()
    service = IngestService(
        IngestServiceConfig(
            accept_any_engine=True,
            zmq_bind=("tcp://127.0.0.1:*",),
            replay_endpoints={ENGINE: f"tcp://127.0.0.1:{port}"},
        ),
        index,
        metrics=metrics,
    )
    bound = service.open()
    service.start()
    pub = VllmPublisher(bound[0], replay_endpoint=f"tcp://127.0.0.1:{port}")
    try:
        probe(pub, index, ENGINE)
        reference = MemoryIndex()
        applier = EventApplier(reference)
        applier.apply_batch(
            ENGINE,
            decode_batch(
                encode_batch([stored([0xFFFF_FFFF_FFFF_FF00], None, list(range(1000, 1016)))])
            ),
            "m",
        )
        for events, drop in batches:
            pub.publish(*events, drop=drop)
            applier.apply_batch(ENGINE, decode_batch(encode_batch(events)), "m")
        sentinel = [stored([SENTINEL], None, list(range(2000, 2016)))]
        pub.publish(*sentinel)
        applier.apply_batch(ENGINE, decode_batch(encode_batch(sentinel)), "m")

        def settled() -> bool:
            requested = sum(
                metric(metrics, "kvindex_ingest_replays_total", reason=r, outcome="requested")
                for r in ("gap", "unknown_parent")
            )
            done = sum(
                metric(metrics, "kvindex_ingest_replays_total", reason=r, outcome=o)
                for r in ("gap", "unknown_parent")
                for o in ("succeeded", "failed")
            )
            return index.resolve(ENGINE, SENTINEL) is not None and requested == done

        wait_for(settled, what="sentinel applied and replays done")
        assert metric(metrics, "kvindex_ingest_lost_batches_total") == 0
        universe = range(1, 40)
        assert {h: index.resolve(ENGINE, h) for h in universe} == {
            h: reference.resolve(ENGINE, h) for h in universe
        }
        assert index.stats() == reference.stats()
        assert metric(metrics, "kvindex_ingest_seq_gaps_total") <= sum(d for _, d in batches)
    finally:
        service.stop()
        pub.close()
