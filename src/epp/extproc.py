"""The ext_proc stream state machine: one gRPC stream per HTTP request.

Request path (Envoy: request headers SEND, body FULL_DUPLEX_STREAMED, trailers SEND):
headers arrive -> body chunks are buffered to end_of_stream -> parse + schedule -> ONE
HeadersResponse carrying the destination -> the body re-emitted as streamed chunks -> the
trailers answer, if trailers came. A headers-only request is decided on its headers. If
Envoy reports (protocol_config) that the request body is not sent full-duplex, the decision is
BUFFERED, the headers are answered CONTINUE and the decision rides on the body answer
(Envoy holds the headers until then); in any other mode (NONE, STREAMED) the decision is made
on the headers alone and body messages are answered CONTINUE.

Response path: headers (status, streaming?), body chunks passed straight back, usage read
as it passes, and `Scheduler.on_response_complete` once at the end - also when the client
goes away mid-stream, so that plugins counting in-flight requests never leak. When Envoy sends
no response body (response_body_mode NONE, or skipped through mode_override because no plugin
reads it), the end of the ext_proc stream is the end of the response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp import extproc_wire as wire
from epp.metrics import EppMetrics
from epp.requests import ParseError, RequestParser
from epp.responses import UsageCollector
from epp.types import Endpoint, LLMRequest, ResponseStats, Scheduler, SchedulingError

log = logging.getLogger(__name__)

_FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
_BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
_BUFFERED_PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
# Modes where Envoy holds the request headers and sends the body as ONE message.
_HELD_HEADER_MODES = frozenset({_BUFFERED, _BUFFERED_PARTIAL})
_UNSET_MODE = processing_mode_pb2.ProcessingMode.NONE
DEFAULT_MAX_BODY_BYTES = 10 << 20
# Status recorded for a response the client abandoned (nginx's "client closed request").
CLIENT_CLOSED_STATUS = 499

Responses = list[pb.ProcessingResponse]
_REQUEST_KINDS = frozenset({"request_headers", "request_body", "request_trailers"})


@dataclass(slots=True)
class PickerContext:
    """What every stream shares: the scheduler, the current endpoints and the limits."""

    scheduler: Scheduler
    endpoints: Callable[[], Sequence[Endpoint]]
    parser: RequestParser
    metrics: EppMetrics
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Assumed when Envoy does not send protocol_config (older Envoy): the documented setup.
    default_full_duplex: bool = True
    # The protocol puts pick + fallbacks in the header. Envoy's ORIGINAL_DST cluster parses
    # the header as ONE address (a list gives 503), so with it the header may carry only the
    # pick; dynamic metadata always carries the whole list.
    header_primary_only: bool = False
    # Whether a plugin reads the response body (its first byte's time, the token usage):
    # see `response_body_needed`. When none does, the picker asks Envoy (mode_override) to
    # skip response bodies where its config allows that.
    response_body_needed: bool = True
    # Set once a stream showed Envoy sending no response bodies while a plugin needs them.
    warned_no_body: bool = False
    # ext_proc streams open now, and who to tell when one opens (the engine-metrics scraper
    # scrapes at its fast interval only while the picker has traffic).
    open_streams: int = 0
    on_stream_open: Callable[[], None] | None = None
    # Whether an edge that can answer a stream unasked (the h2 edge) makes scheduled
    # requests evictable (`LLMRequest.evict`, flow control's in-flight eviction).
    evictable: bool = True

    def stream_opened(self) -> None:
        self.open_streams += 1
        self.metrics.inflight_streams.inc()
        if self.on_stream_open is not None:
            self.on_stream_open()

    def stream_closed(self) -> None:
        self.open_streams -= 1
        self.metrics.inflight_streams.dec()


class RequestStream:
    """State of one ext_proc stream. `handle` maps one ProcessingRequest to the responses to
    send, in order; `done` turns true after an immediate response (Envoy ends the stream)."""

    def __init__(self, ctx: PickerContext) -> None:
        self.ctx = ctx
        self.done = False
        self.saw_request_headers = False
        self.started_at = time.monotonic()
        self.headers: dict[str, str] = {}
        # The body's chunks as received, joined once to decide: one chunk (the usual case)
        # is used as is, no copy.
        self.body_chunks: list[bytes] = []
        self.body_size = 0
        self.subset_hint: frozenset[str] | None = None
        default_mode = _FULL_DUPLEX if ctx.default_full_duplex else _UNSET_MODE
        self.request_body_mode: int = default_mode
        self.response_body_full_duplex = ctx.default_full_duplex
        self.response_body_mode: int = default_mode
        # Response headers seen and no body will come (Envoy's response body mode NONE):
        # the end of the stream is the end of the response.
        self.ends_with_stream = False
        self.request: LLMRequest | None = None
        self.destination: list[str] = []
        self.client_response_headers: dict[str, str] = {}
        self.decided_at = 0.0
        self.decided = False
        # response side
        self.served: str | None = None
        self.status = 0
        self.streamed = False
        self.first_byte_at: float | None = None
        self.usage: UsageCollector | None = None
        self.completed = False
        # Set by an edge that can send on the stream unasked (the h2 edge): sends these
        # responses and ends the stream; False when it cannot now. Makes requests evictable.
        self.push: Callable[[Responses], bool] | None = None
        self.evicted = False

    # -- dispatch ---------------------------------------------------------------------

    async def handle(self, message: pb.ProcessingRequest) -> Responses:
        if message.HasField("protocol_config"):
            config = message.protocol_config
            if config.request_body_mode != _UNSET_MODE:
                self.request_body_mode = config.request_body_mode
            self.response_body_mode = config.response_body_mode
            self.response_body_full_duplex = config.response_body_mode == _FULL_DUPLEX
        kind = message.WhichOneof("request")
        handler = _HANDLERS.get(kind or "")
        if handler is None:
            self.ctx.metrics.skipped.labels(what=f"extproc_message_{kind}").inc()
            return []
        if (kind == "request_headers") == self.saw_request_headers and kind in _REQUEST_KINDS:
            # Request headers twice, or request body/trailers before them: not a stream
            # Envoy sends; ignoring it keeps one decision per stream.
            self.ctx.metrics.skipped.labels(what=f"extproc_out_of_order_{kind}").inc()
            return []
        if kind == "request_headers":
            self.saw_request_headers = True
        return await handler(self, message)

    # -- request path -----------------------------------------------------------------

    async def _on_request_headers(self, message: pb.ProcessingRequest) -> Responses:
        self.headers = wire.header_map(message.request_headers)
        self.subset_hint = wire.subset_hint(message.metadata_context)
        if message.request_headers.end_of_stream:
            return await self._decide(body_follows=False, trailers_follow=False)
        if self.request_body_mode == _FULL_DUPLEX:
            return []  # Envoy streams the body without waiting for us
        if self.request_body_mode in _HELD_HEADER_MODES:
            return [wire.request_headers_continue()]  # the decision rides on the body answer
        return await self._decide(body_follows=False, trailers_follow=False, body_parsed=False)

    async def _on_request_body(self, message: pb.ProcessingRequest) -> Responses:
        if self.decided:
            # Body sent neither full-duplex nor buffered: decided on the headers already.
            return [wire.continue_request_body()]
        chunk = message.request_body.body
        if self.body_size + len(chunk) > self.ctx.max_body_bytes:
            return self._reject(
                413,
                "request-too-large",
                f"request body exceeds the limit of {self.ctx.max_body_bytes} bytes",
            )
        if chunk:
            self.body_chunks.append(chunk)
            self.body_size += len(chunk)
        eos = message.request_body.end_of_stream
        if eos or self.request_body_mode in _HELD_HEADER_MODES:
            # Buffered modes send the whole body (or all Envoy would buffer) at once, also
            # when trailers follow; the headers are still held, so decide now.
            return await self._decide(body_follows=True, trailers_follow=not eos)
        if self.request_body_mode != _FULL_DUPLEX:
            return [wire.continue_request_body()]  # STREAMED/NONE: decided on the headers
        return []

    async def _on_request_trailers(self, message: pb.ProcessingRequest) -> Responses:
        responses: Responses = []
        if not self.decided:
            # Trailers end the body: decide now; the re-emitted body is not end_of_stream.
            responses = await self._decide(body_follows=True, trailers_follow=True)
            if self.done:
                return responses
        return [*responses, wire.request_trailers_response()]

    def _evict(self, status: int, reason: str, message: str) -> bool:
        """End a scheduled request's stream with an immediate answer (flow control's
        in-flight eviction): Envoy answers the client (or resets it, once the response has
        begun) and resets the engine's request."""
        if self.done or self.completed or self.push is None or not self.destination:
            return False
        self.done = self.evicted = True
        log.info("evicting request %s: %s %s", self.headers.get(":path"), status, reason)
        if not self.push([wire.immediate_response(status, reason, message)]):
            self.done = self.evicted = False
            return False
        return True

    def _reject(self, status: int, reason: str, message: str) -> Responses:
        model = self.request.model if self.request is not None else ""
        self.ctx.metrics.request_error_total.labels(model=model, error_code=str(status)).inc()
        self.done = True
        log.info(
            "rejecting request %s: %s %s (%s)", self.headers.get(":path"), status, reason, message
        )
        return [wire.immediate_response(status, reason, message)]

    async def _decide(
        self, body_follows: bool, trailers_follow: bool, body_parsed: bool = True
    ) -> Responses:
        self.decided = True
        body = b"".join(self.body_chunks)
        try:
            request = self.ctx.parser.parse(
                self.headers, body, self.subset_hint, body_available=body_parsed
            )
        except ParseError as exc:
            return self._reject(400, "malformed-request", exc.message)
        self.request = request
        if self.push is not None:
            request.evict = self._evict
        candidates: Sequence[Endpoint] = self.ctx.endpoints()
        if not candidates:
            return self._reject(503, "rejected-no-endpoints", "no ready endpoints in the pool")
        if self.subset_hint is not None:
            hint = self.subset_hint
            candidates = [e for e in candidates if e.key in hint]
            if not candidates:
                return self._reject(
                    503,
                    "rejected-no-endpoints",
                    "no ready endpoint is in the proxy's subset hint "
                    f"({', '.join(sorted(hint)) or 'empty'})",
                )
        began = time.perf_counter()
        try:
            result = await self.ctx.scheduler.schedule(request, candidates)
        except SchedulingError as exc:
            return self._reject(exc.status, exc.reason, exc.message)
        except Exception as exc:  # a broken plugin must not take the picker down
            log.exception("scheduler failed")
            return self._reject(500, "scheduler-error", f"scheduler failed: {exc!r}")
        finally:
            self.ctx.metrics.scheduler_e2e_duration.observe(time.perf_counter() - began)
        endpoints = result.endpoints
        if not endpoints:
            return self._reject(503, "rejected-no-endpoints", "the scheduler picked no endpoint")
        self.destination = [e.key for e in endpoints]
        self.client_response_headers = dict(result.response_headers)
        self.decided_at = time.monotonic()
        self.ctx.metrics.request_total.labels(
            model=request.model, target_model=request.base_model
        ).inc()
        destination = ",".join(self.destination)
        header = self.destination[0] if self.ctx.header_primary_only else destination
        on_body = body_follows and self.request_body_mode in _HELD_HEADER_MODES
        extra, new_body = result.headers, None
        if request.requested_model and body_follows:
            # An InferenceModelRewrite changed the model: the engine gets the new body.
            body = new_body = request.raw_body
            extra = {**extra, "content-length": str(len(body))}
        responses = [wire.decision_response(destination, header, extra, on_body, new_body)]
        if on_body:
            return responses
        if body_follows:
            responses.extend(wire.request_body_chunks(body, end_of_stream=not trailers_follow))
        self.body_chunks = []  # re-emitted; drop our copy (LLMRequest keeps raw_body)
        return responses

    # -- response path ----------------------------------------------------------------

    async def _on_response_headers(self, message: pb.ProcessingRequest) -> Responses:
        headers = wire.header_map(message.response_headers)
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        self.streamed = headers.get("content-type", "").startswith("text/event-stream")
        self.served = (
            wire.served_endpoint(message.metadata_context)
            or headers.get(wire.DESTINATION_SERVED_KEY)
            or (self.destination[0] if self.destination else None)
        )
        if not 200 <= self.status < 300:
            self.ctx.metrics.model_server_errors.labels(status=str(self.status)).inc()
        self.usage = UsageCollector(streamed=self.streamed)
        if self.request is not None:
            try:
                self.ctx.scheduler.on_response_headers(self.request, self.served)
            except Exception:
                log.exception("scheduler on_response_headers failed")
        if message.response_headers.end_of_stream:
            self._complete()
            return [wire.response_headers_response(self.client_response_headers)]
        skip_body = False
        if self.response_body_mode == _UNSET_MODE:
            # Envoy sends no response body (response_body_mode NONE): the stream ends with
            # the response (response_trailer_mode SEND keeps it open until then).
            self.ends_with_stream = True
            if self.ctx.response_body_needed and not self.ctx.warned_no_body:
                self.ctx.warned_no_body = True
                log.warning(
                    "Envoy sends no response bodies (response_body_mode NONE) but a "
                    "configured plugin reads them (first-byte time, token usage); set "
                    "response_body_mode: STREAMED in the ext_proc filter"
                )
        elif (
            not self.ctx.response_body_needed
            and self.response_body_mode != _FULL_DUPLEX
            and self.request_body_mode != _FULL_DUPLEX
        ):
            # No plugin reads the body and Envoy may change the mode (it refuses overrides
            # when either body is FULL_DUPLEX_STREAMED): skip the body, keep the trailers.
            skip_body = self.ends_with_stream = True
        return [wire.response_headers_response(self.client_response_headers, skip_body)]

    async def _on_response_body(self, message: pb.ProcessingRequest) -> Responses:
        body = message.response_body
        if body.body and self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        if self.usage is not None:
            self.usage.feed(body.body)
        if body.end_of_stream:
            self._complete()
        return [
            wire.response_body_response(
                body.body, body.end_of_stream, self.response_body_full_duplex
            )
        ]

    async def _on_response_trailers(self, message: pb.ProcessingRequest) -> Responses:
        self._complete()
        return [wire.response_trailers_response()]

    def _complete(self, abandoned: bool = False) -> None:
        """Report the response once: stats to the scheduler, latency and usage to metrics."""
        if self.completed or self.request is None or not self.destination:
            return
        self.completed = True
        now = time.monotonic()
        request = self.request
        labels = {"model": request.model, "target_model": request.base_model}
        usage = self.usage.finish() if self.usage is not None else None
        if self.usage is not None and self.usage.skipped:
            self.ctx.metrics.skipped.labels(what="response_usage").inc(self.usage.skipped)
        first_byte_s = self.first_byte_at - self.decided_at if self.first_byte_at else None
        stats = ResponseStats(
            served=self.served or self.destination[0],
            status=CLIENT_CLOSED_STATUS if abandoned else self.status,
            streamed=self.streamed,
            started_at=self.decided_at,
            first_byte_s=first_byte_s,
            duration_s=now - self.decided_at,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            cached_tokens=usage.cached_tokens if usage else None,
            usage=usage.raw if usage else None,
        )
        metrics = self.ctx.metrics
        if abandoned:
            metrics.client_disconnects.inc()
        else:
            metrics.request_duration.labels(**labels).observe(now - self.started_at)
            if first_byte_s is not None:
                metrics.request_ttft.labels(**labels).observe(first_byte_s)
        if usage is not None:
            if usage.prompt_tokens is not None:
                metrics.input_tokens.labels(**labels).inc(usage.prompt_tokens)
            if usage.completion_tokens is not None:
                metrics.output_tokens.labels(**labels).inc(usage.completion_tokens)
                if first_byte_s is not None and usage.completion_tokens > 1 and not abandoned:
                    tpot = (stats.duration_s or 0.0) - first_byte_s
                    metrics.request_tpot.labels(**labels).observe(
                        max(tpot, 0.0) / (usage.completion_tokens - 1)
                    )
            if usage.cached_tokens is not None:
                metrics.cached_tokens.labels(**labels).inc(usage.cached_tokens)
        try:
            self.ctx.scheduler.on_response_complete(request, stats)
        except Exception:
            log.exception("scheduler on_response_complete failed")

    def close(self) -> None:
        """The stream ended (normally or not). A scheduled request whose response did not
        finish is reported as abandoned so that per-request state in plugins is released.
        Without response bodies the stream's end is the response's end (Envoy closes it
        when the HTTP stream is done; a client gone mid-response cannot be told apart)."""
        self._complete(abandoned=self.evicted or not self.ends_with_stream)
        if self.request is not None:
            self.request.evict = None  # a bound method of this stream: no cycle left behind


