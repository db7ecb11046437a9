"""The live write path over real ZMQ sockets (tcp on 127.0.0.1, ipc in a tmp dir), fed by a
byte-faithful vLLM 0.33 publisher double (tests/kvindex/vllm_publisher.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from ingest_helpers import PROBE_TOKENS, keys_for, metric, probe, wait_for
from vllm_publisher import VllmPublisher

from kvindex.discovery import EngineEntry
from kvindex.index import MemoryIndex
from kvindex.index.locked import LockedIndex
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from kvindex.sync import SyncState
from tests.events import Ev, cleared, encode_batch, frame, removed, stored
from tests.ports import free_port

T = list(range(64))
ENGINE = "127.0.0.1:8000"


class Harness:
    def __init__(self, config: IngestServiceConfig) -> None:
        self.index = LockedIndex(MemoryIndex())
        self.metrics = KvindexMetrics()
        self.service = IngestService(config, self.index, metrics=self.metrics)
        self.bound = self.service.open()
        self.service.start()
        self.publishers: list[VllmPublisher] = []

    def publisher(self, endpoint: str | None = None, **kw: object) -> VllmPublisher:
        pub = VllmPublisher(endpoint or self.bound[0], **kw)  # type: ignore[arg-type]
        self.publishers.append(pub)
        return pub

    def blocks(self, tokens: list[int], engine: str = ENGINE, model: str = "m") -> int:
        match = self.index.lookup(keys_for(tokens, model)).get(engine)
        return 0 if match is None else match.blocks

    def m(self, name: str, **labels: str) -> float:
        return metric(self.metrics, name, **labels)

    def close(self) -> None:
        self.service.stop()
        for pub in self.publishers:
            pub.close()


@pytest.fixture
def harness_factory() -> Iterator[type[Harness]]:
    made: list[Harness] = []

    class Made(Harness):
        def __init__(self, config: IngestServiceConfig) -> None:
            super().__init__(config)
            made.append(self)

    yield Made
    for h in made:
        h.close()


def with_replay(harness_factory: type[Harness], **config: Any) -> tuple[Harness, str]:
    """A bind-mode harness whose ENGINE has a replay endpoint (on a free port); returns it."""
    replay = f"tcp://127.0.0.1:{free_port()}"
    h = harness_factory(
        IngestServiceConfig(
            accept_any_engine=True,
            zmq_bind=("tcp://127.0.0.1:*",),
            replay_endpoints={ENGINE: replay},
            **config,
        )
    )
    return h, replay


@pytest.fixture
def bind(harness_factory: type[Harness]) -> Harness:
    return harness_factory(
        IngestServiceConfig(accept_any_engine=True, zmq_bind=("tcp://127.0.0.1:*",))
    )


@pytest.mark.parametrize("encoding", ["map", "array"])
@pytest.mark.parametrize("int_hashes", [True, False])
def test_store_remove_clear_in_bind_mode(bind: Harness, encoding: str, int_hashes: bool) -> None:
    pub = bind.publisher(encoding=encoding)

    def h(i: int) -> int | bytes:
        return i if int_hashes else i.to_bytes(32, "big")

    probe(pub, bind.index, ENGINE, h(0xABCDEF) if not int_hashes else 0xABCDEF)  # type: ignore[arg-type]
    pub.publish(stored([h(1), h(2)], None, T[:32]))
    pub.publish(stored([h(3), h(4)], h(2), T[32:]))
    wait_for(lambda: bind.blocks(T) == 4, what="4 blocks stored")
    pub.publish(removed([h(3)]))
    wait_for(lambda: bind.blocks(T) == 2, what="removal applied")
    pub.publish(cleared())
    wait_for(lambda: ENGINE not in bind.index.engines(), what="engine cleared")
    assert bind.m("kvindex_ingest_events_total", type="AllBlocksCleared") == 1
    assert bind.m("kvindex_ingest_seq_gaps_total") == 0


def test_gap_repaired_by_replay(harness_factory: type[Harness]) -> None:
    replay_port = free_port()
    replay = f"tcp://127.0.0.1:{replay_port}"
    h = harness_factory(
        IngestServiceConfig(
            accept_any_engine=True,
            zmq_bind=("tcp://127.0.0.1:*",),
            replay_endpoints={ENGINE: replay},
        )
    )
    pub = h.publisher(replay_endpoint=f"tcp://127.0.0.1:{replay_port}")
    probe(pub, h.index, ENGINE)
    pub.publish(stored([1, 2], None, T[:32]), drop=True)  # lost on the wire
    pub.publish(stored([3], 2, T[32:48]), drop=True)
    pub.publish(stored([4], 3, T[48:64]))  # arrives: seq gap of 2
    wait_for(lambda: h.blocks(T) == 4, what="gap repaired")
    wait_for(lambda: h.m("kvindex_ingest_replays_total", reason="gap", outcome="succeeded") == 1)
    assert h.m("kvindex_ingest_seq_gaps_total") == 1
    assert h.m("kvindex_ingest_lost_batches_total") == 0
    assert h.m("kvindex_ingest_replayed_batches_total") >= 3
    # Later batches flow normally; the tracker resumed after the replayed ones.
    pub.publish(removed([4]))
    wait_for(lambda: h.blocks(T) == 3, what="removal after replay")
    assert h.m("kvindex_ingest_seq_gaps_total") == 1


@pytest.mark.parametrize("reply_form", ["new", "old"])
def test_replay_reply_forms(harness_factory: type[Harness], reply_form: str) -> None:
    h, replay = with_replay(harness_factory)
    pub = h.publisher(replay_endpoint=replay, reply_form=reply_form)
    probe(pub, h.index, ENGINE)
    pub.publish(stored([1], None, T[:16]), drop=True)
    pub.publish(stored([2], 1, T[16:32]))
    wait_for(lambda: h.blocks(T) == 2, what="replayed")
    # A first contact after seq 0 (the probe's first batches lost to the slow joiner) asks
    # for everything from 0 first; then the gap.
    # The gap replay starts at the newest applied seq (seq - 3), not the first missing one:
    # the engine must answer with that same batch (restart check, docs/ingest.md).
    assert pub.replay_requests[-1] == pub.seq - 3
    assert set(pub.replay_requests[:-1]) <= {0}


def test_replay_unavailable_times_out_counts_loss_and_continues(
    harness_factory: type[Harness],
) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    h = harness_factory(
        IngestServiceConfig(
            accept_any_engine=True,
            zmq_bind=("tcp://127.0.0.1:*",),
            replay_endpoints={ENGINE: dead},
            replay_timeout_s=0.3,
        )
    )
    pub = h.publisher()
    probe(pub, h.index, ENGINE)
    # (the first contact's replay failed too: batches before the probe count as lost)
    lost_before = h.m("kvindex_ingest_lost_batches_total")
    pub.publish(stored([1], None, T[:16]), drop=True)
    pub.publish(stored([2], None, T[:16]), drop=True)
    pub.publish(stored([3], None, T[:16]))  # gap of 2; replay never answers
    wait_for(lambda: h.m("kvindex_ingest_replays_total", reason="gap", outcome="failed") == 1)
    assert h.m("kvindex_ingest_lost_batches_total") - lost_before == 2
    wait_for(lambda: h.blocks(T[:16]) == 1, what="buffered live batch applied")
    # The gap could not be repaired: the engine was rebuilt from the live batch (degraded,
    # still scored: it claims only blocks its events since the loss stored). The ingest
    # thread settles the state just after applying that batch: poll, not a single read.
    wait_for(lambda: h.service.sync.state(ENGINE) is SyncState.DEGRADED, what="degraded")
    assert h.blocks(PROBE_TOKENS) == 0  # cleared: the probe's block is no longer vouched for
    pub.publish(stored([4], 3, T[16:32]))
    wait_for(lambda: h.blocks(T[:32]) == 2, what="service continues")


def test_gap_without_replay_endpoint_counts_loss(bind: Harness) -> None:
    pub = bind.publisher()
    probe(pub, bind.index, ENGINE)
    pub.publish(stored([1], None, T[:16]), drop=True)
    pub.publish(stored([2], None, T[16:32]))
    wait_for(lambda: bind.m("kvindex_ingest_lost_batches_total") == 1)
    assert bind.m("kvindex_ingest_seq_gaps_total") == 1


def test_engine_restart_clears(bind: Harness) -> None:
    pub = bind.publisher()
    probe(pub, bind.index, ENGINE)
    for _ in range(4):
        pub.publish(stored([1, 2], None, T[:32]))
    wait_for(lambda: bind.blocks(T[:32]) == 2)
    pub.restart()
    pub.publish(stored([7], None, T[32:48]))  # seq 0 again: the old blocks are gone
    wait_for(lambda: bind.m("kvindex_ingest_resets_total") == 1)
    wait_for(lambda: bind.blocks(T[32:48]) == 1)
    assert bind.blocks(T[:32]) == 0
    assert bind.index.resolve(ENGINE, 1) is None


def test_unknown_parent_resolved_by_replay(harness_factory: type[Harness]) -> None:
    port = free_port()
    # The replay endpoint is learnt from discovery only after the first contact, so the
    # first-contact replay does not bring the parent: the unknown parent does.
    h = harness_factory(
        IngestServiceConfig(accept_any_engine=True, zmq_bind=("tcp://127.0.0.1:*",))
    )
    pub = h.publisher(replay_endpoint=f"tcp://127.0.0.1:{port}")
    # Published before the indexer listened: only in the engine's replay buffer.
    pub.publish(stored([1, 2], None, T[:32]), drop=True)
    probe(pub, h.index, ENGINE)
    h.service.update_engines(
        {ENGINE: EngineEntry(endpoint=ENGINE, replay=f"tcp://127.0.0.1:{port}")}
    )
    wait_for(lambda: h.service.engine_activity()[0].discovered, what="discovered")
    pub.publish(stored([3], 2, T[32:48]))  # parent 2 unknown here: held, then repaired
    wait_for(lambda: h.blocks(T[:48]) == 3, what="held child applied after replay")
    assert h.m("kvindex_ingest_replays_total", reason="unknown_parent", outcome="requested") == 1
    assert 0 in pub.replay_requests
    assert h.m("kvindex_ingest_resolved_pending_total") >= 1
    wait_for(lambda: h.m("kvindex_ingest_pending_events", engine=ENGINE) == 0)


def test_dp_ranks_map_to_endpoints(bind: Harness) -> None:
    rank0 = bind.publisher(dp_rank=0)
    rank1 = bind.publisher(dp_rank=1)
    probe(rank0, bind.index, "127.0.0.1:8000")
    probe(rank1, bind.index, "127.0.0.1:8001")
    rank0.publish(stored([1], None, T[:16]))
    rank1.publish(stored([1], None, T[16:32]))  # same hash, other rank: other engine
    wait_for(lambda: bind.index.resolve("127.0.0.1:8000", 1) is not None)
    wait_for(lambda: bind.index.resolve("127.0.0.1:8001", 1) is not None)
    assert bind.blocks(T[:16], "127.0.0.1:8000") == 1
    assert bind.blocks(T[:16], "127.0.0.1:8001") == 0
    assert bind.blocks(T[16:32], "127.0.0.1:8001") == 1
    assert bind.m("kvindex_ingest_seq_gaps_total") == 0  # each rank has its own sequence


def test_hybrid_groups_and_partial_blocks_skipped(bind: Harness) -> None:
    pub = bind.publisher()
    probe(pub, bind.index, ENGINE)
    pub.publish(
        stored([1, 2], None, T[:32]),
        stored(
            [11, 12],
            None,
            T[:32],
            group_idx=1,
            kv_cache_spec_kind="sliding_window",
            kv_cache_spec_sliding_window=128,
        ),
        stored([3], 2, T[32:40], block_size=8),  # a partial block after 16-token blocks
    )
    wait_for(lambda: bind.m("kvindex_ingest_skipped_blocks_total", reason="partial_block") == 1)
    assert bind.m("kvindex_ingest_skipped_blocks_total", reason="group_not_indexed") == 2
    assert bind.blocks(T) == 2
    assert bind.index.resolve(ENGINE, 11) is None


def test_reannounced_hits_idempotent(bind: Harness) -> None:
    pub = bind.publisher()
    probe(pub, bind.index, ENGINE)
    pub.publish(stored([1, 2], None, T[:32]))
    wait_for(lambda: bind.blocks(T[:32]) == 2)
    before = bind.index.stats()
    for _ in range(3):  # prefix-cache hits re-announced from block 0, parent None
        pub.publish(stored([1, 2], None, T[:32]))
    wait_for(lambda: bind.m("kvindex_ingest_batches_total") >= 5)
    assert bind.index.stats() == before


def test_garbage_frames_and_payloads_counted(bind: Harness) -> None:
    pub = bind.publisher()
    probe(pub, bind.index, ENGINE)
    topic = pub.topic
    pub.send_raw([topic, b"\x00" * 8])  # two frames
    pub.send_raw([topic, b"\x01\x02\x03", b"x"])  # 3-byte seq
    pub.send_raw(frame(topic, 10**6, b"\xc1garbage"))  # undecodable
    pub.send_raw(frame(b"kv@", 1, b"\x93\x00\x90\xc0"))  # no engine in topic
    pub.publish(Ev("SomethingNew", {"x": 1}), stored([5], None, T[:16]))
    wait_for(lambda: bind.index.resolve(ENGINE, 5) is not None, what="valid batch after garbage")
    assert bind.m("kvindex_ingest_malformed_frames_total", reason="frame_count") == 1
    assert bind.m("kvindex_ingest_malformed_frames_total", reason="bad_seq") == 1
    assert bind.m("kvindex_ingest_malformed_frames_total", reason="bad_topic") == 1
    assert bind.m("kvindex_ingest_decode_errors_total", kind="batch") == 1
    assert bind.m("kvindex_ingest_unknown_events_total") == 1
    assert bind.m("kvindex_ingest_internal_errors_total") == 0
    assert bind.service.readiness() is None


def test_topic_without_port_is_visible(bind: Harness) -> None:
    pub = bind.publisher(topic="kv@10.0.0.9@m")
    probe(pub, bind.index, "10.0.0.9")
    assert bind.m("kvindex_ingest_topic_without_port_total", engine="10.0.0.9") >= 1


def test_connect_mode_tcp_and_ipc(harness_factory: type[Harness], tmp_path: Path) -> None:
    tcp_pub = VllmPublisher(
        "tcp://*:0".replace(":0", f":{free_port()}"), topic="kv@10.0.0.1:8000@m"
    )
    ipc_pub = VllmPublisher(f"ipc://{tmp_path}/engine.sock", topic="kv@10.0.0.2:8000@m")
    tcp_endpoint = tcp_pub.endpoint.replace("0.0.0.0", "127.0.0.1")
    h = harness_factory(
        IngestServiceConfig(accept_any_engine=True, zmq_connect=(tcp_endpoint, ipc_pub.endpoint))
    )
    h.publishers += [tcp_pub, ipc_pub]
    probe(tcp_pub, h.index, "10.0.0.1:8000")
    probe(ipc_pub, h.index, "10.0.0.2:8000")
    tcp_pub.publish(stored([1], None, T[:16]))
    ipc_pub.publish(stored([1], None, T[:16]))
    wait_for(lambda: h.blocks(T[:16], "10.0.0.1:8000") == 1)
    wait_for(lambda: h.blocks(T[:16], "10.0.0.2:8000") == 1)
    assert h.m("kvindex_ingest_sources", mode="connect") == 2


def test_bind_address_in_use_raises_on_open() -> None:
    ctx = zmq.Context.instance()
    holder = ctx.socket(zmq.SUB)
    holder.bind("tcp://127.0.0.1:*")
    taken = holder.getsockopt_string(zmq.LAST_ENDPOINT)
    service = IngestService(
        IngestServiceConfig(accept_any_engine=True, zmq_bind=(taken,)), MemoryIndex()
    )
    try:
        with pytest.raises(zmq.ZMQError) as info:
            service.open()
        assert info.value.errno == zmq.EADDRINUSE
    finally:
        service.stop()
        holder.close(0)


def test_replay_socket_recreated_after_failure(harness_factory: type[Harness]) -> None:
    h, replay = with_replay(harness_factory, replay_timeout_s=0.3)
    pub = h.publisher()  # no replay ROUTER yet
    probe(pub, h.index, ENGINE)
    lost_before = h.m("kvindex_ingest_lost_batches_total")  # a failed first contact's
    pub.publish(stored([1], None, T[:16]), drop=True)
    pub.publish(stored([2], None, T[16:32]))  # parent None: no unknown-parent repair
    wait_for(lambda: h.m("kvindex_ingest_replays_total", reason="gap", outcome="failed") == 1)
    pub.serve_replay(replay)  # the engine's ROUTER comes up
    pub.publish(stored([3], None, T[32:48]), drop=True)
    pub.publish(stored([4], 3, T[48:64]))
    wait_for(lambda: h.m("kvindex_ingest_replays_total", reason="gap", outcome="succeeded") == 1)
    assert h.index.resolve(ENGINE, 3) is not None
    # only the first, unrepaired gap
    assert h.m("kvindex_ingest_lost_batches_total") - lost_before == 1


def test_bind_mode_over_ipc(harness_factory: type[Harness], tmp_path: Path) -> None:
    h = harness_factory(
        IngestServiceConfig(accept_any_engine=True, zmq_bind=(f"ipc://{tmp_path}/kvindex.sock",))
    )
    # vLLM binds ipc endpoints itself, so connect a raw PUB carrying the same wire format.
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(h.bound[0])
    try:
        seq = 0

        def seen() -> bool:
            nonlocal seq
            payload = encode_batch([stored([9], None, T[:16])])
            pub.send_multipart(frame(b"kv@10.0.0.3:8000@m", seq, payload))
            seq += 1
            return h.index.resolve("10.0.0.3:8000", 9) is not None

        wait_for(seen, what="ipc batch indexed")
        assert h.m("kvindex_ingest_sources", mode="bind") == 1
    finally:
        pub.close(0)


def test_restart_detected_when_first_batches_after_it_are_lost(bind: Harness) -> None:
    pub = bind.publisher()
    probe(pub, bind.index, ENGINE)
    for _ in range(10):
        pub.publish(stored([1, 2], None, T[:32]))
    last = pub.seq - 1
    wait_for(lambda: bind.m("kvindex_ingest_last_seq", engine=ENGINE) == last)
    pub.restart()
    for _ in range(last // 2 + 1):  # lost before the reconnection
        pub.publish(stored([5], None, T[32:48]), drop=True)
    first = pub.publish(stored([7], None, T[48:64]))
    assert last // 2 < first < last  # an older seq, not low enough to look like a restart
    wait_for(lambda: bind.m("kvindex_ingest_resets_total") == 1, what="restart detected by ts")
    wait_for(lambda: bind.index.resolve(ENGINE, 7) is not None)
    assert bind.index.resolve(ENGINE, 1) is None  # the old incarnation's blocks are gone
    assert bind.m("kvindex_ingest_duplicate_batches_total") == 0


def test_connect_mode_reconnects_to_restarted_engine(harness_factory: type[Harness]) -> None:
    port = free_port()
    first = VllmPublisher(f"tcp://*:{port}")
    h = harness_factory(
        IngestServiceConfig(accept_any_engine=True, zmq_connect=(f"tcp://127.0.0.1:{port}",))
    )
    h.publishers.append(first)
    probe(first, h.index, ENGINE)
    for _ in range(6):
        first.publish(stored([1, 2], None, T[:32]))
    wait_for(lambda: h.blocks(T[:32]) == 2)
    first.close()  # the engine process goes away ...
    second: list[VllmPublisher] = []

    def rebound() -> bool:  # ... and a new one binds the same port (once the OS freed it)
        try:
            second.append(VllmPublisher(f"tcp://*:{port}"))
        except zmq.ZMQError:
            return False
        return True

    wait_for(rebound, what="port free again")
    h.publishers.append(second[0])
    probe(second[0], h.index, ENGINE, probe_hash=0xBEEF)  # ZMQ reconnected the SUB by itself
    wait_for(lambda: h.m("kvindex_ingest_resets_total") == 1)
    assert h.index.resolve(ENGINE, 1) is None


def test_first_contact_after_seq_0_replays_from_0(harness_factory: type[Harness]) -> None:
    # The index starts (or subscribes) after the engine published: the first batch it sees
    # has seq > 0, and everything before is asked for from the engine's replay buffer.
    h, replay = with_replay(harness_factory)
    pub = h.publisher(replay_endpoint=replay)
    pub.publish(stored([1, 2], None, T[:32]), drop=True)  # before the index listened
    pub.publish(stored([3], 2, T[32:48]), drop=True)
    probe(pub, h.index, ENGINE)
    wait_for(lambda: h.blocks(T[:48]) == 3, what="blocks from before the first contact")
    assert h.m("kvindex_ingest_replays_total", reason="first_contact", outcome="succeeded") == 1
    assert h.m("kvindex_ingest_lost_batches_total") == 0
    assert 0 in pub.replay_requests


def test_first_contact_beyond_the_replay_buffer_counts_the_loss(
    harness_factory: type[Harness],
) -> None:
    h, replay = with_replay(harness_factory)
    pub = h.publisher(replay_endpoint=replay, buffer_steps=2)
    for i in range(5):  # seq 0-4; the buffer keeps 3 and 4
        pub.publish(stored([100 + i], None, T[:16]), drop=True)
    probe(pub, h.index, ENGINE)
    wait_for(
        lambda: (
            h.m("kvindex_ingest_replays_total", reason="first_contact", outcome="succeeded") == 1
        )
    )
    assert h.m("kvindex_ingest_lost_batches_total") >= 3


def test_a_gap_beyond_the_replay_buffer_rebuilds_the_engine(
    harness_factory: type[Harness],
) -> None:
    # Batches lost on the wire reach past what the engine still buffers: one of them evicted
    # a block. The index cannot know which, so it clears the engine and rebuilds it from the
    # replay (plus live batches) instead of claiming the evicted block for good.
    h, replay = with_replay(harness_factory, seq_confirm_s=0.2)
    pub = h.publisher(replay_endpoint=replay, buffer_steps=2)
    probe(pub, h.index, ENGINE)
    pub.publish(stored([1], None, T[:16]))
    wait_for(lambda: h.blocks(T[:16]) == 1)
    pub.publish(removed([1]), drop=True)  # the eviction, lost and soon out of the buffer
    for i in range(4):
        pub.publish(stored([50 + i], None, T[16 * i : 16 * i + 16]), drop=True)
    pub.publish(stored([60], None, T[32:48]))  # arrives: a gap reaching past the buffer
    wait_for(lambda: h.m("kvindex_ingest_resyncs_total") == 1, what="resync")
    wait_for(lambda: h.index.resolve(ENGINE, 60) is not None)
    assert h.index.resolve(ENGINE, 1) is None  # the evicted block is not claimed
    assert h.m("kvindex_ingest_lost_batches_total") >= 3
