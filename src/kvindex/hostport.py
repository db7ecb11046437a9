"""``ip:port`` endpoint keys, parsed and formatted in one place (the index's engine keys and
the picker's endpoint keys are the same string). Pure; no I/O."""

from __future__ import annotations

from kvindex.errors import KVIndexError

__all__ = ["HostPortError", "join_host_port", "split_host_port"]


class HostPortError(KVIndexError, ValueError):
    """Not an ``ip:port`` (or ``[ipv6]:port``); the message quotes the text and says why.
    Callers re-raise it as their own error type, prefixed with where the text came from."""


def split_host_port(text: str) -> tuple[str, int]:
    """``ip:port`` or ``[v6]:port`` -> (address, port); surrounding blanks are ignored."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise HostPortError(f"endpoint {text!r} must be ip:port (or [ipv6]:port)")
    if not (port_text.isascii() and port_text.isdigit()):
        raise HostPortError(f"endpoint {text!r} has a non-numeric port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise HostPortError(f"endpoint {text!r}: port must be 1..65535")
    return host, port


def join_host_port(host: str, port: int) -> str:
    """The endpoint key of ``host`` and ``port``: an IPv6 address goes in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
