"""Ask an engine for its token ids of a prompt (vLLM's ``POST /tokenize``), for the doctor's
tokenizer cross-check. vLLM shapes: ``{"model", "prompt", "add_special_tokens"}`` or
``{"model", "messages", "add_generation_prompt"}`` -> ``{"tokens": [...], ...}``."""

from __future__ import annotations

from typing import Any

import aiohttp

from kvindex.service.score_api import ScoreQuery

__all__ = ["fetch_engine_tokens", "tokenize_body"]


def tokenize_body(query: ScoreQuery) -> dict[str, Any] | None:
    """The /tokenize request for a query, or None for token-id queries (nothing to compare)."""
    if query.prompt is not None:
        return {
            "model": query.model,
            "prompt": query.prompt,
            "add_special_tokens": query.add_special_tokens,
        }
    if query.messages is not None:
        body: dict[str, Any] = {
            "model": query.model,
            "messages": [dict(m) for m in query.messages],
            "add_generation_prompt": query.add_generation_prompt,
        }
        if query.tools:
            body["tools"] = [dict(t) for t in query.tools]
        return body
    return None


async def fetch_engine_tokens(
    session: aiohttp.ClientSession, engine_url: str, body: dict[str, Any]
) -> tuple[list[int] | None, str | None]:
    """(token ids, None) or (None, what went wrong); never raises for engine trouble."""
    url = engine_url.rstrip("/") + "/tokenize"
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                text = (await response.text())[:200]
                return None, f"POST {url} answered {response.status}: {text}"
            data = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return None, f"POST {url} failed: {exc!r}"
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        return None, f"POST {url} answered without a 'tokens' list of ints"
    return tokens, None
