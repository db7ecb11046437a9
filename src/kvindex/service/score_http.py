"""HTTP JSON edge of the read API (aiohttp handlers). Mount with
``add_score_routes(app, service, stats_provider=...)``:

* ``POST /v1/score``: ``{"model", "token_ids" | "prompt" | "messages", ["tools"],
  ["add_generation_prompt"], ["add_special_tokens"], ["engines"], ["lora"], ["cache_salt"]}``
  -> ``{"model", "lora", "block_size", "total_blocks", "prompt_tokens", "scores": [{"engine",
  "matched_blocks", "score", "weighted", "tiers": {"gpu", "cpu", "storage"},
  "speculative_blocks"}]}``, best first;
* ``POST /v1/speculative``: the same prompt fields plus ``"engine"`` -> ``{"engine",
  "recorded_blocks"}``;
* ``GET|POST /v1/debug``: the doctor report (kvindex.doctor) as JSON; GET takes ``model``,
  ``prompt`` or ``token_ids`` (comma separated), ``lora``, ``cache_salt``, ``engine_url``
  (repeatable); POST takes the score body plus ``"engine_url"`` (string or list).

Errors: ``{"error": {"status", "reason", "message"}}`` with the status of
:data:`kvindex.service.score_api.HTTP_STATUS`, counted in the service metrics (api ``http``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
from aiohttp import web

from kvindex.doctor import EventStatsProvider, compare_tokens, diagnose
from kvindex.scoring import ScoreResult
from kvindex.service.engine_tokens import fetch_engine_tokens, tokenize_body
from kvindex.service.score_api import (
    HTTP_STATUS,
    ErrorKind,
    ScoreQuery,
    ScoreRequestError,
    ScoreService,
)

__all__ = ["ScoreBody", "add_score_routes", "score_json"]

API = "http"


class ScoreBody(msgspec.Struct, kw_only=True):
    """The JSON body of /v1/score, /v1/speculative and POST /v1/debug (unknown fields are
    ignored)."""

    model: str
    token_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    engines: list[str] | None = None
    lora: str | None = None
    cache_salt: str | None = None
    engine: str | None = None  # /v1/speculative
    engine_url: str | list[str] | None = None  # /v1/debug

    def query(self) -> ScoreQuery:
        for i, message in enumerate(self.messages or ()):
            if not isinstance(message.get("role"), str):
                raise ScoreRequestError(
                    ErrorKind.INVALID, f"messages[{i}] needs a string 'role'", "bad_messages"
                )
        return ScoreQuery(
            model=self.model,
            token_ids=self.token_ids,
            prompt=self.prompt,
            messages=self.messages,
            tools=self.tools,
            add_generation_prompt=self.add_generation_prompt,
            add_special_tokens=self.add_special_tokens,
            lora=self.lora,
            cache_salt=self.cache_salt,
            engines=self.engines,
        )

    def engine_urls(self) -> list[str]:
        if self.engine_url is None:
            return []
        return [self.engine_url] if isinstance(self.engine_url, str) else list(self.engine_url)


_decoder = msgspec.json.Decoder(ScoreBody)


def score_json(result: ScoreResult) -> dict[str, Any]:
    return {
        "model": result.model,
        "lora": result.lora,
        "block_size": result.block_size,
        "total_blocks": result.total_blocks,
        "prompt_tokens": result.prompt_tokens,
        "scores": [
            {
                "engine": s.engine,
                "matched_blocks": s.matched_blocks,
                "score": s.score,
                "weighted": s.weighted,
                "tiers": dict(zip(("gpu", "cpu", "storage"), s.by_tier, strict=True)),
                "speculative_blocks": s.speculative_blocks,
            }
            for s in result.scores
        ],
    }


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


def _error(exc: ScoreRequestError) -> web.Response:
    status = HTTP_STATUS[exc.kind]
    return _json(
        {"error": {"status": status, "reason": exc.reason, "message": exc.message}}, status
    )


class _Routes:
    def __init__(
        self,
        service: ScoreService,
        stats_provider: EventStatsProvider | None,
        max_body_bytes: int,
        engine_timeout_s: float,
    ) -> None:
        self.service = service
        self.stats_provider = stats_provider
        self.max_body_bytes = max_body_bytes
        self.engine_timeout_s = engine_timeout_s

    async def _body(self, request: web.Request, method: str) -> ScoreBody:
        """Decode the body; refusals here are counted here (the service never saw them)."""
        try:
            if request.content_length is not None and request.content_length > self.max_body_bytes:
                raise self._too_large(request.content_length)
            raw = await self._read_bounded(request)
            try:
                return _decoder.decode(raw)
            except RecursionError as exc:
                # JSON nested deeper than the decoder recurses (e.g. 100k brackets in an
                # ignored field): a client error, not a 500 with a traceback.
                raise ScoreRequestError(
                    ErrorKind.INVALID, "body is nested too deeply", "too_deep"
                ) from exc
            except msgspec.ValidationError as exc:
                raise ScoreRequestError(
                    ErrorKind.INVALID, f"bad request: {exc}", "bad_field"
                ) from exc
            except msgspec.DecodeError as exc:
                raise ScoreRequestError(
                    ErrorKind.INVALID, f"body is not JSON: {exc}", "bad_json"
                ) from exc
        except ScoreRequestError as exc:
            self.service.metrics.error(API, method, exc.reason)
            raise

    async def _read_bounded(self, request: web.Request) -> bytes:
        """The whole body (chunked or not), refused as soon as it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(1 << 16):
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int) -> ScoreRequestError:
        return ScoreRequestError(
            ErrorKind.TOO_LARGE,
            f"request body of {size} bytes is over the limit of {self.max_body_bytes}",
            "body_too_large",
        )

    def _query(self, body: ScoreBody, method: str) -> ScoreQuery:
        try:
            return body.query()
        except ScoreRequestError as exc:
            self.service.metrics.error(API, method, exc.reason)
            raise

    async def score(self, request: web.Request) -> web.Response:
        try:
            query = self._query(await self._body(request, "score"), "score")
            result = await asyncio.to_thread(self.service.score, query, API, "score")
        except ScoreRequestError as exc:
            return _error(exc)
        return _json(score_json(result))

    async def speculative(self, request: web.Request) -> web.Response:
        try:
            self.service.authorize(request.headers.get("Authorization"), API, "speculative")
            body = await self._body(request, "speculative")
            query = self._query(body, "speculative")
            n = await asyncio.to_thread(
                self.service.record_speculative, body.engine or "", query, API
            )
        except ScoreRequestError as exc:
            return _error(exc)
        return _json({"engine": body.engine, "recorded_blocks": n})

    async def debug(self, request: web.Request) -> web.Response:
        try:
            self.service.authorize(request.headers.get("Authorization"), API, "debug")
            if request.method == "GET":
                body = self._debug_query(request)
            else:
                body = await self._body(request, "debug")
            query = self._query(body, "debug")
            self._check_engine_urls(body.engine_urls())
            tokens, result = await asyncio.to_thread(
                self.service.score_detailed, query, API, "debug"
            )
        except ScoreRequestError as exc:
            return _error(exc)
        checks = await self._token_checks(body.engine_urls(), query, tokens.token_ids)
        events = list(self.stats_provider()) if self.stats_provider is not None else []
        report = await asyncio.to_thread(
            diagnose, self.service.scorer.index, result, events, checks, query.cache_salt
        )
        return _json(report.to_builtins())

    def _check_engine_urls(self, urls: Sequence[str]) -> None:
        """/v1/debug fetches each engine's /tokenize: only from engines the index knows, by
        a plain http(s)://host:port URL, so the endpoint cannot be used to reach anything
        else (server-side request forgery)."""
        for url in urls:
            engine = engine_key_of_url(url)
            if engine is None or not self.service.knows(engine):
                self.service.metrics.error(API, "debug", "unknown_engine_url")
                raise ScoreRequestError(
                    ErrorKind.INVALID,
                    f"engine_url {url[:120]!r} is not http(s)://<host>:<port> of an engine the "
                    "index knows (discovered or publishing KV events)",
                    "unknown_engine_url",
                )

    def _debug_query(self, request: web.Request) -> ScoreBody:
        params = request.query
        try:
            raw_ids = params.get("token_ids")
            token_ids = [int(t) for t in raw_ids.split(",") if t.strip()] if raw_ids else None
        except ValueError as exc:
            self.service.metrics.error(API, "debug", "bad_field")
            raise ScoreRequestError(
                ErrorKind.INVALID, "token_ids must be comma-separated integers", "bad_field"
            ) from exc
        return ScoreBody(
            model=params.get("model", ""),
            token_ids=token_ids,
            prompt=params.get("prompt"),
            lora=params.get("lora"),
            cache_salt=params.get("cache_salt"),
            engine_url=params.getall("engine_url", []) or None,
        )

    async def _token_checks(
        self, urls: Sequence[str], query: ScoreQuery, ours: Sequence[int]
    ) -> list[Any]:
        body = tokenize_body(query)
        if not urls or body is None:
            return []
        timeout = aiohttp.ClientTimeout(total=self.engine_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            answers = await asyncio.gather(
                *(fetch_engine_tokens(session, url, body) for url in urls)
            )
        return [
            compare_tokens(url, ours, tokens, error)
            for url, (tokens, error) in zip(urls, answers, strict=True)
        ]


def engine_key_of_url(url: str) -> str | None:
    """``host:port`` (an engine key) of ``http(s)://host[:port][/]``; None for anything else
    (user info, a path, a query, another scheme)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def add_score_routes(
    app: web.Application,
    service: ScoreService,
    *,
    stats_provider: EventStatsProvider | None = None,
    max_body_bytes: int = 8 << 20,
    engine_timeout_s: float = 5.0,
) -> None:
    """Mount /v1/score, /v1/speculative and /v1/debug on ``app``. ``stats_provider`` feeds the
    doctor's per-engine event statistics (the subscriber's state)."""
    routes = _Routes(service, stats_provider, max_body_bytes, engine_timeout_s)
    app.router.add_post("/v1/score", routes.score)
    app.router.add_post("/v1/speculative", routes.speculative)
    app.router.add_get("/v1/debug", routes.debug)
    app.router.add_post("/v1/debug", routes.debug)
