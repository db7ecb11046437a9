"""Block-hash throughput: our canonical CBOR encoder vs cbor2 (what vLLM calls), side by side.

Run: python -m benchmarks.vllm_hash [--tokens 4096] [--block-size 16] [--repeats 15]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable

import cbor2

from kvindex.vllm_hash import HASH_ALGOS, block_hashes, cbor_encode, none_hash


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    tokens = [(i * 7919) % 150_000 for i in range(args.tokens)]
    bs = args.block_size

    def chain_with(encode: Callable[[object], bytes]) -> list[bytes]:
        prev = hashlib.sha256(encode("0")).digest()
        out = []
        for i in range(len(tokens) // bs):
            prev = hashlib.sha256(
                encode((prev, tuple(tokens[i * bs : (i + 1) * bs]), None))
            ).digest()
            out.append(prev)
        return out

    ours = _median_seconds(lambda: chain_with(cbor_encode), args.repeats)
    ref = _median_seconds(
        lambda: chain_with(lambda o: cbor2.dumps(o, canonical=True)), args.repeats
    )
    assert chain_with(cbor_encode) == chain_with(lambda o: cbor2.dumps(o, canonical=True))
    assert chain_with(cbor_encode) == block_hashes(tokens, bs, "sha256_cbor", "0")
    assert (
        none_hash("sha256_cbor", "0") == hashlib.sha256(cbor2.dumps("0", canonical=True)).digest()
    )
    blocks = len(tokens) // bs
    print(f"tokens={len(tokens)} block_size={bs} blocks={blocks} repeats={args.repeats}")
    print(
        f"sha256_cbor chain, own CBOR : median {ours * 1e3:.2f} ms ({blocks / ours:,.0f} blocks/s)"
    )
    print(f"sha256_cbor chain, cbor2    : median {ref * 1e3:.2f} ms ({blocks / ref:,.0f} blocks/s)")
    print(f"ratio own/cbor2             : {ours / ref:.2f}")
    for algo in HASH_ALGOS:
        t = _median_seconds(lambda a=algo: block_hashes(tokens, bs, a, "0"), args.repeats)  # type: ignore[misc]
        print(f"block_hashes {algo:<12}: median {t * 1e3:.2f} ms ({blocks / t:,.0f} blocks/s)")


if __name__ == "__main__":
    main()
