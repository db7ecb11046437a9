"""One simulated vLLM server: an aiohttp app over one or more engine cores (DP ranks), each
with its own KV-event publisher. Routes: the OpenAI API subset routing cares about, vLLM's
`/tokenize`, `/health`, `/metrics`, `/reset_prefix_cache`, and `/admin/*` fault knobs."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from kvindex.engines import DEFAULT_KV_EVENTS_ENDPOINT
from kvtools.sim.api import (
    BadRequest,
    ParsedRequest,
    chat_body,
    completion_body,
    error_body,
    models_body,
    parse_generation,
    parse_tokenize,
    stream_chunk,
    tokenize_body,
    usage,
    usage_chunk,
)
from kvtools.sim.engine import Admitted, EngineConfig, EngineCore, EngineRequest, RequestRejected
from kvtools.sim.events import EventEncoding, HashFormat
from kvtools.sim.metrics import EngineCollector, render_metrics
from kvtools.sim.publisher import EventPublisher, offset_endpoint_port
from kvtools.sim.timing import render_tokens

if TYPE_CHECKING:
    from kvindex.tokenize import Tokenizer

ENGINE_HEADER = "x-kvsim-engine"
DP_RANK_HEADER = "x-kvsim-dp-rank"
# vLLM's header for pinning a request to a DP rank.
REQUEST_DP_RANK_HEADER = "X-data-parallel-rank"


@dataclass
class KVEventsOptions:
    """Per-server KV-event settings (vLLM's --kv-events-config)."""

    endpoint: str | None = DEFAULT_KV_EVENTS_ENDPOINT  # None disables publishing
    replay_endpoint: str | None = None
    topic: str | None = None  # None -> "kv@<advertise_host>:<http port>@<model>"
    encoding: EventEncoding = "map"
    hash_format: HashFormat = "int"
    buffer_steps: int = 10_000
    hwm: int = 100_000
    legacy_replay: bool = False


@dataclass
class Faults:
    metrics_delay_s: float = 0.0


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_events: KVEventsOptions = field(default_factory=KVEventsOptions)
    engine_id: str = "engine-0"
    data_parallel_size: int = 1
    advertise_host: str = "127.0.0.1"


def _compact(obj: Any) -> str:
    return msgspec.json.encode(obj).decode()


def _json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    # Compact JSON, as vLLM's pydantic responses are.
    return web.json_response(body, status=status, headers=headers, dumps=_compact)


class _NullSink:
    def publish(self, events: list[Any], ts: float | None = None) -> None:
        return None


class SimServer:
    """Build with a config and tokenizer, then `await start(host, port)` (port 0 = any)."""

    def __init__(self, config: ServerConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.faults = Faults()
        self.bad_requests: Counter[str] = Counter()
        self.engines: list[EngineCore] = []
        self.publishers: list[EventPublisher | None] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.advertise_host}:{self.port}"

    def topic(self) -> str:
        kv = self.config.kv_events
        if kv.topic is not None:
            return kv.topic
        return f"kv@{self.config.advertise_host}:{self.port}@{self.config.engine.model}"

    def _make_publisher(self, rank: int) -> EventPublisher | None:
        kv = self.config.kv_events
        endpoint = offset_endpoint_port(kv.endpoint, rank)
        if endpoint is None:
            return None
        return EventPublisher(
            endpoint,
            offset_endpoint_port(kv.replay_endpoint, rank),
            self.topic(),
            encoding=kv.encoding,
            hash_format=kv.hash_format,
            data_parallel_rank=rank,
            buffer_steps=kv.buffer_steps,
            hwm=kv.hwm,
            legacy_replay=kv.legacy_replay,
            drop_seed=rank,
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.port = int(sock.getsockname()[1])
        try:
            for rank in range(self.config.data_parallel_size):
                publisher = self._make_publisher(rank)
                self.publishers.append(publisher)
                sink = publisher if publisher is not None else _NullSink()
                self.engines.append(
                    EngineCore(
                        self.config.engine,
                        sink,
                        engine_id=self.config.engine_id,
                        data_parallel_rank=rank,
                    )
                )
            # Short shutdown: a deliberately slow /metrics must not hold up stop(). A client
            # that disconnects cancels its handler, so its request is aborted and its slot
            # and blocks freed at once (vLLM's API server: `with_cancellation`).
            self._runner = web.AppRunner(
                self.build_app(),
                access_log=None,
                shutdown_timeout=0.5,
                handler_cancellation=True,
            )
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for publisher in self.publishers:
            if publisher is not None:
                await asyncio.to_thread(publisher.close)
        self.publishers = []

    # ----------------------------------------------------------------- routing helpers

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._engine_header])
        routes: dict[tuple[str, str], Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.models,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("GET", "/metrics"): self.metrics,
            ("POST", "/reset_prefix_cache"): self.reset_prefix_cache,
            ("GET", "/admin/state"): self.admin_state,
            ("POST", "/admin/faults"): self.admin_faults,
            ("POST", "/admin/restart"): self.admin_restart,
        }
        for (method, path), handler in routes.items():
            app.router.add_route(method, path, handler)
        return app

    @web.middleware
    async def _engine_header(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if not response.prepared:
            response.headers.setdefault(ENGINE_HEADER, self.config.engine_id)
        return response

    def _error(self, exc: BadRequest) -> web.Response:
        self.bad_requests[exc.reason] += 1
        return _json_response(error_body(str(exc), exc.status, exc.param), status=exc.status)

    async def _json(self, request: web.Request) -> object:
        raw = await request.read()
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}", "bad_json") from None

    def pick_engine(self, request: web.Request) -> EngineCore:
        pinned = request.headers.get(REQUEST_DP_RANK_HEADER)
        if pinned is not None:
            if not pinned.isdigit() or int(pinned) >= len(self.engines):
                raise BadRequest(
                    f"{REQUEST_DP_RANK_HEADER} must be 0..{len(self.engines) - 1}", "bad_dp_rank"
                )
            return self.engines[int(pinned)]
        return min(self.engines, key=lambda e: (e.load, e.data_parallel_rank))

    # ----------------------------------------------------------------- handlers

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        cfg = self.config.engine
        return _json_response(models_body(cfg.model, cfg.lora_adapters, cfg.max_model_len))

    async def tokenize(self, request: web.Request) -> web.Response:
        cfg = self.config.engine
        try:
            body = await self._json(request)
            tokens = parse_tokenize(body, cfg.model, cfg.lora_adapters, self.tokenizer)
        except BadRequest as exc:
            return self._error(exc)
        return _json_response(tokenize_body(tokens, cfg.max_model_len))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        cfg = self.config.engine
        try:
            body = await self._json(request)
            parsed = parse_generation(
                body,
                chat=chat,
                base_model=cfg.model,
                loras=cfg.lora_adapters,
                tokenizer=self.tokenizer,
            )
            core = self.pick_engine(request)
        except BadRequest as exc:
            return self._error(exc)
        engine_request = EngineRequest(
            request_id=core.new_request_id(),
            prompt_token_ids=parsed.prompt_token_ids,
            max_tokens=parsed.max_tokens,
            lora_name=parsed.lora_name,
            cache_salt=parsed.cache_salt,
            kv_cache_report_mode=parsed.kv_cache_report_mode,
        )
        stream = core.generate(engine_request)
        try:
            first = await anext(stream)
        except RequestRejected as exc:
            return self._error(BadRequest(str(exc), "rejected"))
        assert isinstance(first, Admitted)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        headers = {
            ENGINE_HEADER: self.config.engine_id,
            DP_RANK_HEADER: str(core.data_parallel_rank),
        }
        try:
            if parsed.stream:
                return await self._stream(request, stream, parsed, first, rid, chat, headers)
            tokens = [t async for t in stream if isinstance(t, int)]
        finally:
            await stream.aclose()
        use = usage(len(parsed.prompt_token_ids), len(tokens), first.cached_tokens)
        make = chat_body if chat else completion_body
        body_out = make(rid, parsed.model, render_tokens(tokens), "length", use)
        return _json_response(body_out, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        stream: Any,
        parsed: ParsedRequest,
        first: Admitted,
        rid: str,
        chat: bool,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        await response.prepare(request)

        async def send(obj: object) -> None:
            await response.write(b"data: " + msgspec.json.encode(obj) + b"\n\n")

        model = parsed.model
        if chat:
            await send(stream_chunk(rid, model, chat=True, piece="", finish=None, first=True))
        count = 0
        async for token in stream:
            if isinstance(token, int):
                count += 1
                piece = render_tokens([token])
                await send(stream_chunk(rid, model, chat=chat, piece=piece, finish=None))
        await send(stream_chunk(rid, model, chat=chat, piece=None if chat else "", finish="length"))
        if parsed.include_usage:
            use = usage(len(parsed.prompt_token_ids), count, first.cached_tokens)
            await send(usage_chunk(rid, model, chat=chat, use=use))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        if self.faults.metrics_delay_s > 0:
            await asyncio.sleep(self.faults.metrics_delay_s)
        collector = EngineCollector(
            lambda: self.engines, self.config.engine.model, lambda: dict(self.bad_requests)
        )
        return web.Response(
            body=render_metrics(collector),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        for core in self.engines:
            core.reset_prefix_cache()
        return web.Response(status=200)

    # ----------------------------------------------------------------- admin / faults

    async def admin_state(self, request: web.Request) -> web.Response:
        return _json_response(self.state())

    def state(self) -> dict[str, Any]:
        ranks = []
        for core, pub in zip(self.engines, self.publishers, strict=True):
            ranks.append(
                {
                    "data_parallel_rank": core.data_parallel_rank,
                    "running": len(core.running),
                    "waiting": len(core.waiting),
                    "cached_blocks": core.pool.num_cached,
                    "free_blocks": core.pool.num_free,
                    "next_seq": None if pub is None else pub.next_seq,
                    "endpoint": None if pub is None else pub.bound_endpoint,
                    "replay_endpoint": None if pub is None else pub.bound_replay_endpoint,
                    "dropped_batches": None if pub is None else pub.stats.dropped,
                }
            )
        return {"engine_id": self.config.engine_id, "topic": self.topic(), "ranks": ranks}

    async def admin_faults(self, request: web.Request) -> web.Response:
        """Body: {"drop_fraction": 0..1, "publishing": bool, "metrics_delay_s": float}."""
        try:
            body = await self._json(request)
            if not isinstance(body, dict):
                raise BadRequest("body must be a JSON object", "bad_json")
            self.apply_faults(**body)
        except (BadRequest, TypeError, ValueError) as exc:
            bad = exc if isinstance(exc, BadRequest) else BadRequest(str(exc), "bad_fault")
            return self._error(bad)
        return _json_response(self.state())

    def apply_faults(
        self,
        drop_fraction: float | None = None,
        publishing: bool | None = None,
        metrics_delay_s: float | None = None,
    ) -> None:
        if drop_fraction is not None and (
            not isinstance(drop_fraction, int | float) or not 0 <= drop_fraction <= 1
        ):
            raise ValueError("drop_fraction must be a number in [0, 1]")
        if metrics_delay_s is not None and (
            not isinstance(metrics_delay_s, int | float) or metrics_delay_s < 0
        ):
            raise ValueError("metrics_delay_s must be a number >= 0")
        if publishing is not None and not isinstance(publishing, bool):
            raise ValueError("publishing must be a boolean")
        for pub in self.publishers:
            if pub is None:
                continue
            if drop_fraction is not None:
                pub.drop_fraction = float(drop_fraction)
            if publishing is not None:
                pub.paused = not publishing
        if metrics_delay_s is not None:
            self.faults.metrics_delay_s = float(metrics_delay_s)

    async def admin_restart(self, request: web.Request) -> web.Response:
        """Restart every rank's engine process: publisher seq back to 0, cache emptied."""
        await self.restart_engines()
        return _json_response(self.state())

    async def restart_engines(self) -> None:
        for core, pub in zip(self.engines, self.publishers, strict=True):
            core.restart()
            if pub is not None:
                await asyncio.to_thread(pub.restart)
