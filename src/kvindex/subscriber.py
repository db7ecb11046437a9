"""ZMQ sockets of the ingest path: SUB sockets for live batches, DEALER sockets for replay.

No index logic lives here: :class:`ZmqSubscriber` turns socket traffic into
:class:`LiveMessage`, :class:`ReplayMessage` and :class:`BadMessage` values, and the ingest
service (:mod:`kvindex.ingest_service`) decides what they mean.

The sockets are synchronous pyzmq sockets driven by one :class:`zmq.Poller`, owned by a
single thread (the ingest thread). ZMQ sockets are not thread-safe; the caller may create
them on one thread (so bind errors surface at startup) and hand the subscriber over to the
ingest thread before it polls (thread start is a memory barrier, which ZMQ requires).

Modes:

* bind: one SUB socket per ``bind`` endpoint; many engines connect their PUB to it (vLLM
  connects when its endpoint has no ``*``). The source is the bind endpoint; engine identity
  must come from the topic, and a tcp message also carries its peer's address (``peer``,
  ZMQ's ``Peer-Address`` property) for the ingest service to check against it.
* connect: one SUB socket per engine PUB endpoint (``connect``), so each message's source is
  known and identity may come from discovery. ZMQ reconnects SUB sockets by itself.

Replay: one DEALER per engine stream, connected to the engine's ROUTER. A request is
``[b"", start_seq(8 bytes big-endian)]``; replies are ``[b"", topic, seq8, payload]`` or the
older ``[b"", seq8, payload]``, closed by an end marker (seq -1). DEALERs are closed with
linger 0 when a replay times out (:meth:`ZmqSubscriber.drop_replay`) and recreated on the next
request, so a dead peer's queued request never answers a later one.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import zmq

from kvindex.wire import Frame, FrameError, parse_frames, parse_replay_frames

__all__ = [
    "BadMessage",
    "LiveMessage",
    "ReplayMessage",
    "SubscriberMessage",
    "ZmqSubscriber",
]

# Drain at most this many messages per socket per poll so one busy engine cannot starve
# the others (and replay replies are interleaved with live traffic).
_DRAIN_PER_SOCKET = 256


@dataclass(frozen=True, slots=True)
class LiveMessage:
    source: str  # the bind or connect endpoint the message arrived on
    frame: Frame
    received_at: float
    peer: str | None = None  # the publisher's address (tcp bind sockets only)


@dataclass(frozen=True, slots=True)
class ReplayMessage:
    stream: str  # the engine stream the replay was requested for
    frame: Frame | None  # None: end of replay


@dataclass(frozen=True, slots=True)
class BadMessage:
    source: str
    reason: str  # "frame_count", "bad_seq", ...
    detail: str
    replay: bool = False


SubscriberMessage = LiveMessage | ReplayMessage | BadMessage


def _bad_reason(exc: FrameError) -> str:
    return "bad_seq" if "sequence" in str(exc) else "frame_count"


class ZmqSubscriber:
    """The SUB and DEALER sockets of one ingest service. Single-threaded use only."""

    def __init__(
        self,
        topic_filter: str = "kv@",
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        rcvhwm: int = 100_000,
    ) -> None:
        self._own_context = context is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self._topic = topic_filter.encode()
        self._rcvhwm = rcvhwm
        self._poller = zmq.Poller()
        self._live: dict[zmq.Socket[bytes], str] = {}
        self._by_source: dict[str, zmq.Socket[bytes]] = {}
        self._replay: dict[str, zmq.Socket[bytes]] = {}
        self._replay_stream: dict[zmq.Socket[bytes], str] = {}
        self._replay_endpoint: dict[str, str] = {}
        self.bound: list[str] = []  # actual bind endpoints (wildcard ports resolved)
        self._tcp_bound: set[zmq.Socket[bytes]] = set()  # messages carry a peer address
        self.closed = False

    # -- live sockets ------------------------------------------------------------------------

    def _sub(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, self._topic)
        return sock

    def _add(self, source: str, sock: zmq.Socket[bytes]) -> None:
        self._live[sock] = source
        self._by_source[source] = sock
        self._poller.register(sock, zmq.POLLIN)

    def bind(self, endpoint: str) -> str:
        """Bind a SUB socket; returns the actual endpoint (``tcp://host:*`` resolved).
        Raises zmq.ZMQError (e.g. EADDRINUSE) for the caller to report."""
        sock = self._sub()
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close(0)
            raise
        actual = sock.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self._add(actual, sock)
        self.bound.append(actual)
        if actual.startswith("tcp://"):
            self._tcp_bound.add(sock)
        return actual

    def connect(self, endpoint: str) -> None:
        """Open a SUB socket connected to one engine PUB endpoint (idempotent)."""
        if endpoint in self._by_source:
            return
        sock = self._sub()
        sock.connect(endpoint)
        self._add(endpoint, sock)

    def disconnect(self, endpoint: str) -> None:
        sock = self._by_source.pop(endpoint, None)
        if sock is None:
            return
        del self._live[sock]
        self._tcp_bound.discard(sock)
        self._poller.unregister(sock)
        sock.close(0)

    def sources(self) -> list[str]:
        return list(self._by_source)

    def counts(self) -> tuple[int, int]:
        """(bound sockets, connected sockets)."""
        bound = len(self.bound)
        return bound, len(self._by_source) - bound

    # -- replay ------------------------------------------------------------------------------

    def request_replay(self, stream: str, endpoint: str, start_seq: int) -> None:
        """Ask ``endpoint`` (a ROUTER) for every buffered batch with seq >= ``start_seq``."""
        sock = self._replay.get(stream)
        if sock is not None and self._replay_endpoint.get(stream) != endpoint:
            self.drop_replay(stream)
            sock = None
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Do not queue requests for a peer that is not there yet forever.
            sock.setsockopt(zmq.SNDHWM, 16)
            sock.connect(endpoint)
            self._replay[stream] = sock
            self._replay_stream[sock] = stream
            self._replay_endpoint[stream] = endpoint
            self._poller.register(sock, zmq.POLLIN)
        # A peer that never takes the request is handled by the caller's replay timeout.
        with contextlib.suppress(zmq.Again):
            sock.send_multipart([b"", start_seq.to_bytes(8, "big")], zmq.NOBLOCK)

    def drop_replay(self, stream: str) -> None:
        """Close a stream's DEALER (timed out or the engine left); recreated on demand."""
        sock = self._replay.pop(stream, None)
        self._replay_endpoint.pop(stream, None)
        if sock is None:
            return
        del self._replay_stream[sock]
        self._poller.unregister(sock)
        sock.close(0)

    # -- polling -----------------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> list[SubscriberMessage]:
        """Wait up to ``timeout_ms`` for traffic; return every message that is ready."""
        out: list[SubscriberMessage] = []
        if self.closed:
            return out
        for sock, _ in self._poller.poll(timeout_ms):
            stream = self._replay_stream.get(sock)
            if stream is not None:
                self._drain_replay(sock, stream, out)
            else:
                self._drain_live(sock, self._live[sock], out)
        return out

    def _drain_live(
        self, sock: zmq.Socket[bytes], source: str, out: list[SubscriberMessage]
    ) -> None:
        if sock in self._tcp_bound:
            self._drain_live_with_peer(sock, source, out)
            return
        for _ in range(_DRAIN_PER_SOCKET):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.time()
            try:
                out.append(LiveMessage(source, parse_frames(frames), now))
            except FrameError as exc:
                out.append(BadMessage(source, _bad_reason(exc), str(exc)))

    def _drain_live_with_peer(
        self, sock: zmq.Socket[bytes], source: str, out: list[SubscriberMessage]
    ) -> None:
        # The first part as a zmq.Frame, for its Peer-Address; the rest as bytes.
        for _ in range(_DRAIN_PER_SOCKET):
            try:
                first = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [first.bytes]
            if first.more:
                frames.extend(sock.recv_multipart())
            address = first.get("Peer-Address")
            peer = address if isinstance(address, str) else None
            now = time.time()
            try:
                out.append(LiveMessage(source, parse_frames(frames), now, peer))
            except FrameError as exc:
                out.append(BadMessage(source, _bad_reason(exc), str(exc)))

    def _drain_replay(
        self, sock: zmq.Socket[bytes], stream: str, out: list[SubscriberMessage]
    ) -> None:
        for _ in range(_DRAIN_PER_SOCKET):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                out.append(ReplayMessage(stream, parse_replay_frames(frames)))
            except FrameError as exc:
                out.append(BadMessage(stream, _bad_reason(exc), str(exc), replay=True))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in list(self._replay):
            self.drop_replay(stream)
        for source in list(self._by_source):
            self.disconnect(source)
        if self._own_context:
            self._ctx.term()
