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

CURVE (``curve``, :mod:`kvindex.curve`): bind sockets are CURVE servers with the index's
keys; with a list of client keys the subscriber answers the ZAP handshake requests (RFC 27,
on the same poller) and admits only those keys, reporting refusals as :class:`RefusedPeer`.
Connect and replay sockets are CURVE clients when the engines' server key is given.

Replay: one DEALER per engine stream, connected to the engine's ROUTER. A request is
``[b"", start_seq(8 bytes big-endian)]``; replies are ``[b"", topic, seq8, payload]`` or the
older ``[b"", seq8, payload]``, closed by an end marker (seq -1). DEALERs are closed with
linger 0 when a replay times out (:meth:`ZmqSubscriber.drop_replay`) and recreated on the next
request, so a dead peer's queued request never answers a later one.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass

import zmq
import zmq.utils.z85

from kvindex.curve import CurveConfig
from kvindex.wire import Frame, FrameError, parse_frames, parse_replay_frames

__all__ = [
    "BadMessage",
    "LiveMessage",
    "RefusedPeer",
    "ReplayMessage",
    "SubscriberMessage",
    "ZmqSubscriber",
]

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks, per context (RFC 27)
_ZAP_DOMAIN = b"kvindex-events"

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
    # the DEALER it came on (request_replay's return value): answers to a DEALER since
    # dropped, already read in the same poll, are told apart; None: not known
    generation: int | None = None


@dataclass(frozen=True, slots=True)
class BadMessage:
    source: str
    reason: str  # "frame_count", "bad_seq", ...
    detail: str
    replay: bool = False


@dataclass(frozen=True, slots=True)
class RefusedPeer:
    """A CURVE client whose key is not admitted, refused at the handshake."""

    address: str


SubscriberMessage = LiveMessage | ReplayMessage | BadMessage | RefusedPeer


def _bad_reason(exc: FrameError) -> str:
    return "bad_seq" if "sequence" in str(exc) else "frame_count"


