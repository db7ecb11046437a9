"""Test helpers: a deterministic scheduler double, ProcessingRequest builders and a real
ext_proc server (the picker's HTTP/2 edge or grpc.aio's, see EXTPROC_SERVER) + a grpc.aio
client on a loopback port chosen at run time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from epp.extproc import PickerContext, add_to_server
from epp.h2edge.server import H2ExtProcServer
from epp.metrics import EppMetrics
from epp.requests import RequestParser
from epp.types import (
    Endpoint,
    LLMRequest,
    ProfileResult,
    ResponseStats,
    SchedulingError,
    SchedulingResult,
)

# The edge ExtProcHarness serves with; the `extproc_server` fixture (conftest) sets it.
EXTPROC_SERVER = "h2"


@dataclass
class LeastWaitingScheduler:
    """Test double of the pure scheduling framework: least waiting first, ties by key;
    `fallbacks` extra endpoints in order; raises `error` if set."""

    fallbacks: int = 0
    error: SchedulingError | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    scheduled: list[LLMRequest] = field(default_factory=list)
    candidates: list[list[str]] = field(default_factory=list)
    served: list[str | None] = field(default_factory=list)
    completed: list[ResponseStats] = field(default_factory=list)

    async def schedule(
        self, request: LLMRequest, endpoints: Sequence[Endpoint]
    ) -> SchedulingResult:
        self.scheduled.append(request)
        self.candidates.append(sorted(e.key for e in endpoints))
        if self.error is not None:
            raise self.error
        ordered = sorted(endpoints, key=lambda e: (e.metrics.waiting, e.key))
        picked = ordered[: 1 + self.fallbacks]
        return SchedulingResult(
            profiles={"default": ProfileResult("default", picked)},
            primary_profile="default",
            headers=dict(self.extra_headers),
        )

    def on_response_headers(self, request: LLMRequest, served: str | None) -> None:
        self.served.append(served)

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        self.completed.append(stats)


def endpoints(*specs: tuple[str, int, int]) -> list[Endpoint]:
    out = []
    for address, port, waiting in specs:
        ep = Endpoint(address=address, port=port)
        ep.metrics.waiting = waiting
        out.append(ep)
    return out


def _headers(pairs: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    )


def request_headers(
    path: str = "/v1/chat/completions",
    end_of_stream: bool = False,
    extra: dict[str, str] | None = None,
    subset: list[str] | None = None,
    body_mode: int | None = None,
) -> pb.ProcessingRequest:
    headers = {":method": "POST", ":path": path, ":authority": "gw", **(extra or {})}
    message = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=_headers(headers), end_of_stream=end_of_stream)
    )
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        message.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    if body_mode is not None:
        message.protocol_config.request_body_mode = body_mode  # type: ignore[assignment]
        message.protocol_config.response_body_mode = body_mode  # type: ignore[assignment]
    return message


def request_body(chunk: bytes, end_of_stream: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=chunk, end_of_stream=end_of_stream))


def response_headers(
    status: int = 200, content_type: str = "application/json", served: str | None = None
) -> pb.ProcessingRequest:
    message = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=_headers({":status": str(status), "content-type": content_type})
        )
    )
    if served is not None:
        lb = struct_pb2.Struct()
        lb.update({"x-gateway-destination-endpoint-served": served})
        message.metadata_context.filter_metadata["envoy.lb"].CopyFrom(lb)
    return message


def response_body(chunk: bytes, end_of_stream: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=end_of_stream))


def header_mutation(response: pb.ProcessingResponse) -> dict[str, str]:
    common = response.request_headers.response
    return {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}


def immediate_headers(response: pb.ProcessingResponse) -> dict[str, str]:
    return {
        o.header.key: o.header.raw_value.decode()
        for o in response.immediate_response.headers.set_headers
    }


class ExtProcHarness:
    """A real ext_proc server (EXTPROC_SERVER: "h2" or "grpcio") with the picker's stream
    state machine, and one grpc.aio client channel."""

    def __init__(
        self, eps: list[Endpoint], scheduler: Any, server: str | None = None, **ctx_args: Any
    ) -> None:
        self.eps = eps
        self.scheduler = scheduler
        self.metrics = EppMetrics()
        self.ctx = PickerContext(
            scheduler=scheduler,
            endpoints=lambda: self.eps,
            parser=ctx_args.pop("parser", RequestParser()),
            metrics=self.metrics,
            **ctx_args,
        )
        self.kind = server or EXTPROC_SERVER
        self.server: Any = None
        self.port = 0
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> ExtProcHarness:
        if self.kind == "h2":
            self.server = H2ExtProcServer(self.ctx, health=lambda service: None)
            self.port = await self.server.bind("127.0.0.1", 0)
            await self.server.start_serving()
        else:
            self.server = grpc.aio.server()
            add_to_server(self.server, self.ctx)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.channel is not None
        await self.channel.close()
        if self.kind == "h2":
            await self.server.stop()
        else:
            await self.server.stop(None)

    def stub(self) -> pb_grpc.ExternalProcessorStub:
        return pb_grpc.ExternalProcessorStub(self.channel)

    async def exchange(
        self, messages: list[pb.ProcessingRequest], expect: int
    ) -> list[pb.ProcessingResponse]:
        """Send all messages, read `expect` responses, then half-close and check the server
        sends nothing more."""
        call = self.stub().Process()
        for message in messages:
            await call.write(message)
        out = []
        for _ in range(expect):
            out.append(await asyncio.wait_for(call.read(), 10))
        await call.done_writing()
        extra = await asyncio.wait_for(call.read(), 10)
        assert extra is grpc.aio.EOF, f"unexpected extra response {extra}"
        return out


async def messages_of(call: Any) -> AsyncIterator[pb.ProcessingResponse]:
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            return
        yield message
