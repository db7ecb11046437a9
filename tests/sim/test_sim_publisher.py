"""EventPublisher over real ZMQ sockets: live frames, replay (both forms), faults, DP ports."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from simzmq import Subscriber, replay_request

from kvtools.sim.events import AllBlocksCleared, BlockRemoved
from kvtools.sim.publisher import EventPublisher, offset_endpoint_port, should_bind

Make = Callable[..., Subscriber]


@pytest.fixture
def publishers() -> Iterator[Callable[..., EventPublisher]]:
    made: list[EventPublisher] = []

    def make(*args: object, **kwargs: object) -> EventPublisher:
        pub = EventPublisher(*args, **kwargs)  # type: ignore[arg-type]
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.close()


def warm_up(pub: EventPublisher, sub: Subscriber) -> int:
    """Publish probe batches until the subscription is live; returns the next seq."""
    counter = itertools.count()

    def probe() -> None:
        pub.publish([BlockRemoved([next(counter)], "GPU")])
        pub.flush()

    sub.poll_until(lambda got: len(got) > 0, tick=probe)
    pub.flush()
    sub.poll_until(lambda got: got[-1].seq == pub.next_seq - 1)
    return pub.next_seq


def test_should_bind_rule_and_dp_offsets() -> None:
    assert should_bind("tcp://*:5557") and should_bind("tcp://[::]:5557")
    assert should_bind("ipc:///tmp/x") and should_bind("inproc://kv")
    assert not should_bind("tcp://10.0.0.1:5557")
    assert offset_endpoint_port("tcp://*:5557", 2) == "tcp://*:5559"
    assert offset_endpoint_port("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint_port("inproc://kv", 1) == "inproc://kv_dp1"
    with pytest.raises(ValueError, match="tcp"):
        offset_endpoint_port("ipc:///tmp/x", 1)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_live_frames_and_replay(
    transport: str, tmp_path: Path, subscribers: Make, publishers: Callable[..., EventPublisher]
) -> None:
    if transport == "tcp":
        endpoint, replay = "tcp://127.0.0.1:*", "tcp://127.0.0.1:*"
    else:
        endpoint, replay = f"ipc://{tmp_path}/pub.sock", f"ipc://{tmp_path}/replay.sock"
    pub = publishers(endpoint, replay, "kv@127.0.0.1:8000@m", data_parallel_rank=2)
    sub = subscribers(pub.bound_endpoint)
    start = warm_up(pub, sub)
    pub.publish([AllBlocksCleared()], ts=42.0)
    got = sub.poll_until(lambda got: got[-1].seq == start)
    last = got[-1]
    assert last.topic == b"kv@127.0.0.1:8000@m"
    assert msgspec.msgpack.decode(last.payload) == [42.0, [{"type": "AllBlocksCleared"}], 2]
    # Live seqs are contiguous.
    seqs = [f.seq for f in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    frames = replay_request(pub.bound_replay_endpoint or "", 0)
    assert [f.seq for f in frames] == list(range(start + 1))  # from 0, per process
    assert all(f.topic == b"kv@127.0.0.1:8000@m" for f in frames)
    assert frames[-1].payload == last.payload
    assert [f.seq for f in replay_request(pub.bound_replay_endpoint or "", start)] == [start]
    assert replay_request(pub.bound_replay_endpoint or "", start + 10) == []


def test_legacy_replay_form_and_buffer_steps(publishers: Callable[..., EventPublisher]) -> None:
    pub = publishers(
        "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "t", legacy_replay=True, buffer_steps=3
    )
    for i in range(5):
        pub.publish([BlockRemoved([i], "GPU")])
    assert pub.flush()
    frames = replay_request(pub.bound_replay_endpoint or "", 0, legacy=True)
    assert [f.seq for f in frames] == [2, 3, 4]  # only the last buffer_steps batches
    assert all(f.topic is None for f in frames)


def test_pub_connects_to_a_bound_subscriber(
    subscribers: Make, publishers: Callable[..., EventPublisher]
) -> None:
    sub = subscribers("tcp://127.0.0.1:*", bind=True)
    pub = publishers(sub.endpoint, None, "topic")  # no wildcard: connect
    assert pub.bound_endpoint == sub.endpoint
    warm_up(pub, sub)
    assert sub.received[0].topic == b"topic"


def test_drop_fraction_makes_gaps_but_replay_repairs(
    subscribers: Make, publishers: Callable[..., EventPublisher]
) -> None:
    pub = publishers("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "t", drop_seed=1)
    sub = subscribers(pub.bound_endpoint)
    start = warm_up(pub, sub)
    pub.drop_fraction = 0.5
    for i in range(40):
        pub.publish([BlockRemoved([i], "GPU")])
    assert pub.flush()
    pub.drop_fraction = 0.0
    pub.publish([AllBlocksCleared()])
    assert pub.flush()
    final = start + 40
    got = sub.poll_until(lambda got: got[-1].seq == final)
    live = {f.seq for f in got if f.seq >= start}
    assert 0 < len(live) < 41 and pub.stats.dropped == 41 - len(live)
    replayed = replay_request(pub.bound_replay_endpoint or "", start)
    assert [f.seq for f in replayed] == list(range(start, final + 1))


def test_pause_and_restart_reset_seq(
    subscribers: Make, publishers: Callable[..., EventPublisher]
) -> None:
    pub = publishers("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "t")
    sub = subscribers(pub.bound_endpoint)
    before = warm_up(pub, sub)
    assert before > 0
    pub.paused = True
    pub.publish([AllBlocksCleared()])
    assert pub.flush() and pub.next_seq == before
    pub.paused = False
    endpoint = pub.bound_endpoint
    pub.restart()
    assert pub.next_seq == 0 and pub.bound_endpoint == endpoint  # same port after restart
    assert replay_request(pub.bound_replay_endpoint or "", 0) == []
    sub.received.clear()
    after = warm_up(pub, sub)
    # The subscriber reconnected by itself; live seqs now count again from 0.
    assert sub.received[-1].seq == after - 1
    assert all(f.seq < after for f in sub.received)
    assert [f.seq for f in replay_request(pub.bound_replay_endpoint or "", 0)] == list(range(after))


def test_bad_replay_request_is_counted_not_fatal(publishers: Callable[..., EventPublisher]) -> None:
    import time

    import zmq

    pub = publishers("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "t")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(pub.bound_replay_endpoint or "")
    dealer.send_multipart([b"", b"short"])
    deadline = time.monotonic() + 5
    while pub.stats.bad_replay_requests == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    dealer.close()
    assert pub.stats.bad_replay_requests == 1
    pub.publish([AllBlocksCleared()])
    assert pub.flush()
    assert len(replay_request(pub.bound_replay_endpoint or "", 0)) == 1
