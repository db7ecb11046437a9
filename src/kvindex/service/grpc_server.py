"""gRPC edge of the read API (grpc.aio): ``kvindex.v1.KVIndex``, llm-d's
``indexer.v1.IndexerService`` (wire-compatible ``GetPodScores``) and the standard health service
``grpc.health.v1.Health`` (grpcio-health-checking's asyncio servicer, as the epp server uses).

Mount: ``server = build_grpc_server(service)``, then ``port = server.add_insecure_port(addr)``
and ``await server.start()``; or ``add_grpc_services(existing_server, service)``. Errors are
gRPC statuses (see :data:`GRPC_STATUS`) with the reason also in the trailing metadata key
``kvindex-error-reason``; they are counted in the service's metrics (api label ``grpc`` for
kvindex.v1, ``llmd`` for indexer.v1).

Health: the server (``""``) is SERVING from the start; ``await mark_serving(health)`` also
marks the two named services, and ``await health.enter_graceful_shutdown()`` flips all of
them to NOT_SERVING while draining.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvindex._proto.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from kvindex._proto.kvindex.v1 import kvindex_pb2, kvindex_pb2_grpc
from kvindex.scoring import ScoreResult
from kvindex.service.score_api import ErrorKind, ScoreQuery, ScoreRequestError, ScoreService

__all__ = [
    "GRPC_STATUS",
    "INDEXER_SERVICE",
    "KVINDEX_SERVICE",
    "IndexerServicer",
    "KVIndexServicer",
    "add_grpc_services",
    "build_grpc_server",
    "mark_serving",
]

REASON_KEY = "kvindex-error-reason"

GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNKNOWN_MODEL: grpc.StatusCode.NOT_FOUND,
    ErrorKind.NO_TOKENIZER: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNTOKENIZABLE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

# grpc ships no type information (mypy sees Any); the alias documents what is passed.
Context: TypeAlias = Any  # grpc.aio.ServicerContext


async def _abort(context: Context, exc: ScoreRequestError) -> Any:
    context.set_trailing_metadata(((REASON_KEY, exc.reason),))
    await context.abort(GRPC_STATUS[exc.kind], f"{exc.reason}: {exc.message}")


def _salt(request: Any) -> str | None:
    return request.cache_salt if request.HasField("cache_salt") else None


def _flag(request: Any, name: str, default: bool = True) -> bool:
    return bool(getattr(request, name)) if request.HasField(name) else default


def _engines(values: Sequence[str]) -> list[str] | None:
    return list(values) or None


def _score_response(result: ScoreResult) -> Any:
    return kvindex_pb2.ScoreResponse(
        model=result.model,
        lora=result.lora or "",
        block_size=result.block_size,
        total_blocks=result.total_blocks,
        prompt_tokens=result.prompt_tokens,
        scores=[
            kvindex_pb2.EngineScore(
                engine=s.engine,
                matched_blocks=s.matched_blocks,
                score=s.score,
                weighted=s.weighted,
                gpu_blocks=s.by_tier[0],
                cpu_blocks=s.by_tier[1],
                storage_blocks=s.by_tier[2],
                speculative_blocks=s.speculative_blocks,
            )
            for s in result.scores
        ],
    )


def _tools(raw: str) -> list[dict[str, Any]] | None:
    if not raw:
        return None
    try:
        tools = json.loads(raw)
    except ValueError as exc:
        raise ScoreRequestError(
            ErrorKind.INVALID, f"tools_json is not JSON: {exc}", "bad_tools"
        ) from exc
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ScoreRequestError(
            ErrorKind.INVALID, "tools_json must be a JSON array of objects", "bad_tools"
        )
    return tools


class KVIndexServicer(kvindex_pb2_grpc.KVIndexServicer):  # type: ignore[misc]
    def __init__(self, service: ScoreService) -> None:
        self.service = service

    async def _score(self, context: Context, method: str, build: Callable[[], ScoreQuery]) -> Any:
        try:
            query = build()
        except ScoreRequestError as exc:  # refused while decoding: count it here
            self.service.metrics.error("grpc", method, exc.reason)
            return await _abort(context, exc)
        try:
            result = await asyncio.to_thread(self.service.score, query, "grpc", method)
        except ScoreRequestError as exc:  # counted by the service
            return await _abort(context, exc)
        return _score_response(result)

    async def ScoreTokens(self, request: Any, context: Context) -> Any:
        return await self._score(
            context,
            "ScoreTokens",
            lambda: ScoreQuery(
                model=request.model,
                token_ids=list(request.token_ids),
                lora=request.lora or None,
                cache_salt=_salt(request),
                engines=_engines(request.engines),
            ),
        )

    async def ScorePrompt(self, request: Any, context: Context) -> Any:
        return await self._score(
            context,
            "ScorePrompt",
            lambda: ScoreQuery(
                model=request.model,
                prompt=request.prompt,
                add_special_tokens=_flag(request, "add_special_tokens"),
                lora=request.lora or None,
                cache_salt=_salt(request),
                engines=_engines(request.engines),
            ),
        )

    async def ScoreChat(self, request: Any, context: Context) -> Any:
        return await self._score(
            context,
            "ScoreChat",
            lambda: ScoreQuery(
                model=request.model,
                messages=[{"role": m.role, "content": m.content} for m in request.messages],
                tools=_tools(request.tools_json),
                add_generation_prompt=_flag(request, "add_generation_prompt"),
                lora=request.lora or None,
                cache_salt=_salt(request),
                engines=_engines(request.engines),
            ),
        )

    async def RecordSpeculative(self, request: Any, context: Context) -> Any:
        query = ScoreQuery(
            model=request.model,
            token_ids=list(request.token_ids),
            lora=request.lora or None,
            cache_salt=_salt(request),
        )
        try:
            metadata = dict(context.invocation_metadata() or ())
            self.service.authorize(metadata.get("authorization"), "grpc", "speculative")
            n = await asyncio.to_thread(
                self.service.record_speculative, request.engine, query, "grpc"
            )
        except ScoreRequestError as exc:
            return await _abort(context, exc)
        return kvindex_pb2.RecordSpeculativeResponse(recorded_blocks=n)

    async def Stats(self, request: Any, context: Context) -> Any:
        scorer = self.service.scorer
        stats = await asyncio.to_thread(scorer.index.stats)
        self.service.metrics.ok("grpc", "Stats")
        return kvindex_pb2.StatsResponse(
            keys=stats.keys,
            entries=stats.entries,
            engines=stats.engines,
            evictions=stats.evictions,
            approx_bytes=stats.approx_bytes,
            speculative_entries=len(scorer.speculative) if scorer.speculative else 0,
            block_size=scorer.block_size,
        )


class IndexerServicer(indexer_pb2_grpc.IndexerServiceServicer):  # type: ignore[misc]
    """llm-d's ``indexer.v1.IndexerService``: as llm-d's indexer, the score is the
    tier-weighted number of matched prefix blocks and engines with no cached prefix are left
    out (``pod_identifiers`` only restricts the candidates)."""

    def __init__(self, service: ScoreService) -> None:
        self.service = service

    async def GetPodScores(self, request: Any, context: Context) -> Any:
        query = ScoreQuery(
            model=request.model_name,
            prompt=request.prompt,
            engines=_engines(request.pod_identifiers),
        )
        try:
            result = await asyncio.to_thread(self.service.score, query, "llmd", "GetPodScores")
        except ScoreRequestError as exc:
            return await _abort(context, exc)
        return indexer_pb2.GetPodScoresResponse(
            scores=[
                indexer_pb2.PodScore(pod=s.engine, score=s.weighted)
                for s in result.scores
                if s.matched_blocks
            ]
        )


KVINDEX_SERVICE = "kvindex.v1.KVIndex"
INDEXER_SERVICE = "indexer.v1.IndexerService"

HealthServicer = health.aio.HealthServicer


async def mark_serving(servicer: Any, status: Any = health_pb2.HealthCheckResponse.SERVING) -> None:
    """Set the health of the server and both named services (e.g. NOT_SERVING on drain)."""
    for name in ("", KVINDEX_SERVICE, INDEXER_SERVICE):
        await servicer.set(name, status)


def add_grpc_services(
    server: Any, service: ScoreService, health_servicer: Any | None = None
) -> None:
    """Register kvindex.v1.KVIndex, indexer.v1.IndexerService and grpc.health.v1.Health on an
    existing grpc.aio server (the service assembly's ``grpc_servicers`` hook)."""
    # Generated registration helpers are untyped.
    kvindex_pb2_grpc.add_KVIndexServicer_to_server(  # type: ignore[no-untyped-call]
        KVIndexServicer(service), server
    )
    indexer_pb2_grpc.add_IndexerServiceServicer_to_server(  # type: ignore[no-untyped-call]
        IndexerServicer(service), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer or HealthServicer(), server)


def build_grpc_server(
    service: ScoreService,
    health_servicer: Any | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Server:
    """A grpc.aio server with the services of :func:`add_grpc_services` (no port yet:
    ``server.add_insecure_port(address)`` returns the bound port). Pass ``health_servicer``
    (a ``HealthServicer()``) to change statuses later."""
    server = grpc.aio.server(options=list(options))
    add_grpc_services(server, service, health_servicer)
    return server
