"""ZMQ KV-event publisher with replay, behaving as vLLM 0.33's `ZmqEventPublisher`.

* PUB socket: binds if the endpoint holds ``*`` or ``::`` or is ``ipc://``/``inproc://``,
  else connects (a central indexer binds, engines connect).
* Live messages: 3 frames ``[topic, seq (8 bytes big-endian), payload]``, seq from 0.
* ROUTER replay socket (always binds): a request ``[b"", start_seq8]`` is answered with
  ``[b"", topic, seq8, payload]`` per buffered batch with seq >= start (``legacy_replay``:
  ``[b"", seq8, payload]``), then the end marker: seq -1 as 8 signed bytes and an empty
  payload (preceded by an empty topic frame in the new form).
* One background thread owns both sockets (ZMQ sockets are not thread-safe); `publish`
  only enqueues, like vLLM.

Fault knobs for tests: `drop_fraction` (batch takes a seq and enters the replay buffer but is
not sent: a gap, as a full HWM does), `paused` (nothing published, seq does not advance),
`restart()` (new sockets, seq back to 0, replay buffer emptied).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq

from kvtools.sim.events import EventEncoding, HashFormat, KVEvent, encode_batch

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def should_bind(endpoint: str) -> bool:
    """vLLM's rule for the PUB socket."""
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith("ipc://")
        or endpoint.startswith("inproc://")
    )


def offset_endpoint_port(endpoint: str | None, data_parallel_rank: int) -> str | None:
    """vLLM's per-DP-rank endpoint: tcp port + rank; inproc gets a ``_dp<rank>`` suffix."""
    if not endpoint or data_parallel_rank == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{data_parallel_rank}"
    if "tcp" in endpoint:
        head, sep, port = endpoint.rpartition(":")
        if sep and port.isdigit():
            return f"{head}:{int(port) + data_parallel_rank}"
        return endpoint
    raise ValueError(f"invalid endpoint {endpoint!r}: must be tcp:// or inproc:// for DP ranks")


def _bind_retrying(sock: zmq.Socket[bytes], endpoint: str, retry: bool) -> None:
    """Bind, retrying while a just-closed socket of ours still holds the address (ZMQ
    closes asynchronously, so a restart can race its own previous socket)."""
    deadline = time.monotonic() + (3.0 if retry else 0.0)
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@dataclass
class PublisherStats:
    published: int = 0
    dropped: int = 0
    replay_requests: int = 0
    bad_replay_requests: int = 0


@dataclass(frozen=True)
class _Batch:
    ts: float
    events: list[KVEvent]


class EventPublisher:
    """Publishes KV-event batches like a vLLM engine (see module docstring)."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        *,
        encoding: EventEncoding = "map",
        hash_format: HashFormat = "int",
        data_parallel_rank: int = 0,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        legacy_replay: bool = False,
        drop_seed: int = 0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.encoding: EventEncoding = encoding
        self.hash_format: HashFormat = hash_format
        self.data_parallel_rank = data_parallel_rank
        self.buffer_steps = buffer_steps
        self.hwm = hwm
        self.legacy_replay = legacy_replay
        self.drop_fraction = 0.0
        self.paused = False
        self.stats = PublisherStats()
        self._rng = random.Random(drop_seed)
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._resolved: dict[str, str] = {}
        self._start()

    # ----------------------------------------------------------------- lifecycle

    def _start(self) -> None:
        pub = self._ctx.socket(zmq.PUB)
        pub.set_hwm(self.hwm)
        pub.setsockopt(zmq.LINGER, 0)
        replay: zmq.Socket[bytes] | None = None
        try:
            if should_bind(self.endpoint):
                # A restart re-binds the address first resolved (a wildcard port stays put).
                _bind_retrying(
                    pub, self._resolved.get("pub", self.endpoint), "pub" in self._resolved
                )
                self._resolved["pub"] = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                pub.connect(self.endpoint)
            if self.replay_endpoint is not None:
                replay = self._ctx.socket(zmq.ROUTER)
                replay.setsockopt(zmq.LINGER, 0)
                _bind_retrying(
                    replay,
                    self._resolved.get("replay", self.replay_endpoint),
                    "replay" in self._resolved,
                )
                self._resolved["replay"] = replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError:
            pub.close()
            if replay is not None:
                replay.close()
            raise
        self._pub = pub
        self._replay = replay
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=self.buffer_steps)
        self._next_seq = 0
        self._running = True
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Flush queued batches, stop the thread, close the sockets."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._thread = None
        self._running = False
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def restart(self) -> None:
        """As if the engine process restarted: new sockets, seq from 0, empty replay buffer."""
        self.close()
        self._start()

    @property
    def bound_endpoint(self) -> str:
        """The PUB address actually bound (resolves ``tcp://127.0.0.1:*`` to a port), or the
        connect address."""
        return self._resolved.get("pub", self.endpoint)

    @property
    def bound_replay_endpoint(self) -> str | None:
        return self._resolved.get("replay")

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq

    # ----------------------------------------------------------------- publishing

    def publish(self, events: list[KVEvent], ts: float | None = None) -> None:
        """Queue one batch (one engine step's events). No-op while paused or closed."""
        if self.paused or not self._running or not events:
            return
        self._queue.put(_Batch(time.time() if ts is None else ts, list(events)))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued batch has been sent (or dropped). For tests."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.002)
        return False

    def _run(self) -> None:
        poller = zmq.Poller()
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while True:
            if self._replay is not None and dict(poller.poll(0)):
                self._serve_replay()
            try:
                item = self._queue.get(timeout=0.01)
            except queue.Empty:
                continue
            try:
                if item is None:
                    return
                self._send(item)
            finally:
                self._queue.task_done()

    def _send(self, batch: _Batch) -> None:
        payload = encode_batch(
            batch.ts, batch.events, self.data_parallel_rank, self.encoding, self.hash_format
        )
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        self._buffer.append((seq, payload))
        if self.drop_fraction > 0 and self._rng.random() < self.drop_fraction:
            self.stats.dropped += 1
            return
        self._pub.send_multipart([self.topic.encode(), seq.to_bytes(8, "big"), payload])
        self.stats.published += 1

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        self.stats.replay_requests += 1
        if len(frames) != 3 or len(frames[2]) != 8:
            self.stats.bad_replay_requests += 1
            return
        client, _, start_bytes = frames
        start = int.from_bytes(start_bytes, "big")
        topic = self.topic.encode()
        for seq, payload in list(self._buffer):
            if seq >= start:
                head = [client, b""] if self.legacy_replay else [client, b"", topic]
                self._replay.send_multipart([*head, seq.to_bytes(8, "big"), payload])
        end_head = [client, b""] if self.legacy_replay else [client, b"", b""]
        self._replay.send_multipart([*end_head, END_SEQ, b""])
