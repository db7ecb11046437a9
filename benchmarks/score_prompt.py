"""Score by prompt end to end (`ScoreService.score`: tokenize the chat with the model's
template, compute keys, look up, score), with and without the tokenization cache, side by side
in one run. The demo's model (DeepSeek tokenizer.json + a ChatML template), an 8k-token shared
system prompt with a short varying user turn, 64 engines holding prefixes of it.

Run: python -m benchmarks.score_prompt [--requests N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from kvindex.index import MemoryIndex, Store, StoredBlock, Tier
from kvindex.scoring import Scorer, prompt_keys
from kvindex.service.score_api import ScoreQuery, ScoreService
from kvindex.tokenize import TokenizationCacheConfig, TokenizerRegistry
from kvtools.demo.model import MODEL_NAME, write_model_dir

WORDS = [
    "cache",
    "block",
    "engine",
    "prefix",
    "router",
    "token",
    "tenant",
    "request",
    "policy",
    "index",
]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--engines", type=int, default=64)
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model")
        system = _text(rng, 7000)
        turns = [_text(rng, 30) for _ in range(args.requests)]
        services: dict[str, ScoreService] = {}
        index = MemoryIndex()
        for mode, cache in (
            ("cache on", None),
            ("cache off", TokenizationCacheConfig(enabled=False)),
        ):
            registry = TokenizerRegistry({MODEL_NAME: str(model_dir)}, cache=cache)
            services[mode] = ScoreService(Scorer(index), registry)
        # Fill the index: engine i holds a random-length prefix of the shared prompt.
        first = [{"role": "system", "content": system}, {"role": "user", "content": turns[0]}]
        ids = services["cache off"].tokenize(ScoreQuery(model=MODEL_NAME, messages=first)).token_ids
        keys = prompt_keys(MODEL_NAME, ids)
        for e in range(args.engines):
            n = rng.randint(1, len(keys))
            blocks = [StoredBlock(h, (k,)) for h, k in enumerate(keys[:n])]
            index.apply(f"10.0.{e // 250}.{e % 250}:8000", [Store(Tier.GPU, blocks)])
        timings: dict[str, list[float]] = {mode: [] for mode in services}
        for turn in turns:  # interleaved A/B, same requests for both
            messages = [{"role": "system", "content": system}, {"role": "user", "content": turn}]
            results = []
            for mode, service in services.items():
                start = time.perf_counter()
                results.append(
                    service.score(ScoreQuery(model=MODEL_NAME, messages=messages), "bench")
                )
                timings[mode].append((time.perf_counter() - start) * 1000)
            assert results[0].scores == results[1].scores
        print(
            f"score by chat prompt, {len(ids)} tokens, {args.engines} engines, "
            f"{args.requests} requests per mode (ms)"
        )
        print(f"{'mode':>10} {'p50':>8} {'p90':>8} {'p99':>8}")
        for mode, values in timings.items():
            q = statistics.quantiles(values, n=100)
            print(f"{mode:>10} {statistics.median(values):8.3f} {q[89]:8.3f} {q[98]:8.3f}")
        ratio = statistics.median(timings["cache off"]) / statistics.median(timings["cache on"])
        print(f"speed-up with the cache (p50): {ratio:.1f}x")


if __name__ == "__main__":
    main()
