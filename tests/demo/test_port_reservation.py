"""PortReservation: a reserved port goes to a server that binds it with SO_REUSEADDR (as the
demo's children do) and to nothing else until the reservation closes."""

from __future__ import annotations

import socket

import pytest

from kvtools.demo.processes import PortReservation


def _plain_bind(port: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_reserved_port_is_refused_to_others_and_served_by_a_reuseaddr_listener() -> None:
    with PortReservation() as ports:
        port = ports.port()
        with pytest.raises(OSError):
            _plain_bind(port)  # what a bind or connect without SO_REUSEADDR would get
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            accepted, _ = server.accept()
            client.sendall(b"ping")
            assert accepted.recv(4) == b"ping"
            client.close()  # the client closes first, so TIME_WAIT holds its port, not ours
            assert accepted.recv(4) == b""
            accepted.close()
        assert len({ports.port() for _ in range(5)} | {port}) == 6
    _plain_bind(port)  # released
