"""The listener of the picker's own ext_proc edge: asyncio TCP (TLS with ALPN h2, or
plaintext HTTP/2 with prior knowledge, as Envoy's gRPC client speaks), one H2Connection per
accepted connection, and a graceful drain (GOAWAY, open streams finish, then close)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
from pathlib import Path

from epp.extproc import PickerContext
from epp.h2edge.connection import H2Connection, HealthLookup

__all__ = ["H2ExtProcServer", "server_ssl_context"]

# Room for the re-emitted request body plus the ext_proc envelope; a ProcessingRequest is
# one body chunk, which Envoy keeps far smaller.
_MESSAGE_SLACK = 1 << 20


def server_ssl_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+ with ALPN h2. `ssl` loads keys only from files: the PEM goes through a
    private temporary directory that is removed at once."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory(prefix="epp-tls-") as directory:
        cert_file = Path(directory) / "cert.pem"
        key_file = Path(directory) / "key.pem"
        cert_file.write_bytes(cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        context.load_cert_chain(cert_file, key_file)
    return context


class H2ExtProcServer:
    def __init__(
        self,
        ctx: PickerContext,
        health: HealthLookup,
        ssl_context: ssl.SSLContext | None = None,
        *,
        serve_process: bool = True,
        port_name: str = "ext_proc",
    ) -> None:
        self.ctx = ctx
        self.health = health
        self.ssl_context = ssl_context
        # False for the health port: Health/Check and Health/Watch only.
        self.serve_process = serve_process
        self.port_name = port_name  # for errors: "ext_proc port ..." / "health port ..."
        self.connections: set[H2Connection] = set()
        self._server: asyncio.Server | None = None
        self.max_message = ctx.max_body_bytes + _MESSAGE_SLACK

    def _connection(self) -> H2Connection:
        connection = H2Connection(
            self.ctx,
            self.health,
            self.connections.discard,
            max_message=self.max_message,
            serve_process=self.serve_process,
        )
        self.connections.add(connection)
        return connection

    async def bind(self, host: str, port: int) -> int:
        """Bind without accepting yet (see `start_serving`); returns the bound port (`port`
        0 picks a free one). A port in use raises OSError naming it."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._connection,
                host,
                port,
                ssl=self.ssl_context,
                reuse_address=True,
                start_serving=False,
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"{self.port_name} port {host}:{port}: {exc.strerror}"
            ) from exc
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def start_serving(self) -> None:
        assert self._server is not None, "bind first"
        await self._server.start_serving()

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, GOAWAY every connection, wait up to `grace_s` for open streams,
        then close what is left."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.goaway()
            connection.end_watches()  # they would hold the drain for its whole grace
        waits = [c.idle.wait() for c in self.connections]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout=max(grace_s, 0.0))
        await self.stop()

    def notify(self, service: str) -> None:
        """The health status of `service` may have changed: tell the Watch streams."""
        for connection in list(self.connections):
            connection.notify_watchers(service)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
