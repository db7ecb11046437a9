"""Which peer may publish under which engine's topic on the event bind sockets.

ZMQ tells the receiver each message's peer address (the ``Peer-Address`` property of tcp
messages), so a batch on a bind socket can be checked against the engine its topic names:
the peer must be that engine's own address (its host, resolved), or in a network the
operator allows (``--zmq-allow-source``, for NAT or a relay beside the engines). A host that
merely reaches the port can then not publish for a real engine: no forged stores (poison),
no seq 0 (wipe), no sequence jumps (freeze), and no engine can publish for another.

(Refusing peers at the handshake through ZAP was tried and not kept: libzmq does not
reconnect a peer it refused, so an engine that connects before discovery names it - vLLM
connects at start-up, before its pod is Ready - would stay deaf for good.)

Pure: no sockets, no clock; name resolution is :func:`resolve_host`, called by the ingest
service when discovery changes.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping

__all__ = ["PeerCheck", "parse_networks", "resolve_host"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``10.0.0.0/8``, ``fd00::/8`` or a single address; ValueError names the bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP network (e.g. 10.0.0.0/8): {exc}") from None
    return tuple(networks)


def _canonical(address: str) -> str | None:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped if mapped is not None else ip)


def resolve_host(host: str) -> frozenset[str]:
    """The addresses of ``host`` (itself when it is an IP address); empty when it does not
    resolve (its engine's batches are then refused until it does)."""
    literal = _canonical(host)
    if literal is not None:
        return frozenset({literal})
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return frozenset()
    return frozenset(a for info in infos if (a := _canonical(str(info[4][0]))) is not None)


class PeerCheck:
    """``allows(engine, peer)``: may ``peer`` publish for ``engine`` (an endpoint key)?"""

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self.networks = tuple(networks)
        self._addresses: Mapping[str, frozenset[str]] = {}

    def set_engines(self, addresses: Mapping[str, frozenset[str]]) -> None:
        """Each discovered engine's addresses (its host, resolved)."""
        self._addresses = dict(addresses)

    def allows(self, engine: str, peer: str) -> bool:
        address = _canonical(peer)
        if address is None:
            return False
        if address in self._addresses.get(engine, ()):
            return True
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.networks)
