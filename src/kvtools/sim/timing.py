"""Timing model and deterministic output tokens (pure).

Prefill takes `prefill_s_per_token` per *uncached* prompt token, decode `decode_s_per_token`
per output token; all durations are multiplied by `time_scale` (0.01 runs a minute of
cluster time in 0.6 s). Output tokens come from a PRNG seeded by the engine seed and the
prompt, so the same prompt gives the same output on every engine and run.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

# Output "words": token id i renders as WORDS[i % len(WORDS)] (text only; ids drive caching).
WORDS: tuple[str, ...] = (
    " the", " cache", " block", " prefix", " router", " engine", " token", " model",
    " index", " event", " hash", " score", " request", " stream", " queue", " batch",
)  # fmt: skip


@dataclass(frozen=True)
class TimingModel:
    prefill_s_per_token: float = 0.0002
    decode_s_per_token: float = 0.01
    time_scale: float = 1.0

    def prefill_seconds(self, uncached_tokens: int) -> float:
        return max(0, uncached_tokens) * self.prefill_s_per_token * self.time_scale

    def decode_seconds(self, tokens: int = 1) -> float:
        return tokens * self.decode_s_per_token * self.time_scale


def output_tokens(
    seed: int, prompt: Sequence[int], count: int, vocab_size: int = 32_000
) -> list[int]:
    digest = hashlib.sha256(repr((seed, tuple(prompt))).encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return [rng.randrange(vocab_size) for _ in range(count)]


def render_tokens(token_ids: Sequence[int]) -> str:
    return "".join(WORDS[t % len(WORDS)] for t in token_ids)
