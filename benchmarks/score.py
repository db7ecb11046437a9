"""Score latency by token ids: `Scorer.score_tokens` (content keys + index lookup + sort) for
1k / 8k / 32k-token prompts over 8 / 64 / 512 engines, memory backend, filled index.

Each engine holds a prefix of the prompt of random length (uniform over the prompt's blocks,
so the lookup walks far), plus filler blocks of other prompts (100k keys spread over the
engines). Rows: `gpu` scores every engine, all blocks in GPU; `cand` the same with every
engine passed as a candidate (the picker's call); `tiers` a fifth of the engines hold their
prefix in CPU; `spec` adds speculative entries for 8 engines to the `gpu` index. The `keys`
column is the key computation alone (p50), measured in the same run.

Run: python -m benchmarks.score [--iterations N] [--tokens 1024 ...] [--engines 8 ...]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from kvindex.index import MemoryIndex, Store, StoredBlock, Tier
from kvindex.scoring import Scorer, prompt_keys
from kvindex.speculative import SpeculativeIndex
from kvtools.demo.report import quantile

MODEL = "bench/model"
BLOCK = 16


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """p50, p90 and p99 of a non-empty sample."""
    p50, p90, p99 = (quantile(samples, q) for q in (0.5, 0.9, 0.99))
    assert p50 is not None and p90 is not None and p99 is not None, "no samples"
    return p50, p90, p99


def timed(call: Callable[[], object], iterations: int) -> list[float]:
    for _ in range(min(50, iterations)):
        call()
    out = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - start) / 1e6)
    return out


def fill(
    tokens: list[int], engines: int, rng: random.Random, cpu_share: float = 0.0
) -> tuple[MemoryIndex, list[str]]:
    index = MemoryIndex()
    keys = prompt_keys(MODEL, tokens)
    names = [f"10.{i // 250}.{i % 250}.1:8000" for i in range(engines)]
    engine_hash = 1
    for name in names:
        depth = rng.randint(1, len(keys))
        tier = Tier.CPU if rng.random() < cpu_share else Tier.GPU
        blocks = [StoredBlock(engine_hash + i, (k,)) for i, k in enumerate(keys[:depth])]
        engine_hash += depth
        index.apply(name, [Store(tier, blocks)])
    per_engine = 100_000 // engines
    for name in names:
        filler = [StoredBlock(engine_hash + i, (rng.getrandbits(64),)) for i in range(per_engine)]
        engine_hash += per_engine
        index.apply(name, [Store(Tier.GPU, filler)])
    return index, names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--engines", type=int, nargs="+", default=[8, 64, 512])
    args = parser.parse_args(argv)
    rng = random.Random(7)
    print(f"score_tokens latency, memory index, {args.iterations} calls per row (ms)")
    print(
        f"{'tokens':>7} {'engines':>7} {'mode':>5} {'p50':>8} {'p90':>8} {'p99':>8} {'keys p50':>9}"
    )
    for n_tokens in args.tokens:
        tokens = [rng.randrange(150_000) for _ in range(n_tokens)]
        keys_ms = percentiles(timed(lambda t=tokens: prompt_keys(MODEL, t), args.iterations))
        for engines in args.engines:
            index, names = fill(tokens, engines, random.Random(engines))
            tiered, _ = fill(tokens, engines, random.Random(engines), cpu_share=0.2)
            scorer = Scorer(index)
            tiered_scorer = Scorer(tiered)
            spec = SpeculativeIndex()
            spec_scorer = Scorer(index, speculative=spec)
            for name in names[:8]:
                spec_scorer.record_speculative(name, MODEL, tokens)
            rows: list[tuple[str, Callable[[], object]]] = [
                ("gpu", lambda s=scorer, t=tokens: s.score_tokens(MODEL, t)),
                ("cand", lambda s=scorer, t=tokens, e=names: s.score_tokens(MODEL, t, engines=e)),
                ("tiers", lambda s=tiered_scorer, t=tokens: s.score_tokens(MODEL, t)),
                ("spec", lambda s=spec_scorer, t=tokens: s.score_tokens(MODEL, t)),
            ]
            for mode, call in rows:
                p50, p90, p99 = percentiles(timed(call, args.iterations))
                print(
                    f"{n_tokens:>7} {engines:>7} {mode:>5} {p50:>8.3f} {p90:>8.3f} {p99:>8.3f} "
                    f"{keys_ms[0]:>9.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