# The handler of each ProcessingRequest kind. Kept on the class, not as bound methods on
# each stream: those would make every stream a reference cycle, so a finished stream, its
# request, body and token ids would wait for the garbage collector instead of being freed at
# once, and each collection would walk them (an 8k-token request's id list is 8k entries).
_HANDLERS: dict[str, Callable[[RequestStream, pb.ProcessingRequest], Awaitable[Responses]]] = {
    "request_headers": RequestStream._on_request_headers,
    "request_body": RequestStream._on_request_body,
    "request_trailers": RequestStream._on_request_trailers,
    "response_headers": RequestStream._on_response_headers,
    "response_body": RequestStream._on_response_body,
    "response_trailers": RequestStream._on_response_trailers,
}


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """`envoy.service.ext_proc.v3.ExternalProcessor/Process` over grpc.aio."""

    def __init__(self, ctx: PickerContext) -> None:
        self.ctx = ctx

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stream = RequestStream(self.ctx)
        self.ctx.stream_opened()
        try:
            async for message in request_iterator:
                for response in await stream.handle(message):
                    yield response
                if stream.done:
                    return
        finally:
            self.ctx.stream_closed()
            stream.close()


def add_to_server(server: grpc.aio.Server, ctx: PickerContext) -> ExternalProcessor:
    servicer = ExternalProcessor(ctx)
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    return servicer
