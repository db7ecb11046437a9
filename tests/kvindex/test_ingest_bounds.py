"""Ingest state stays bounded whatever reaches the event port, over real ZMQ: a flood of
invented topics (each one frame) keeps at most max_engines engines, their metric series and
the /metrics exposition bounded, and a real engine that starts afterwards is indexed; topics
longer than the limit are dropped before anything keeps them; discovered engines are never
given up to make room."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq
from ingest_helpers import keys_for, metric, probe, wait_for
from prometheus_client import generate_latest
from vllm_publisher import VllmPublisher

from kvindex.discovery import EngineEntry
from kvindex.engines import DEFAULT_MAX_ENGINES, MAX_ENGINES_LIMIT
from kvindex.errors import EngineLimitError
from kvindex.index import MemoryIndex, Store, StoredBlock, Tier
from kvindex.index.locked import LockedIndex
from kvindex.ingest_service import IngestService, IngestServiceConfig
from kvindex.metrics import KvindexMetrics
from tests.events import encode_batch, frame, stored
from tests.ports import free_port

T = list(range(64))
PAYLOAD = encode_batch([stored([1], None, list(range(16)))])


def from_address(endpoint: str, ip: str) -> str:
    """``endpoint`` connected from the local address ``ip`` (ZMQ's source-address syntax):
    engines on several loopback addresses of one machine."""
    return f"tcp://{ip}:0;{endpoint.removeprefix('tcp://')}"


class Ingest:
    def __init__(self, **config: object) -> None:
        self.index = LockedIndex(MemoryIndex())
        self.metrics = KvindexMetrics()
        self.service = IngestService(
            IngestServiceConfig(
                zmq_bind=("tcp://127.0.0.1:*",), **{"accept_any_engine": True, **config}
            ),  # type: ignore[arg-type]
            self.index,
            metrics=self.metrics,
        )
        self.endpoint = self.service.open()[0]
        self.service.start()
        self.context = zmq.Context()
        self.flooder = self.context.socket(zmq.PUB)
        self.flooder.setsockopt(zmq.SNDHWM, 0)
        self.flooder.connect(self.endpoint)

    def flood(self, topics: list[bytes], payload: bytes = PAYLOAD) -> None:
        """Send one frame per topic, in rounds the ingest keeps up with (no frame dropped by
        a full queue: each round is waited for through the frames it counts)."""
        for start in range(0, len(topics), 500):
            before = self.seen()
            round_ = topics[start : start + 500]
            for topic in round_:
                self.flooder.send_multipart(frame(topic, 0, payload))
            wait_for(lambda n=len(round_), b=before: self.seen() >= b + n, timeout=30)

    def seen(self) -> float:
        return (
            metric(self.metrics, "kvindex_ingest_batches_total")
            + metric(self.metrics, "kvindex_ingest_refused_batches_total", reason="engine_limit")
            + metric(self.metrics, "kvindex_ingest_refused_batches_total", reason="topic_too_long")
            + metric(self.metrics, "kvindex_ingest_refused_batches_total", reason="unknown_engine")
        )

    def close(self) -> None:
        self.service.stop()
        self.flooder.close(linger=0)
        self.context.term()


@pytest.fixture
def ingest() -> Iterator[type[Ingest]]:
    made: list[Ingest] = []

    class Made(Ingest):
        def __init__(self, **config: object) -> None:
            super().__init__(**config)
            made.append(self)

    yield Made
    for i in made:
        i.close()


def test_topic_flood_stays_bounded_and_a_real_engine_is_indexed_after(
    ingest: type[Ingest],
) -> None:
    ing = ingest(max_engines=200)
    # Wait out the slow joiner with one invented engine.
    deadline = time.monotonic() + 10
    while metric(ing.metrics, "kvindex_ingest_batches_total") == 0:
        assert time.monotonic() < deadline
        ing.flooder.send_multipart(frame(b"kv@10.66.255.255:8000@m", 0, PAYLOAD))
        time.sleep(0.01)
    topics = [f"kv@10.66.{i >> 8}.{i & 255}:8000@m".encode() for i in range(5000)]
    ing.flood(topics)
    activity = ing.service.engine_activity()
    assert len(activity) <= 200
    assert len(ing.index.engines()) <= 200
    assert metric(ing.metrics, "kvindex_ingest_engines_evicted_total") >= 4800
    exposition = generate_latest(ing.metrics.registry)
    assert exposition.count(b"10.66.") <= 10 * 200  # a few series per tracked engine at most

    # A real engine that starts after the flood is indexed.
    pub = VllmPublisher(ing.endpoint, topic="kv@127.0.0.1:8000@m")
    try:
        probe(pub, ing.index, "127.0.0.1:8000")
        pub.publish(stored([11, 12], None, T[:32]))
        wait_for(lambda: "127.0.0.1:8000" in ing.index.lookup(keys_for(T[:32])))
    finally:
        pub.close()


def test_huge_topics_are_dropped_unparsed(ingest: type[Ingest]) -> None:
    ing = ingest()
    deadline = time.monotonic() + 10
    huge = b"kv@10.0.0.1:8000@" + b"m" * (5 << 20)
    while metric(ing.metrics, "kvindex_ingest_refused_batches_total", reason="topic_too_long") == 0:
        assert time.monotonic() < deadline
        ing.flooder.send_multipart(frame(huge, 0, PAYLOAD))
        time.sleep(0.05)
    ing.flood([huge] * 19)
    assert ing.service.engine_activity() == []
    assert ing.index.engines() == []
    exposition = generate_latest(ing.metrics.registry)
    assert len(exposition) < 200_000
    assert b"mmmmmmmm" not in exposition


def test_discovered_engines_are_never_given_up(ingest: type[Ingest]) -> None:
    ing = ingest(max_engines=4)
    entries = {
        f"10.0.0.{i}:8000": EngineEntry(endpoint=f"10.0.0.{i}:8000", model="m") for i in range(3)
    }
    ing.service.update_engines(entries)
    wait_for(lambda: sum(r.discovered for r in ing.service.engine_activity()) == 3)
    ing.flood([b"kv@10.0.0.0:8000@m", b"kv@10.0.0.1:8000@m", b"kv@10.0.0.2:8000@m"])
    # One slot left for undiscovered engines: they take turns in it.
    ing.flood([f"kv@10.66.0.{i}:8000@m".encode() for i in range(50)])
    engines = {r.engine for r in ing.service.engine_activity()}
    assert set(entries) <= engines and len(engines) == 4
    assert metric(ing.metrics, "kvindex_ingest_engines_evicted_total") == 49
    # Discovery filling every slot: a new undiscovered engine is refused and counted.
    ing.service.update_engines(
        {**entries, "10.0.0.3:8000": EngineEntry(endpoint="10.0.0.3:8000", model="m")}
    )
    wait_for(lambda: sum(r.discovered for r in ing.service.engine_activity()) == 4)
    ing.flood([b"kv@10.0.0.3:8000@m"])
    ing.flood([b"kv@10.77.0.1:8000@m"])
    assert metric(ing.metrics, "kvindex_ingest_refused_batches_total", reason="engine_limit") == 1
    assert "10.77.0.1:8000" not in {r.engine for r in ing.service.engine_activity()}


def test_limits_are_one_fact() -> None:
    from kvindex import _native

    assert MAX_ENGINES_LIMIT == _native.MAX_SLOTS
    assert DEFAULT_MAX_ENGINES <= MAX_ENGINES_LIMIT


def test_the_c_index_names_its_engine_limit() -> None:
    from kvindex.index.native import NativeIndex

    index = NativeIndex()
    block = [StoredBlock(1, (1,))]
    for i in range(MAX_ENGINES_LIMIT):
        index.apply(f"e{i}", [Store(Tier.GPU, block)])
    with pytest.raises(EngineLimitError, match="more than 65536 engines"):
        index.apply("one-more", [Store(Tier.GPU, block)])
    index.purge("e0")  # a slot freed by an engine that left is reused
    index.apply("one-more", [Store(Tier.GPU, block)])


def test_strict_by_default_only_discovered_engines_are_indexed(ingest: type[Ingest]) -> None:
    # The default: on a bind socket, a topic must name an engine discovery knows. Invented
    # topics keep no state at all; a discovered engine is indexed; a port-less topic
    # (kv@<ip>@<model>, older llm-d guides) is the one discovered engine on that IP.
    ing = ingest(accept_any_engine=False)
    ing.service.update_engines(
        {
            "127.0.0.1:8000": EngineEntry(endpoint="127.0.0.1:8000", model="m"),
            "127.0.0.2:8000": EngineEntry(endpoint="127.0.0.2:8000", model="m"),
        }
    )
    wait_for(lambda: len(ing.service.engine_activity()) == 2)
    deadline = time.monotonic() + 10
    while not metric(ing.metrics, "kvindex_ingest_refused_batches_total", reason="unknown_engine"):
        assert time.monotonic() < deadline
        ing.flooder.send_multipart(frame(b"kv@10.66.255.255:8000@m", 0, PAYLOAD))
        time.sleep(0.01)
    ing.flood([f"kv@10.66.{i >> 8}.{i & 255}:8000@m".encode() for i in range(2000)])
    assert {r.engine for r in ing.service.engine_activity()} == {"127.0.0.1:8000", "127.0.0.2:8000"}
    assert ing.index.engines() == []
    assert metric(ing.metrics, "kvindex_ingest_engines_evicted_total") == 0

    pub = VllmPublisher(ing.endpoint, topic="kv@127.0.0.1:8000@m")
    portless = VllmPublisher(from_address(ing.endpoint, "127.0.0.2"), topic="kv@127.0.0.2@m")
    try:
        probe(pub, ing.index, "127.0.0.1:8000")
        probe(portless, ing.index, "127.0.0.2:8000")
        records = {r.engine: r for r in ing.service.engine_activity()}
        assert not records["127.0.0.2:8000"].topic_without_port
        assert "127.0.0.2" not in ing.index.engines()
    finally:
        pub.close()
        portless.close()


@pytest.mark.parametrize("attack", ["poison", "wipe", "freeze"])
def test_forged_batches_for_a_known_engine_are_refused(ingest: type[Ingest], attack: str) -> None:
    # Strict by default: a host that reaches the bind port publishes under a real engine's
    # topic. The batch comes from another address than the engine's, so it is dropped and
    # counted, and the engine's own batches go on being applied.
    ing = ingest(accept_any_engine=False)
    engine = "127.0.0.1:8000"
    ing.service.update_engines({engine: EngineEntry(endpoint=engine, model="m")})
    wait_for(lambda: len(ing.service.engine_activity()) == 1)
    real = VllmPublisher(ing.endpoint, topic=f"kv@{engine}@m")
    forger = ing.context.socket(zmq.PUB)
    forger.connect(from_address(ing.endpoint, "127.0.0.2"))
    try:
        probe(real, ing.index, engine)
        real.publish(stored([11, 12], None, T[:32]))
        wait_for(lambda: ing.index.lookup(keys_for(T[:32])).get(engine) is not None)
        last = real.seq - 1
        forged = {
            # claims a prompt the engine does not hold, with its next seq
            "poison": (last + 1, encode_batch([stored([91, 92, 93, 94], None, T)])),
            # an empty batch with seq 0: would be taken as a restart and clear the engine
            "wipe": (0, encode_batch([])),
            # a jump far ahead: the engine's real batches would then count as duplicates
            "freeze": (2 * (last + 1) + 1000, encode_batch([])),
        }[attack]
        topic = f"kv@{engine}@m".encode()

        def refused() -> float:
            return metric(ing.metrics, "kvindex_ingest_refused_batches_total", reason="wrong_peer")

        deadline = time.monotonic() + 10
        while not refused():
            assert time.monotonic() < deadline
            forger.send_multipart(frame(topic, *forged))
            time.sleep(0.01)
        # Nothing of the forgery is in the index; the engine's blocks are intact.
        assert ing.index.lookup(keys_for(T)).get(engine).blocks == 2  # type: ignore[union-attr]
        # The engine's next batch (the seq the poison tried to take) is applied.
        real.publish(stored([13, 14], 12, T[32:64]))
        wait_for(lambda: (m := ing.index.lookup(keys_for(T)).get(engine)) and m.blocks == 4)
        assert metric(ing.metrics, "kvindex_ingest_duplicate_batches_total") == 0
    finally:
        real.close()
        forger.close(linger=0)


def test_allowed_networks_may_publish_for_discovered_engines(ingest: type[Ingest]) -> None:
    # Engines behind NAT or a relay publish from another address: --zmq-allow-source.
    ing = ingest(accept_any_engine=False, allow_sources=("127.0.0.3/32",))
    engine = "127.0.0.1:8000"
    ing.service.update_engines({engine: EngineEntry(endpoint=engine, model="m")})
    wait_for(lambda: len(ing.service.engine_activity()) == 1)
    relay = VllmPublisher(from_address(ing.endpoint, "127.0.0.3"), topic=f"kv@{engine}@m")
    try:
        probe(relay, ing.index, engine)
    finally:
        relay.close()
    assert metric(ing.metrics, "kvindex_ingest_refused_batches_total", reason="wrong_peer") == 0


@pytest.mark.parametrize("attack", ["wipe", "freeze"])
def test_one_frame_cannot_break_an_active_engines_sequence(
    ingest: type[Ingest], attack: str
) -> None:
    # Even from the engine's own address (here: --accept-any-engine, no peer check), a
    # single frame that breaks the sequence (seq 0 as a restart, a far seq as a jump) is
    # held; the engine's next batch continues its own sequence, so the frame is dropped
    # and counted, and nothing was cleared or frozen.
    ing = ingest(seq_confirm_s=60.0)
    engine = "127.0.0.1:8000"
    real = VllmPublisher(ing.endpoint, topic=f"kv@{engine}@m")
    forger = ing.context.socket(zmq.PUB)
    forger.connect(ing.endpoint)
    try:
        probe(real, ing.index, engine)
        real.publish(stored([11, 12], None, T[:32]))
        wait_for(lambda: ing.index.lookup(keys_for(T[:32])).get(engine) is not None)
        seq = 0 if attack == "wipe" else 10 * (real.seq + 100)
        topic = f"kv@{engine}@m".encode()

        def held() -> bool:
            stream = ing.service._streams.get(engine)
            return stream is not None and stream.held is not None

        deadline = time.monotonic() + 10
        while not held():
            assert time.monotonic() < deadline
            forger.send_multipart(frame(topic, seq, encode_batch([])))
            time.sleep(0.01)
        real.publish(stored([13, 14], 12, T[32:64]))
        wait_for(lambda: (m := ing.index.lookup(keys_for(T)).get(engine)) and m.blocks == 4)
        assert (
            metric(ing.metrics, "kvindex_ingest_refused_batches_total", reason="seq_unconfirmed")
            >= 1
        )
        assert metric(ing.metrics, "kvindex_ingest_resets_total") == 0
        assert metric(ing.metrics, "kvindex_ingest_duplicate_batches_total") == 0
    finally:
        real.close()
        forger.close(linger=0)


def test_a_real_restart_is_believed_on_its_second_batch(ingest: type[Ingest]) -> None:
    ing = ingest(seq_confirm_s=60.0)  # no timeout help: the stream itself confirms
    engine = "127.0.0.1:8000"
    real = VllmPublisher(ing.endpoint, topic=f"kv@{engine}@m")
    try:
        probe(real, ing.index, engine)
        for _ in range(4):
            real.publish(stored([1, 2], None, T[:32]))
        wait_for(lambda: ing.index.lookup(keys_for(T[:32])).get(engine) is not None)
        real.restart()
        real.publish(stored([7], None, T[32:48]))  # seq 0: held
        real.publish(stored([8], 7, T[48:64]))  # seq 1: the restart is confirmed
        wait_for(lambda: metric(ing.metrics, "kvindex_ingest_resets_total") == 1)
        wait_for(lambda: engine not in ing.index.lookup(keys_for(T[:32])))
    finally:
        real.close()


def test_a_flood_of_100k_unknown_topics_costs_nothing_that_stays(ingest: type[Ingest]) -> None:
    # The default (strict): 100,000 distinct invented topics, one frame each, over real ZMQ.
    # None is kept anywhere: no engine, no metric series, no log line per topic; memory and
    # the /metrics exposition stay small; a real engine is indexed afterwards.
    import resource

    ing = ingest(accept_any_engine=False)
    engine = "127.0.0.1:8000"
    ing.service.update_engines({engine: EngineEntry(endpoint=engine, model="m")})
    wait_for(lambda: len(ing.service.engine_activity()) == 1)

    def refused() -> float:
        return metric(ing.metrics, "kvindex_ingest_refused_batches_total", reason="unknown_engine")

    deadline = time.monotonic() + 10
    while not refused():
        assert time.monotonic() < deadline
        ing.flooder.send_multipart(frame(b"kv@10.99.0.1:8000@m", 0, PAYLOAD))
        time.sleep(0.01)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = refused()
    n = 100_000
    for i in range(n):
        topic = f"kv@10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:8000@m".encode()
        ing.flooder.send_multipart(frame(topic, 0, PAYLOAD))
    wait_for(lambda: refused() >= start + n, timeout=120, what="the flood refused")
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kb < 64 * 1024  # frames in flight, not per-topic state
    assert [r.engine for r in ing.service.engine_activity()] == [engine]
    exposition = generate_latest(ing.metrics.registry)
    assert len(exposition) < 100_000
    assert b"10.99." not in exposition
    pub = VllmPublisher(ing.endpoint, topic=f"kv@{engine}@m")
    try:
        probe(pub, ing.index, engine)
    finally:
        pub.close()


def test_a_forged_next_batch_is_caught_when_the_real_one_comes(ingest: type[Ingest]) -> None:
    # Poison from the engine's own address (no peer check can tell): a forged batch takes
    # the engine's next seq and claims blocks. When the engine's real batch with that seq
    # arrives, the two differ: the engine is cleared and rebuilt from its replay buffer, so
    # the forgery does not outlive the engine's next batch.
    port = free_port()
    engine = "127.0.0.1:8000"
    ing = ingest(replay_endpoints={engine: f"tcp://127.0.0.1:{port}"}, seq_confirm_s=60.0)
    real = VllmPublisher(
        ing.endpoint, topic=f"kv@{engine}@m", replay_endpoint=f"tcp://127.0.0.1:{port}"
    )
    forger = ing.context.socket(zmq.PUB)
    forger.connect(ing.endpoint)
    try:
        probe(real, ing.index, engine)
        real.publish(stored([11, 12], None, T[:32]))
        wait_for(lambda: ing.index.lookup(keys_for(T[:32])).get(engine) is not None)
        forged = encode_batch([stored([91, 92, 93, 94], None, list(range(500, 564)))])
        topic = f"kv@{engine}@m".encode()
        poisoned = list(range(500, 564))

        def forged_in() -> bool:
            forger.send_multipart(frame(topic, real.seq, forged))
            return engine in ing.index.lookup(keys_for(poisoned))

        wait_for(forged_in, what="the forged batch applied")
        real.publish(stored([13, 14], 12, T[32:64]))  # the real batch with that seq
        wait_for(lambda: metric(ing.metrics, "kvindex_ingest_seq_conflicts_total") == 1)
        wait_for(lambda: engine not in ing.index.lookup(keys_for(poisoned)), what="forgery gone")
        wait_for(lambda: (m := ing.index.lookup(keys_for(T)).get(engine)) and m.blocks == 4)
    finally:
        real.close()
        forger.close(linger=0)