class ZmqSubscriber:
    """The SUB and DEALER sockets of one ingest service. Single-threaded use only."""

    def __init__(
        self,
        topic_filter: str = "kv@",
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        rcvhwm: int = 100_000,
        curve: CurveConfig | None = None,
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
        self._replay_generation: dict[zmq.Socket[bytes], int] = {}
        self._generations = itertools.count(1)
        self._replay_endpoint: dict[str, str] = {}
        self.curve = curve
        self._zap: zmq.Socket[bytes] | None = None
        if curve is not None and curve.allowed_clients is not None:
            self._zap = self._ctx.socket(zmq.REP)
            self._zap.setsockopt(zmq.LINGER, 0)
            self._zap.bind(_ZAP_ENDPOINT)
            self._poller.register(self._zap, zmq.POLLIN)
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
        if self.curve is not None:  # before bind: the handshake of every peer uses them
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)
            if self._zap is not None:
                sock.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN)
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
        self._curve_client(sock)
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

    def _curve_client(self, sock: zmq.Socket[bytes]) -> None:
        curve = self.curve
        if curve is not None and curve.server_key is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)

    def sources(self) -> list[str]:
        return list(self._by_source)

    def counts(self) -> tuple[int, int]:
        """(bound sockets, connected sockets)."""
        bound = len(self.bound)
        return bound, len(self._by_source) - bound

    # -- replay ------------------------------------------------------------------------------

    def request_replay(self, stream: str, endpoint: str, start_seq: int) -> int:
        """Ask ``endpoint`` (a ROUTER) for every buffered batch with seq >= ``start_seq``.
        Returns the generation of the DEALER used (its answers carry it)."""
        sock = self._replay.get(stream)
        if sock is not None and self._replay_endpoint.get(stream) != endpoint:
            self.drop_replay(stream)
            sock = None
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Do not queue requests for a peer that is not there yet forever.
            sock.setsockopt(zmq.SNDHWM, 16)
            self._curve_client(sock)
            sock.connect(endpoint)
            self._replay[stream] = sock
            self._replay_stream[sock] = stream
            self._replay_generation[sock] = next(self._generations)
            self._replay_endpoint[stream] = endpoint
            self._poller.register(sock, zmq.POLLIN)
        # A peer that never takes the request is handled by the caller's replay timeout.
        with contextlib.suppress(zmq.Again):
            sock.send_multipart([b"", start_seq.to_bytes(8, "big")], zmq.NOBLOCK)
        return self._replay_generation[sock]

    def drop_replay(self, stream: str) -> None:
        """Close a stream's DEALER (timed out or the engine left); recreated on demand."""
        sock = self._replay.pop(stream, None)
        self._replay_endpoint.pop(stream, None)
        if sock is None:
            return
        del self._replay_stream[sock]
        self._replay_generation.pop(sock, None)
        self._poller.unregister(sock)
        sock.close(0)

    # -- polling -----------------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> list[SubscriberMessage]:
        """Wait up to ``timeout_ms`` for traffic; return every message that is ready."""
        out: list[SubscriberMessage] = []
        if self.closed:
            return out
        for sock, _ in self._poller.poll(timeout_ms):
            if self._zap is not None and sock is self._zap:
                self._answer_zap(self._zap, out)
                continue
            stream = self._replay_stream.get(sock)
            if stream is not None:
                self._drain_replay(sock, stream, out)
            else:
                self._drain_live(sock, self._live[sock], out)
        return out

    def _drain_live(
        self, sock: zmq.Socket[bytes], source: str, out: list[SubscriberMessage]
    ) -> None:
        with_peer = sock in self._tcp_bound
        for _ in range(_DRAIN_PER_SOCKET):
            peer: str | None = None
            try:
                if with_peer:
                    # The first part as a zmq.Frame, for its Peer-Address; the rest as bytes.
                    first = sock.recv(zmq.NOBLOCK, copy=False)
                    frames = [first.bytes]
                    if first.more:
                        frames.extend(sock.recv_multipart())
                    address = first.get("Peer-Address")
                    peer = address if isinstance(address, str) else None
                else:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.time()
            try:
                out.append(LiveMessage(source, parse_frames(frames), now, peer))
            except FrameError as exc:
                out.append(BadMessage(source, _bad_reason(exc), str(exc)))

    def _answer_zap(self, sock: zmq.Socket[bytes], out: list[SubscriberMessage]) -> None:
        """ZAP requests ``[version, id, domain, address, identity, mechanism, credentials]``
        answered ``[version, id, status, text, user id, metadata]``: a CURVE client key in
        the admitted list, or refused."""
        assert self.curve is not None and self.curve.allowed_clients is not None
        for _ in range(_DRAIN_PER_SOCKET):
            try:
                request = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(request) < 6:
                sock.send_multipart([b"1.0", b"", b"500", b"malformed ZAP request", b"", b""])
                continue
            version, request_id, _domain, address, _identity, mechanism = request[:6]
            key = request[6] if len(request) > 6 else b""
            if mechanism == b"CURVE" and zmq.utils.z85.encode(key) in self.curve.allowed_clients:
                sock.send_multipart([version, request_id, b"200", b"OK", b"", b""])
            else:
                sock.send_multipart([version, request_id, b"400", b"key not admitted", b"", b""])
                out.append(RefusedPeer(address.decode("ascii", "replace")))

    def _drain_replay(
        self, sock: zmq.Socket[bytes], stream: str, out: list[SubscriberMessage]
    ) -> None:
        generation = self._replay_generation.get(sock)
        for _ in range(_DRAIN_PER_SOCKET):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                out.append(ReplayMessage(stream, parse_replay_frames(frames), generation))
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
        if self._zap is not None:
            self._poller.unregister(self._zap)
            self._zap.close(0)
        if self._own_context:
            self._ctx.term()
