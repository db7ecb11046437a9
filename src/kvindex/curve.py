"""ZMQ CURVE for the event and replay sockets: encrypted, and with a list of client keys,
authenticated (docs/security.md).

Keys are ZMQ certificate files as ``zmq.auth.create_certificates`` writes them (``NAME.key``
holds a public key, ``NAME.key_secret`` both), so they can come from a Kubernetes Secret
mounted as files. vLLM's own ZMQ publisher has no CURVE option: CURVE is for publishers that
have one (``kvindex-sim``, a relay beside each engine); for vLLM use the network instead
(docs/security.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from kvindex.errors import ConfigError

__all__ = ["CurveConfig", "load_curve"]


@dataclass(frozen=True, slots=True)
class CurveConfig:
    public: bytes  # this index's keys (z85)
    secret: bytes
    # Connect sockets (engines' PUB, replay ROUTERs) are CURVE servers with this public key;
    # None: they are plain (only the bind sockets use CURVE).
    server_key: bytes | None = None
    # Bind sockets admit only these client public keys (checked at the handshake);
    # None: any client that knows this index's public key.
    allowed_clients: frozenset[bytes] | None = None


def _certificate(path: str, flag: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag} {path}: not a ZMQ certificate file: {exc}") from None
    if secret and secret_key is None:
        raise ConfigError(f"{flag} {path}: holds no secret key (use NAME.key_secret)")
    return public, secret_key


def load_curve(
    cert_file: str | None, clients_dir: str | None = None, server_key_file: str | None = None
) -> CurveConfig | None:
    """The CURVE settings of the flags ``--zmq-curve-cert``, ``--zmq-curve-clients`` and
    ``--zmq-curve-server-key``; None without a certificate. ConfigError names the flag."""
    if cert_file is None:
        if clients_dir is not None or server_key_file is not None:
            raise ConfigError(
                "--zmq-curve-clients and --zmq-curve-server-key need --zmq-curve-cert (this "
                "index's own certificate, NAME.key_secret)"
            )
        return None
    public, secret = _certificate(cert_file, "--zmq-curve-cert", secret=True)
    assert secret is not None
    server_key = None
    if server_key_file is not None:
        server_key, _ = _certificate(server_key_file, "--zmq-curve-server-key", secret=False)
    allowed = None
    if clients_dir is not None:
        directory = Path(clients_dir)
        if not directory.is_dir():
            raise ConfigError(f"--zmq-curve-clients {clients_dir}: not a directory")
        keys = {
            _certificate(str(path), "--zmq-curve-clients", secret=False)[0]
            for path in sorted(directory.glob("*.key"))
        }
        if not keys:
            raise ConfigError(f"--zmq-curve-clients {clients_dir}: no *.key files")
        allowed = frozenset(keys)
    return CurveConfig(public, secret, server_key, allowed)
