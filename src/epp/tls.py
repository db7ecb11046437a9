"""TLS material for the picker's gRPC port: a self-signed certificate generated at start
(the reference EPP's default), or a certificate and key read from files."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed_certificate(
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"), days: int = 365
) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): ECDSA P-256, valid for `hosts` and this host's
    name. Proxies talking to the picker do not verify it (as with the reference EPP)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in (*hosts, socket.gethostname()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-d-epp")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def load_certificate(cert_path: str, key_path: str) -> tuple[bytes, bytes]:
    try:
        return Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS certificate/key: {exc}") from None
