"""Drives a workload through an HTTP gateway (Envoy) open-loop and records per request what
the client saw: time to first token, duration, usage (cached tokens) and the engine that
served it (the simulator's `x-kvsim-engine` header, else the gateway's served-endpoint header)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from kvtools.demo.workload import ChatRequest

__all__ = ["SERVED_HEADER", "RequestResult", "drive"]

# The endpoint (ip:port) that answered, added by Envoy's routes (deploy/envoy, the demo's
# round-robin Envoy) - the picker's served-endpoint header.
SERVED_HEADER = "x-gateway-destination-endpoint-served"


@dataclass(slots=True)
class RequestResult:
    index: int
    tenant: int
    status: int
    engine: str = ""
    ttft_s: float | None = None
    duration_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def _has_token(chunk: dict[str, object]) -> bool:
    """A chunk that carries generated text (the first one is the time to first token; a
    role-only opening chunk does not count)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if isinstance(choice, dict):
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if text:
                return True
    return False


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, request: ChatRequest
) -> RequestResult:
    result = RequestResult(index=request.index, tenant=request.tenant, status=0)
    start = time.perf_counter()
    try:
        async with session.post(url, json=request.body(model)) as response:
            result.status = response.status
            # The simulator names its engine; otherwise the gateway says which ip:port served.
            headers = response.headers
            result.engine = headers.get("x-kvsim-engine") or headers.get(SERVED_HEADER) or ""
            if response.status != 200:
                result.error = (await response.text())[:200]
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if result.ttft_s is None and _has_token(chunk):
                    result.ttft_s = time.perf_counter() - start
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    result.completion_tokens = int(usage.get("completion_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = int(details.get("cached_tokens") or 0)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.duration_s = time.perf_counter() - start
    return result


async def drive(
    url: str,
    model: str,
    requests: Sequence[ChatRequest],
    *,
    timeout_s: float = 60.0,
    on_done: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    """Send every request at its arrival time (open loop: a slow cluster queues, it does not
    slow the arrivals) and return the results in request order."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()

        async def scheduled(request: ChatRequest) -> RequestResult:
            delay = request.at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            result = await _one(session, url, model, request)
            if on_done is not None:
                on_done(result)
            return result

        return list(await asyncio.gather(*(scheduled(r) for r in requests)))
