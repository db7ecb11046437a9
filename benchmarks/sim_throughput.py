"""Simulator throughput: completions per second through one in-process engine at time-scale 0
(HTTP + hashing + block pool + event publishing), map vs array encoding side by side.

Run: python -m benchmarks.sim_throughput [--requests 400] [--concurrency 16] [--prompt-tokens 512]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp

from kvtools.sim.engine import EngineConfig
from kvtools.sim.events import EventEncoding
from kvtools.sim.http import KVEventsOptions, ServerConfig, SimServer
from kvtools.sim.timing import TimingModel
from kvtools.sim.tokenizer import ByteTokenizer


async def one_run(encoding: EventEncoding, requests: int, concurrency: int, tokens: int) -> float:
    cfg = ServerConfig(
        engine=EngineConfig(timing=TimingModel(0, 0, 0), num_gpu_blocks=4096),
        kv_events=KVEventsOptions(endpoint="tcp://127.0.0.1:*", encoding=encoding),
    )
    server = SimServer(cfg, ByteTokenizer())
    await server.start("127.0.0.1", 0)
    # Half the prompts share a prefix, so hits, re-announcements and evictions all happen.
    prompts = [[i % 7] * (tokens // 2) + [i] * (tokens // 2) for i in range(requests)]
    sem = asyncio.Semaphore(concurrency)
    try:
        async with aiohttp.ClientSession() as session:

            async def send(prompt: list[int]) -> None:
                async with (
                    sem,
                    session.post(
                        server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8}
                    ) as resp,
                ):
                    assert resp.status == 200
                    await resp.read()

            start = time.perf_counter()
            await asyncio.gather(*(send(p) for p in prompts))
            elapsed = time.perf_counter() - start
    finally:
        await server.stop()
    return requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"map": [], "array": []}
    for _ in range(args.repeats):
        for encoding in ("map", "array"):
            rate = asyncio.run(
                one_run(encoding, args.requests, args.concurrency, args.prompt_tokens)  # type: ignore[arg-type]
            )
            results[encoding].append(rate)
    print(
        f"requests={args.requests} concurrency={args.concurrency} "
        f"prompt_tokens={args.prompt_tokens} repeats={args.repeats}"
    )
    for encoding, rates in results.items():
        print(f"{encoding:<5} encoding: median {statistics.median(rates):,.0f} completions/s")
    ratio = statistics.median(results["array"]) / statistics.median(results["map"])
    print(f"ratio array/map: {ratio:.2f}")


if __name__ == "__main__":
    main()
