"""A test double of vLLM 0.33's ZMQ KV-event publisher, written from
/work/shared/reference/vllm-kv-events.md (sections 1-3) and independent of kvindex's decoder.

* PUB socket: binds when the endpoint holds ``*`` or ``::`` or is ipc:// / inproc://,
  otherwise connects (vLLM's rule, so a central indexer can bind).
* Every message is ``[topic, seq(8 bytes big-endian unsigned), payload]``; seq counts from
  0 per publisher and restarts at 0 on :meth:`VllmPublisher.restart`.
* Payload: msgpack ``[ts, events, data_parallel_rank]``. Events in the map encoding of 0.33
  (``{"type": ..., fields}``, defaulted fields omitted) or the older array encoding
  (``["BlockStored", every field positional, trailing Nones included]``); the events and
  their encodings are tests/events.py's.
* Replay: a ROUTER (always binds) on its own thread answers ``[b"", start8]`` with every
  buffered batch whose seq >= start as ``[b"", topic, seq8, payload]`` (``reply_form="new"``)
  or ``[b"", seq8, payload]`` (``"old"``), then the end marker: seq -1 as 8 signed big-endian
  bytes with an empty payload (after an empty topic frame in the new form). The buffer keeps
  the last ``buffer_steps`` batches.

``publish(..., drop=True)`` numbers and buffers a batch but does not send it: what a PUB does
past its high-water mark (a sequence gap only replay can repair).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from tests.events import END_SEQ, Encoding, Ev, encode_batch, frame, seq8, stored

# `stored` is re-exported for the tests that still import it from here.
__all__ = ["VllmPublisher", "binds", "stored"]


def binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class VllmPublisher:
    def __init__(
        self,
        endpoint: str,
        topic: str = "kv@127.0.0.1:8000@m",
        replay_endpoint: str | None = None,
        encoding: Encoding = "map",
        reply_form: str = "new",
        buffer_steps: int = 10_000,
        dp_rank: int | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.ctx = context or zmq.Context.instance()
        self.topic = topic.encode()
        self.encoding = encoding
        self.reply_form = reply_form
        self.dp_rank = dp_rank
        self.seq = 0
        self.sent: list[int] = []
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if binds(endpoint):
            self.pub.bind(endpoint)
            self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.pub.connect(endpoint)
            self.endpoint = endpoint
        self.replay_requests: list[int] = []
        self.replay_endpoint: str | None = None
        self._stop = threading.Event()
        self._replay_thread: threading.Thread | None = None
        if replay_endpoint is not None:
            self.serve_replay(replay_endpoint)

    def serve_replay(self, endpoint: str) -> None:
        """Start the replay ROUTER (vLLM starts it with the publisher; tests may start it
        late to model a replay endpoint that comes up after a failure)."""
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(endpoint)
        self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay_thread = threading.Thread(target=self._serve, args=(router,), daemon=True)
        self._replay_thread.start()

    # -- publishing --------------------------------------------------------------------------

    def publish_payload(self, payload: bytes, drop: bool = False) -> int:
        with self._lock:
            seq = self.seq
            self.seq += 1
            self._buffer.append((seq, payload))
        if not drop:
            self.pub.send_multipart(frame(self.topic, seq, payload))
            self.sent.append(seq)
        return seq

    def publish(
        self,
        *events: Ev,
        drop: bool = False,
        dp_rank: int | None = None,
        ts: float | None = None,
    ) -> int:
        rank = self.dp_rank if dp_rank is None else dp_rank
        return self.publish_payload(encode_batch(list(events), self.encoding, rank, ts), drop)

    def send_raw(self, frames: list[bytes]) -> None:
        """Anything at all, for garbage tests."""
        self.pub.send_multipart(frames)

    def restart(self) -> None:
        """The engine restarted: seq back to 0, replay buffer empty."""
        with self._lock:
            self.seq = 0
            self._buffer.clear()

    def publish_until(self, seen: Callable[[], bool], *events: Ev, timeout: float = 10.0) -> int:
        """Re-publish a probe batch until the subscriber shows it (the PUB/SUB slow joiner:
        messages sent before the connection is up are dropped). Returns the probe count."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            self.publish(*events)
            n += 1
            end = time.monotonic() + 0.05
            while time.monotonic() < end:
                if seen():
                    return n
                time.sleep(0.005)
        raise TimeoutError("subscriber never saw the probe batch")

    # -- replay ------------------------------------------------------------------------------

    def _serve(self, router: zmq.Socket[Any]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(20):
                    continue
                frames = router.recv_multipart()
                identity, rest = frames[0], frames[1:]
                if len(rest) != 2 or rest[0] != b"" or len(rest[1]) != 8:
                    continue
                start = int.from_bytes(rest[1], "big")
                self.replay_requests.append(start)
                with self._lock:
                    batches = [(s, p) for s, p in self._buffer if s >= start]
                for seq, payload in batches:
                    if self.reply_form == "new":
                        router.send_multipart([identity, b"", *frame(self.topic, seq, payload)])
                    else:
                        router.send_multipart([identity, b"", seq8(seq), payload])
                if self.reply_form == "new":
                    router.send_multipart([identity, b"", b"", END_SEQ, b""])
                else:
                    router.send_multipart([identity, b"", END_SEQ, b""])
        finally:
            router.close(0)

    def close(self) -> None:
        self._stop.set()
        if self._replay_thread is not None:
            self._replay_thread.join(5)
        self.pub.close(0)
