"""ZMQ helpers for the simulator tests: real ZMQ subscribers and replay clients on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from tests.events import END_SEQ, seq8


@dataclass
class Frames:
    topic: bytes | None
    seq: int
    payload: bytes

    def batch(self) -> list[Any]:
        decoded = msgspec.msgpack.decode(self.payload)
        assert isinstance(decoded, list)
        return decoded


def replay_request(
    endpoint: str, start: int = 0, *, legacy: bool = False, timeout: float = 5.0
) -> list[Frames]:
    """Ask a ROUTER replay socket for batches >= start, with a DEALER as vLLM documents."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", seq8(start)])
        out: list[Frames] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dealer.poll(100):
                continue
            frames = dealer.recv_multipart()
            assert frames[0] == b""
            if legacy:
                assert len(frames) == 3, frames
                topic, seq_b, payload = None, frames[1], frames[2]
            else:
                assert len(frames) == 4, frames
                topic, seq_b, payload = frames[1], frames[2], frames[3]
            if seq_b == END_SEQ:
                assert payload == b""
                if not legacy:
                    assert topic == b""
                return out
            out.append(Frames(topic, int.from_bytes(seq_b, "big"), payload))
        raise AssertionError("replay end marker not received before the deadline")
    finally:
        dealer.close()


class Subscriber:
    """A SUB socket that collects live 3-frame messages."""

    def __init__(self, endpoint: str, *, bind: bool = False) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        if bind:
            self.sock.bind(endpoint)
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.sock.connect(endpoint)
            self.endpoint = endpoint
        self.received: list[Frames] = []

    def poll_until(
        self,
        done: Callable[[list[Frames]], bool],
        timeout: float = 5.0,
        tick: Callable[[], None] | None = None,
    ) -> list[Frames]:
        """Receive until `done(received)`; `tick` runs between polls (e.g. a probe publish,
        since a SUB only hears messages sent after its subscription reached the PUB)."""
        deadline = time.monotonic() + timeout
        while not done(self.received):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met; received {len(self.received)} messages")
            if tick is not None:
                tick()
            if self.sock.poll(20):
                while self.sock.poll(0):
                    frames = self.sock.recv_multipart()
                    assert len(frames) == 3, frames
                    self.received.append(
                        Frames(frames[0], int.from_bytes(frames[1], "big"), frames[2])
                    )
        return self.received

    def close(self) -> None:
        self.sock.close()
