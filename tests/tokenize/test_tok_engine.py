"""EngineTokenizer against a real aiohttp server on loopback that implements vLLM's /tokenize
and render endpoints with the local backend (so engine ids == local ids is checkable)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvindex.tokenize import (
    ChatTemplateError,
    EngineTokenizer,
    TokenizationError,
    load_tokenizer,
)
from kvindex.tokenize.local import LocalTokenizer

MODEL = "acme/chat"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
    },
]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@dataclass
class FakeVllm:
    """The endpoints' request/response shapes as vLLM serves them; ids from LocalTokenizer."""

    tok: LocalTokenizer
    bodies: list[dict[str, Any]] = field(default_factory=list)
    hang: asyncio.Event = field(default_factory=asyncio.Event)
    mode: str = "ok"  # ok | hang | garbage | legacy-error

    def _check(self, body: dict[str, Any]) -> web.Response | None:
        if self.mode == "garbage":
            return web.Response(text="<html>proxy</html>", content_type="text/html")
        if self.mode == "bad-shape":
            return web.json_response({"tokens": "nope", "token_ids": None})
        if body.get("model") != MODEL:
            message = f"The model `{body.get('model')}` does not exist."
            if self.mode == "legacy-error":
                payload: dict[str, Any] = {"object": "error", "message": message, "code": 404}
            else:
                payload = {"error": {"message": message, "type": "NotFoundError", "code": 404}}
            return web.json_response(payload, status=404)
        return None

    def _chat(self, body: dict[str, Any]) -> list[int]:
        kwargs = dict(body.get("chat_template_kwargs") or {})
        if body.get("continue_final_message"):
            kwargs["continue_final_message"] = True
        if body.get("add_special_tokens"):
            kwargs["add_special_tokens"] = True
        ids = self.tok.apply_chat_template(
            body["messages"], body.get("add_generation_prompt", True), body.get("tools"), **kwargs
        )
        return ids

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "hang":
            await self.hang.wait()
        if (error := self._check(body)) is not None:
            return error
        if "messages" in body:
            try:
                ids = self._chat(body)
            except ChatTemplateError as exc:
                return web.json_response(
                    {"error": {"message": f"chat template error: {exc}", "code": 400}}, status=400
                )
        else:
            ids = self.tok.encode(body["prompt"], body.get("add_special_tokens", True))
        return web.json_response({"count": len(ids), "max_model_len": 8192, "tokens": ids})

    async def render_completion(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if (error := self._check(body)) is not None:
            return error
        ids = self.tok.encode(body["prompt"], body.get("add_special_tokens", True))
        return web.json_response([{"token_ids": ids, "features": None, "cache_salt": None}])

    async def render_chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if (error := self._check(body)) is not None:
            return error
        return web.json_response({"token_ids": self._chat(body), "sampling_params": {}})


@pytest.fixture
async def engine(tokenizer_dirs: dict[str, Path]) -> AsyncIterator[tuple[str, FakeVllm]]:
    fake = FakeVllm(load_tokenizer(tokenizer_dirs["llama3"]))
    app = web.Application()
    app.router.add_post("/tokenize", fake.tokenize)
    app.router.add_post("/v1/completions/render", fake.render_completion)
    app.router.add_post("/v1/chat/completions/render", fake.render_chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/", fake
    finally:
        fake.hang.set()
        await runner.cleanup()


@pytest.mark.parametrize("style", ["tokenize", "render"])
async def test_engine_ids_equal_local_ids(
    style: str, engine: tuple[str, FakeVllm], tokenizer_dirs: dict[str, Path]
) -> None:
    url, fake = engine
    local = load_tokenizer(tokenizer_dirs["llama3"])
    async with EngineTokenizer(url, MODEL, style=style) as remote:  # type: ignore[arg-type]
        for add_special in (True, False):
            assert await remote.encode("Hello world", add_special) == local.encode(
                "Hello world", add_special
            )
        for agp in (True, False):
            got = await remote.apply_chat_template(MESSAGES, add_generation_prompt=agp)
            assert got == local.apply_chat_template(MESSAGES, add_generation_prompt=agp)
        got = await remote.apply_chat_template(MESSAGES, tools=TOOLS, date_string="2 Feb")
        assert got == local.apply_chat_template(MESSAGES, tools=TOOLS, date_string="2 Feb")
        doubled = await remote.apply_chat_template(MESSAGES, add_special_tokens=True)
        assert fake.bodies[-1]["add_special_tokens"] is True
        assert doubled == local.apply_chat_template(MESSAGES, add_special_tokens=True)
    last = fake.bodies[-2]
    assert last["tools"] == TOOLS and last["chat_template_kwargs"] == {"date_string": "2 Feb"}
    assert last["add_generation_prompt"] is True and last["model"] == MODEL


async def test_shared_session_is_not_closed(engine: tuple[str, FakeVllm]) -> None:
    url, _ = engine
    async with aiohttp.ClientSession() as session:
        remote = EngineTokenizer(url, MODEL, session)
        assert await remote.encode("x")
        await remote.close()
        assert not session.closed
        assert await remote.encode("y")


@pytest.mark.parametrize("mode", ["ok", "legacy-error"])
async def test_http_errors_carry_the_engine_message(
    mode: str, engine: tuple[str, FakeVllm]
) -> None:
    url, fake = engine
    fake.mode = mode
    async with EngineTokenizer(url, "other-model") as remote:
        with pytest.raises(TokenizationError, match=r"HTTP 404: The model `other-model` does not"):
            await remote.encode("x")


async def test_template_errors_map_to_chat_template_error(engine: tuple[str, FakeVllm]) -> None:
    url, _ = engine
    async with EngineTokenizer(url, MODEL) as remote:
        with pytest.raises(ChatTemplateError, match="HTTP 400"):
            await remote.apply_chat_template([], add_generation_prompt=True)


@pytest.mark.parametrize("mode", ["garbage", "bad-shape"])
async def test_malformed_answers_are_errors(mode: str, engine: tuple[str, FakeVllm]) -> None:
    url, fake = engine
    fake.mode = mode
    for style in ("tokenize", "render"):
        async with EngineTokenizer(url, MODEL, style=style) as remote:  # type: ignore[arg-type]
            with pytest.raises(TokenizationError):
                await remote.encode("x")


async def test_timeout_is_reported(engine: tuple[str, FakeVllm]) -> None:
    url, fake = engine
    fake.mode = "hang"
    async with EngineTokenizer(url, MODEL, timeout_s=0.2) as remote:
        with pytest.raises(TokenizationError, match=r"did not answer within 0\.2s"):
            await remote.encode("x")


async def test_unreachable_engine_is_reported() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        async with EngineTokenizer(f"http://127.0.0.1:{port}", MODEL) as remote:
            with pytest.raises(TokenizationError, match="cannot reach engine"):
                await remote.encode("x")
    with pytest.raises(ValueError, match="style"):
        EngineTokenizer("http://x", MODEL, style="grpc")  # type: ignore[arg-type]
