"""Builders and readers for the ext_proc protobuf messages the state machine exchanges.
The types are Envoy's generated protos from xds-protos; nothing here is hand-written wire."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2  # type: ignore[import-untyped]

DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_SERVED_KEY = "x-gateway-destination-endpoint-served"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
# Envoy's gRPC message limit is 4 MiB by default; the reference EPP re-emits bodies in
# chunks of about 62,000 bytes.
MAX_CHUNK_BYTES = 62_000

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    """Lower-case name -> value. Envoy fills `raw_value` (bytes); older ones `value`.
    Repeated headers are joined with ',' as HTTP allows."""
    out: dict[str, str] = {}
    for header in headers.headers.headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        key = header.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _struct_field(metadata: base_pb2.Metadata, namespace: str, key: str) -> struct_pb2.Value | None:
    if namespace not in metadata.filter_metadata:
        return None
    fields = metadata.filter_metadata[namespace].fields
    return fields.get(key, None)


def subset_hint(metadata: base_pb2.Metadata) -> frozenset[str] | None:
    """The proxy's candidate subset (a list of `ip:port`, or one comma-separated string)."""
    value = _struct_field(metadata, SUBSET_HINT_NAMESPACE, SUBSET_HINT_KEY)
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        items = [v.string_value for v in value.list_value.values if v.string_value]
    elif kind == "string_value":
        items = [s.strip() for s in value.string_value.split(",") if s.strip()]
    else:
        return None
    return frozenset(items)


def served_endpoint(metadata: base_pb2.Metadata) -> str | None:
    value = _struct_field(metadata, LB_NAMESPACE, DESTINATION_SERVED_KEY)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return value.string_value or None


def _header_options(headers: Mapping[str, str]) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
            append_action=_OVERWRITE,
        )
        for name, value in headers.items()
    ]


# The per-request builders below fill a message in place through its fields: nested
# keyword constructors copy every submessage they are given (about 5x slower here).


def _set_headers(mutation: pb.HeaderMutation, headers: Mapping[str, str]) -> None:
    add = mutation.set_headers.add
    for name, value in headers.items():
        option = add()
        option.header.key = name
        option.header.raw_value = value.encode()
        option.append_action = _OVERWRITE


def decision_response(
    destination: str,
    header_value: str,
    extra_headers: Mapping[str, str],
    on_body: bool = False,
    body: bytes | None = None,
) -> pb.ProcessingResponse:
    """The one decision: destination header `header_value` (overwriting anything the client
    sent), extra headers, route cache cleared, and `destination` (pick + fallbacks) in dynamic
    metadata. It answers the request headers, or (`on_body`, BUFFERED mode) the body, which
    `body` then replaces (a rewritten model)."""
    response = pb.ProcessingResponse()
    common = (response.request_body if on_body else response.request_headers).response
    if on_body and body is not None:
        common.body_mutation.body = body
    _set_headers(common.header_mutation, {DESTINATION_HEADER: header_value, **extra_headers})
    common.clear_route_cache = True
    namespace = response.dynamic_metadata.fields[LB_NAMESPACE].struct_value
    namespace.fields[DESTINATION_HEADER].string_value = destination
    return response


def request_headers_continue() -> pb.ProcessingResponse:
    """Request headers answered without a decision (BUFFERED mode decides on the body)."""
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=pb.CommonResponse()))


def _streamed_body(body: pb.BodyResponse, chunk: bytes, end_of_stream: bool) -> None:
    streamed = body.response.body_mutation.streamed_response
    streamed.SetInParent()  # present even when empty (an empty last chunk)
    streamed.body = chunk
    streamed.end_of_stream = end_of_stream


def request_body_chunks(body: bytes, end_of_stream: bool) -> Iterator[pb.ProcessingResponse]:
    """Re-emit the buffered request body (full-duplex mode) in chunks of at most
    MAX_CHUNK_BYTES; the last carries `end_of_stream` (false when trailers follow)."""
    size = len(body)
    if size <= MAX_CHUNK_BYTES:
        response = pb.ProcessingResponse()
        _streamed_body(response.request_body, body, end_of_stream)
        yield response
        return
    view = memoryview(body)
    for start in range(0, size, MAX_CHUNK_BYTES):
        response = pb.ProcessingResponse()
        last = start + MAX_CHUNK_BYTES >= size
        chunk = bytes(view[start : start + MAX_CHUNK_BYTES])
        _streamed_body(response.request_body, chunk, end_of_stream and last)
        yield response


def continue_request_body() -> pb.ProcessingResponse:
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse()))


def request_trailers_response() -> pb.ProcessingResponse:
    return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


def response_headers_response(
    headers: Mapping[str, str], skip_response_body: bool = False
) -> pb.ProcessingResponse:
    """Answer the response headers, adding the scheduler's client-facing headers (e.g. the
    session-affinity `x-session-token`). `skip_response_body`: also ask Envoy (mode_override,
    honoured when its filter has `allow_mode_override: true` and neither body is
    FULL_DUPLEX_STREAMED) to send no response body, only the trailers, which keeps the stream
    open until the response ends."""
    response = pb.ProcessingResponse()
    common = response.response_headers.response
    common.SetInParent()
    if headers:
        _set_headers(common.header_mutation, headers)
    if skip_response_body:
        mode = response.mode_override
        mode.response_body_mode = processing_mode_pb2.ProcessingMode.NONE
        mode.response_trailer_mode = processing_mode_pb2.ProcessingMode.SEND
    return response


def response_body_response(
    chunk: bytes, end_of_stream: bool, full_duplex: bool
) -> pb.ProcessingResponse:
    """Full-duplex mode: Envoy forwards only what the processor sends back, so the chunk is
    echoed as a streamed response. Other modes: CONTINUE leaves the body untouched."""
    response = pb.ProcessingResponse()
    if not full_duplex:
        response.response_body.response.SetInParent()
        return response
    _streamed_body(response.response_body, chunk, end_of_stream)
    return response


def response_trailers_response() -> pb.ProcessingResponse:
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def immediate_response(status: int, reason: str, message: str) -> pb.ProcessingResponse:
    """Answer the client directly; Envoy ends the stream after this."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=pb.HeaderMutation(
                set_headers=_header_options(
                    {DROPPED_REASON_HEADER: reason, "content-type": "text/plain"}
                )
            ),
            body=(message + "\n").encode(),
            details=reason,
        )
    )
