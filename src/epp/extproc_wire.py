"""Builders and readers for the ext_proc protobuf messages the state machine exchanges.
The types are Envoy's generated protos from xds-protos; nothing here is hand-written wire."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from envoy.config.core.v3 import base_pb2
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


def decision_response(
    destination: str,
    header_value: str,
    extra_headers: Mapping[str, str],
    on_body: bool = False,
) -> pb.ProcessingResponse:
    """The one decision: destination header `header_value` (overwriting anything the client
    sent), extra headers, route cache cleared, and `destination` (pick + fallbacks) in dynamic
    metadata. It answers the request headers, or (`on_body`, BUFFERED mode) the body."""
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION_HEADER: destination}})
    common = pb.CommonResponse(
        header_mutation=pb.HeaderMutation(
            set_headers=_header_options({DESTINATION_HEADER: header_value, **extra_headers})
        ),
        clear_route_cache=True,
    )
    if on_body:
        return pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata
        )
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata
    )


def request_headers_continue() -> pb.ProcessingResponse:
    """Request headers answered without a decision (BUFFERED mode decides on the body)."""
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=pb.CommonResponse()))


def request_body_chunks(body: bytes, end_of_stream: bool) -> Iterator[pb.ProcessingResponse]:
    """Re-emit the buffered request body (full-duplex mode) in chunks of at most
    MAX_CHUNK_BYTES; the last carries `end_of_stream` (false when trailers follow)."""
    if not body:
        yield pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    body_mutation=pb.BodyMutation(
                        streamed_response=pb.StreamedBodyResponse(
                            body=b"", end_of_stream=end_of_stream
                        )
                    )
                )
            )
        )
        return
    view = memoryview(body)
    for start in range(0, len(body), MAX_CHUNK_BYTES):
        chunk = bytes(view[start : start + MAX_CHUNK_BYTES])
        last = start + MAX_CHUNK_BYTES >= len(body)
        yield pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    body_mutation=pb.BodyMutation(
                        streamed_response=pb.StreamedBodyResponse(
                            body=chunk, end_of_stream=end_of_stream and last
                        )
                    )
                )
            )
        )


def continue_request_body() -> pb.ProcessingResponse:
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse()))


def request_trailers_response() -> pb.ProcessingResponse:
    return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


def response_headers_response(headers: Mapping[str, str]) -> pb.ProcessingResponse:
    """Answer the response headers, adding the scheduler's client-facing headers (e.g. the
    session-affinity `x-session-token`)."""
    common = pb.CommonResponse()
    if headers:
        common.header_mutation.CopyFrom(pb.HeaderMutation(set_headers=_header_options(headers)))
    return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))


def response_body_response(
    chunk: bytes, end_of_stream: bool, full_duplex: bool
) -> pb.ProcessingResponse:
    """Full-duplex mode: Envoy forwards only what the processor sends back, so the chunk is
    echoed as a streamed response. Other modes: CONTINUE leaves the body untouched."""
    if not full_duplex:
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse()))
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(
                        body=chunk, end_of_stream=end_of_stream
                    )
                )
            )
        )
    )


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
