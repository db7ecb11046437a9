"""A picker request as a kvindex score query."""

from __future__ import annotations

from collections.abc import Sequence

from epp.types import LLMRequest
from kvindex.service.score_api import ScoreQuery


def score_query(request: LLMRequest, engines: Sequence[str] | None = None) -> ScoreQuery:
    """Token ids when the request carries them (or a scorer already tokenized it), else its
    chat messages or completion prompt. The model is the base model; the adapter goes as
    the LoRA, so the keys are rooted exactly as the engine roots its blocks."""
    model = request.base_model or request.model
    common = {
        "model": model,
        "lora": request.lora,
        "cache_salt": request.cache_salt,
        "engines": list(engines) if engines is not None else None,
    }
    if request.token_ids is not None:
        return ScoreQuery(token_ids=request.token_ids, **common)  # type: ignore[arg-type]
    if request.messages is not None:
        return ScoreQuery(messages=request.messages, tools=request.tools, **common)  # type: ignore[arg-type]
    return ScoreQuery(prompt=request.prompt or "", **common)  # type: ignore[arg-type]
