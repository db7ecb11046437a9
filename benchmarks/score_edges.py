"""Score latency through each edge, side by side in one run: in-process `Scorer.score_tokens`,
`ScoreService.score` (validation, metrics), HTTP `POST /v1/score` (aiohttp client, keep-alive,
loopback) and gRPC `kvindex.v1.KVIndex/ScoreTokens` (grpc.aio, loopback). 8k-token prompt
by token ids, 64 engines, filled memory index (as benchmarks.score `gpu`). Sequential calls.

Run: python -m benchmarks.score_edges [--iterations N] [--tokens N] [--engines N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import aiohttp
import grpc
from aiohttp import web

from benchmarks.score import MODEL, fill, percentiles
from kvindex._proto.kvindex.v1 import kvindex_pb2, kvindex_pb2_grpc
from kvindex.scoring import Scorer
from kvindex.service.grpc_server import build_grpc_server
from kvindex.service.score_api import ScoreQuery, ScoreService
from kvindex.service.score_http import add_score_routes


async def timed_async(call: Callable[[], Awaitable[object]], iterations: int) -> list[float]:
    for _ in range(min(50, iterations)):
        await call()
    out = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        await call()
        out.append((time.perf_counter_ns() - start) / 1e6)
    return out


async def run(iterations: int, n_tokens: int, engines: int) -> None:
    rng = random.Random(7)
    tokens = [rng.randrange(150_000) for _ in range(n_tokens)]
    index, _ = fill(tokens, engines, random.Random(engines))
    scorer = Scorer(index)
    service = ScoreService(scorer)

    app = web.Application()
    add_score_routes(app, service)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = runner.addresses[0][1]
    server = build_grpc_server(service)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def in_process() -> object:
        return scorer.score_tokens(MODEL, tokens)

    async def via_service() -> object:
        return service.score(ScoreQuery(model=MODEL, token_ids=tokens), "bench")

    body = {"model": MODEL, "token_ids": tokens}
    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
    ):
        stub = kvindex_pb2_grpc.KVIndexStub(channel)
        request = kvindex_pb2.ScoreTokensRequest(model=MODEL, token_ids=tokens)
        url = f"http://127.0.0.1:{http_port}/v1/score"

        async def via_http() -> object:
            async with session.post(url, json=body) as response:
                return await response.read()

        async def via_grpc() -> object:
            return await stub.ScoreTokens(request)

        print(f"{n_tokens} tokens by id, {engines} engines, {iterations} sequential calls (ms)")
        print(f"{'edge':>12} {'p50':>8} {'p90':>8} {'p99':>8}")
        for name, call in (
            ("in-process", in_process),
            ("service", via_service),
            ("http", via_http),
            ("grpc", via_grpc),
        ):
            p50, p90, p99 = percentiles(await timed_async(call, iterations))
            print(f"{name:>12} {p50:>8.3f} {p90:>8.3f} {p99:>8.3f}", flush=True)
    await server.stop(None)
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--engines", type=int, default=64)
    args = parser.parse_args(argv)
    asyncio.run(run(args.iterations, args.tokens, args.engines))


if __name__ == "__main__":
    main()
