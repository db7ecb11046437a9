"""The demo's fallback gateway, used only when a real Envoy cannot start: an aiohttp HTTP
server that plays Envoy's part towards the picker over ext_proc (gRPC).

Per client request it opens one `ExternalProcessor/Process` stream and sends what Envoy's
ext_proc filter sends with the deploy/envoy template's processing mode (request and response
headers SEND, bodies FULL_DUPLEX_STREAMED): the request headers (`:method`, `:path`,
`:authority`, `:scheme`, `content-type`, `x-request-id`, ...) with `protocol_config` on the
first message, then the request body in chunks, the last with `end_of_stream`. It reads the
picker's answers in the order the picker sends them (src/epp/extproc.py): either an
ImmediateResponse (answered to the client as is: status, headers, body) or ONE
HeadersResponse whose header mutation carries `x-gateway-destination-endpoint`, followed by
the re-emitted body as streamed BodyResponses. The request goes to the chosen engine (the
first address of the header, as Envoy's ORIGINAL_DST cluster does; without the header, to
the fallback engine, as the template's fallback route does); the engine's response headers
and body chunks go through the same stream, and what the picker sends back (its response
header mutation, the echoed chunks) goes to the client as it arrives, so SSE streams through
and the picker sees usage and completion exactly as behind Envoy.

Without a picker (the round-robin policy) the gateway balances round-robin itself.

The picker's ext_proc port speaks TLS with a self-signed certificate by default; grpc's
Python client cannot skip certificate verification, so the demo starts the picker with
`--no-secure-serving` (plaintext on loopback) whenever this gateway is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
import grpc
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

__all__ = ["DESTINATION_HEADER", "DirectGateway", "GatewayStats", "GatewayThread"]

DESTINATION_HEADER = "x-gateway-destination-endpoint"
_FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
# Not forwarded in either direction (RFC 9110 7.6.1), plus what aiohttp recomputes.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Envoy's default gRPC message limit: bodies go to the picker in chunks of at most this.
_MAX_CHUNK = 64 * 1024


class ExtProcError(Exception):
    """The picker's stream failed or broke the protocol; Envoy (failure_mode_allow false)
    answers such requests 500."""


@dataclass(slots=True)
class GatewayStats:
    """What the gateway did, per outcome (read by the demo's tests and its log line)."""

    forwarded: int = 0
    immediate: int = 0
    extproc_errors: int = 0
    upstream_errors: int = 0
    client_disconnects: int = 0
    by_destination: dict[str, int] = field(default_factory=dict)


def _header_map(pairs: Mapping[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    )


def _mutated(headers: dict[str, str], mutation: pb.HeaderMutation) -> dict[str, str]:
    out = dict(headers)
    for name in mutation.remove_headers:
        out.pop(name.lower(), None)
    for option in mutation.set_headers:
        header = option.header
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        out[header.key.lower()] = value
    return out


def _chunks(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), _MAX_CHUNK):
        yield body[start : start + _MAX_CHUNK]


class _Stream:
    """One ext_proc stream: writes Envoy's messages, reads the picker's answers."""

    def __init__(self, call: grpc.aio.StreamStreamCall, timeout_s: float) -> None:  # type: ignore[type-arg]
        self.call = call
        self.timeout_s = timeout_s

    async def write(self, message: pb.ProcessingRequest) -> None:
        try:
            await self.call.write(message)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as exc:
            raise ExtProcError(f"ext_proc write failed: {exc}") from exc

    async def read(self) -> pb.ProcessingResponse:
        try:
            message = await asyncio.wait_for(self.call.read(), self.timeout_s)
        except TimeoutError as exc:
            raise ExtProcError(f"picker did not answer within {self.timeout_s:.0f}s") from exc
        except grpc.aio.AioRpcError as exc:
            raise ExtProcError(
                f"ext_proc stream failed: {exc.code().name} {exc.details()}"
            ) from exc
        if message is grpc.aio.EOF:
            raise ExtProcError("picker closed the ext_proc stream early")
        assert isinstance(message, pb.ProcessingResponse)
        return message


@dataclass(slots=True)
class _Decision:
    """The request side's outcome: an immediate answer, or where to send what."""

    immediate: pb.ImmediateResponse | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class DirectGateway:
    """`await DirectGateway(engines, extproc_target=...).start()` -> `.url`; `await stop()`.

    engines: the engines' `ip:port`, in order (round-robin order; the first is the fallback
    destination when the picker sets no destination header). extproc_target: the picker's
    plaintext ext_proc address (`host:port`), or None to balance round-robin without one."""

    def __init__(
        self,
        engines: Sequence[str],
        *,
        extproc_target: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        message_timeout_s: float = 30.0,
        upstream_timeout_s: float = 120.0,
    ) -> None:
        if not engines:
            raise ValueError("the gateway needs at least one engine")
        self.engines = list(engines)
        self.extproc_target = extproc_target
        self.host = host
        self.port = port
        self.message_timeout_s = message_timeout_s
        self.upstream_timeout_s = upstream_timeout_s
        self.stats = GatewayStats()
        self._round_robin = itertools.cycle(self.engines)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> DirectGateway:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.upstream_timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
        )
        if self.extproc_target is not None:
            self._channel = grpc.aio.insecure_channel(self.extproc_target)
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the bound port when port=0
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> DirectGateway:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- per request ------------------------------------------------------------------

    @staticmethod
    def _client_headers(request: web.Request) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            if key not in _HOP_BY_HOP:
                headers[key] = f"{headers[key]},{value}" if key in headers else value
        # Envoy generates a request id when the client sent none.
        headers.setdefault("x-request-id", str(uuid.uuid4()))
        return headers

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = self._client_headers(request)
        if self._channel is None:
            body = await request.read()
            return await self._forward(request, next(self._round_robin), headers, body, None)
        stub = pb_grpc.ExternalProcessorStub(self._channel)
        call = stub.Process()
        stream = _Stream(call, self.message_timeout_s)
        try:
            decision = await self._request_side(request, headers, stream)
            if decision.immediate is not None:
                self.stats.immediate += 1
                return self._immediate(decision.immediate)
            raw = decision.headers.get(DESTINATION_HEADER, "")
            destination = raw.split(",")[0].strip() or self.engines[0]
            return await self._forward(
                request, destination, decision.headers, decision.body, stream
            )
        except ExtProcError as exc:
            self.stats.extproc_errors += 1
            return web.Response(status=500, text=f"ext_proc: {exc}\n")
        finally:
            call.cancel()  # no-op after a clean end; otherwise the picker sees the stream go

    async def _request_side(
        self, request: web.Request, headers: dict[str, str], stream: _Stream
    ) -> _Decision:
        pseudo = {
            ":method": request.method,
            ":path": request.path_qs,
            ":authority": request.host,
            ":scheme": request.scheme,
        }
        has_body = request.body_exists
        first = pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(
                headers=_header_map({**pseudo, **headers}), end_of_stream=not has_body
            )
        )
        first.protocol_config.request_body_mode = _FULL_DUPLEX  # type: ignore[assignment]
        first.protocol_config.response_body_mode = _FULL_DUPLEX  # type: ignore[assignment]
        await stream.write(first)
        writer = asyncio.create_task(self._send_request_body(request, stream)) if has_body else None
        try:
            return await self._read_decision(headers, stream, body_follows=has_body)
        finally:
            if writer is not None:
                if not writer.done():
                    writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, ExtProcError):
                    await writer

    async def _send_request_body(self, request: web.Request, stream: _Stream) -> None:
        """The client's body as it arrives, one chunk held back so that the last one carries
        end_of_stream (Envoy streams it so; an empty body that was announced sends one empty
        end_of_stream chunk)."""
        pending: bytes | None = None
        async for chunk in request.content.iter_chunked(_MAX_CHUNK):
            if pending is not None:
                await stream.write(
                    pb.ProcessingRequest(
                        request_body=pb.HttpBody(body=pending, end_of_stream=False)
                    )
                )
            pending = chunk
        await stream.write(
            pb.ProcessingRequest(request_body=pb.HttpBody(body=pending or b"", end_of_stream=True))
        )

    async def _read_decision(
        self, headers: dict[str, str], stream: _Stream, *, body_follows: bool
    ) -> _Decision:
        decision = _Decision()
        decided = False
        body = bytearray()
        while True:
            message = await stream.read()
            kind = message.WhichOneof("response")
            if kind == "immediate_response":
                decision.immediate = message.immediate_response
                return decision
            if kind == "request_headers" and not decided:
                common = message.request_headers.response
                decision.headers = _mutated(headers, common.header_mutation)
                decided = True
                if not body_follows:
                    return decision
            elif kind == "request_body" and decided:
                streamed = message.request_body.response.body_mutation.streamed_response
                body += streamed.body
                if streamed.end_of_stream:
                    decision.body = bytes(body)
                    return decision
            elif kind == "request_trailers":
                continue  # the gateway sends no trailers; nothing to apply
            else:
                raise ExtProcError(f"unexpected {kind} answer on the request path")

    @staticmethod
    def _immediate(answer: pb.ImmediateResponse) -> web.Response:
        headers = _mutated({}, answer.headers)
        body = answer.body if isinstance(answer.body, bytes) else answer.body.encode()
        content_type = headers.pop("content-type", "text/plain")
        response = web.Response(status=answer.status.code or 200, body=body, headers=headers)
        response.content_type = content_type.split(";")[0].strip()
        return response

    async def _forward(
        self,
        request: web.Request,
        destination: str,
        headers: dict[str, str],
        body: bytes,
        stream: _Stream | None,
    ) -> web.StreamResponse:
        assert self._session is not None
        upstream_headers = {k: v for k, v in headers.items() if not k.startswith(":")}
        url = f"http://{destination}{request.path_qs}"
        try:
            upstream = await self._session.request(
                request.method, url, headers=upstream_headers, data=body or None
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Envoy: upstream connect failure -> 503.
            self.stats.upstream_errors += 1
            return web.Response(status=503, text=f"upstream {destination} unreachable: {exc}\n")
        self.stats.forwarded += 1
        self.stats.by_destination[destination] = self.stats.by_destination.get(destination, 0) + 1
        async with upstream:
            response_headers = {
                k.lower(): v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP
            }
            if stream is None:
                response = web.StreamResponse(status=upstream.status, headers=response_headers)
                await response.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                    await response.write_eof()
                except ConnectionResetError:
                    self.stats.client_disconnects += 1  # the client went away: stop quietly
                return response
            return await self._response_side(request, upstream, response_headers, stream)

    async def _response_side(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        response_headers: dict[str, str],
        stream: _Stream,
    ) -> web.StreamResponse:
        await stream.write(
            pb.ProcessingRequest(
                response_headers=pb.HttpHeaders(
                    headers=_header_map({":status": str(upstream.status), **response_headers})
                )
            )
        )
        answer = await stream.read()
        if answer.WhichOneof("response") == "immediate_response":
            self.stats.immediate += 1
            return self._immediate(answer.immediate_response)
        if answer.WhichOneof("response") != "response_headers":
            raise ExtProcError(f"unexpected {answer.WhichOneof('response')} for response headers")
        client_headers = _mutated(
            response_headers, answer.response_headers.response.header_mutation
        )
        response = web.StreamResponse(status=upstream.status, headers=client_headers)
        await response.prepare(request)
        sent: deque[tuple[bytes, bool]] = deque()

        async def pump() -> None:
            async for chunk in _upstream_chunks(upstream):
                sent.append((chunk, False))
                await stream.write(
                    pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=False))
                )
            sent.append((b"", True))
            await stream.write(
                pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True))
            )

        pumping = asyncio.create_task(pump())
        try:
            await self._stream_back(response, stream, pumping, sent)
        except ExtProcError:
            # Mid-response the status line is out: like Envoy, reset the client's connection.
            self.stats.extproc_errors += 1
            if request.transport is not None:
                request.transport.close()
            return response
        except ConnectionResetError:
            # The client went away (e.g. it stops reading after `data: [DONE]`): stop; the
            # stream is cancelled by the caller, which the picker counts as abandoned if the
            # response had not completed yet - as when a client leaves Envoy.
            self.stats.client_disconnects += 1
            return response
        finally:
            if not pumping.done():
                pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping
        await stream.call.done_writing()
        return response

    async def _stream_back(
        self,
        response: web.StreamResponse,
        stream: _Stream,
        pumping: asyncio.Task[None],
        sent: deque[tuple[bytes, bool]],
    ) -> None:
        """What the picker streams back goes to the client, until end_of_stream."""
        while True:
            reading = asyncio.ensure_future(stream.read())
            await asyncio.wait({reading, pumping}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done() and pumping.done() and pumping.exception() is not None:
                reading.cancel()
                raise ExtProcError(f"upstream body failed: {pumping.exception()!r}")
            message = await reading
            kind = message.WhichOneof("response")
            if kind == "response_trailers":
                continue
            if kind != "response_body":
                raise ExtProcError(f"unexpected {kind} answer on the response path")
            common = message.response_body.response
            if common.HasField("body_mutation"):
                # Full duplex: Envoy forwards exactly what the processor streams back.
                streamed = common.body_mutation.streamed_response
                chunk, last = streamed.body, streamed.end_of_stream
                if sent:
                    sent.popleft()
            else:
                chunk, last = sent.popleft() if sent else (b"", True)
            if chunk:
                await response.write(chunk)
            if last:
                break
        await response.write_eof()


async def _upstream_chunks(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in upstream.content.iter_any():
        for piece in _chunks(chunk):
            yield piece


class GatewayThread:
    """A DirectGateway on its own event loop in a daemon thread, for synchronous callers
    (the demo's cluster setup): `GatewayThread(...).start()` -> `.url`; `.stop()`."""

    def __init__(
        self, engines: Sequence[str], *, extproc_target: str | None = None, port: int = 0
    ) -> None:
        self._engines = list(engines)
        self._extproc_target = extproc_target
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.gateway: DirectGateway | None = None

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    def start(self, timeout_s: float = 10.0) -> GatewayThread:
        self._thread.start()

        async def make() -> DirectGateway:
            gateway = DirectGateway(
                self._engines, extproc_target=self._extproc_target, port=self._port
            )
            return await gateway.start()

        self.gateway = asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout_s)
        return self

    def stop(self) -> None:
        gateway = self.gateway

        async def shutdown() -> None:
            if gateway is not None:
                await gateway.stop()
            # grpc.aio leaves per-call status tasks behind; end them before the loop stops.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
            with contextlib.suppress(Exception):
                future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
