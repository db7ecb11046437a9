"""Loopback ports for tests, reserved for the whole test session.

A port from a bind to port 0 that is closed before a server (often another process) binds it
can be taken in the meantime by an outgoing connection's ephemeral port; CI saw exactly that.
These ports stay held (see kvtools.demo.processes.PortReservation) until the session ends, so
a server that sets SO_REUSEADDR binds them and nothing else gets them, restarts included."""

from __future__ import annotations

from kvtools.demo.processes import PortReservation

__all__ = ["free_port"]

_SESSION = PortReservation()


def free_port() -> int:
    return _SESSION.port()
