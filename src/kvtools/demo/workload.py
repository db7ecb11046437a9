"""A multi-tenant, shared-prefix chat workload: each tenant has a long system prompt (its
"context"), users hold multi-turn conversations on top of it, requests arrive as a Poisson
process. Deterministic for a seed, pure (no I/O)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

__all__ = ["SIM_GPU_BLOCKS", "ChatRequest", "WorkloadConfig", "generate"]

# Plain words tokenise to about one token each with byte-level BPE tokenizers.
_WORD_TEXT = """
account agent alpha answer archive audit balance batch billing branch bridge budget
cache catalog channel claim client cluster column config contract credit customer data
deadline delivery device digest domain draft engine entry event export factor feature
field filter forecast format gateway grant graph group handler header index invoice
issue item journal kernel label ledger level limit policy portal price profile project
query queue quota record region release report request review route sample schedule
schema scope segment server service session signal source stage status storage stream
summary supplier support table target task tenant ticket token topic trace update usage
user value vendor version volume warehouse window worker
"""
_WORDS = tuple(_WORD_TEXT.split())


# KV blocks per simulated engine: a few tenants' contexts of the default workload, not all.
SIM_GPU_BLOCKS = 480


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    tenants: int = 12
    system_prompt_words: int = 1500
    users_per_tenant: int = 3
    turns: int = 4
    user_words: int = 40
    output_tokens: int = 24
    requests: int = 200
    rate: float = 12.0  # requests per second of wall time
    seed: int = 7


@dataclass(frozen=True, slots=True)
class ChatRequest:
    index: int
    at: float  # seconds from the start
    tenant: int
    user: int
    turn: int
    messages: list[dict[str, Any]]
    max_tokens: int

    def body(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def generate(config: WorkloadConfig) -> list[ChatRequest]:
    """The request sequence: conversations advance turn by turn (a user's next turn carries
    the whole history), tenants and users interleave at random."""
    rng = random.Random(config.seed)
    systems = [
        f"You are the assistant of tenant {t}. Context follows. "
        + _text(rng, config.system_prompt_words)
        for t in range(config.tenants)
    ]
    histories: dict[tuple[int, int], list[dict[str, Any]]] = {}
    turns: dict[tuple[int, int], int] = {}
    requests: list[ChatRequest] = []
    at = 0.0
    conversations = [(t, u) for t in range(config.tenants) for u in range(config.users_per_tenant)]
    for index in range(config.requests):
        tenant, user = rng.choice(conversations)
        key = (tenant, user)
        if turns.get(key, 0) >= config.turns:  # conversation over: the user starts anew
            histories.pop(key, None)
            turns[key] = 0
        history = histories.setdefault(key, [{"role": "system", "content": systems[tenant]}])
        history.append({"role": "user", "content": _text(rng, config.user_words)})
        requests.append(
            ChatRequest(
                index=index,
                at=at,
                tenant=tenant,
                user=user,
                turn=turns.get(key, 0),
                messages=[dict(m) for m in history],
                max_tokens=config.output_tokens,
            )
        )
        # The assistant's reply joins the history; the simulator's text is not needed since
        # only the prefix structure matters for routing.
        history.append({"role": "assistant", "content": _text(rng, config.output_tokens)})
        turns[key] = turns.get(key, 0) + 1
        at += rng.expovariate(config.rate)
    return requests
