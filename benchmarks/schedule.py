"""Scheduling decision latency with the default profile (queue 2, kv-cache-utilization 2,
approximate prefix-cache 3, max-score picker) at 10 and 100 endpoints.

Run: python -m benchmarks.schedule [--decisions N] [--prompt-chars N]

Each decision is timed around `await scheduler.schedule(...)` inside one coroutine (no
event-loop switches: the default profile has no awaiting scorer). The workload mimics
multi-tenant chat: 50 shared system prompts, each request a system prompt plus a unique
suffix, so the prefix index holds real chains and most requests hit."""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from epp.framework import RecordingObserver, SchedulerDeps, build_scheduler, load_config
from epp.plugins import default_registry
from epp.types import Endpoint, EngineMetrics, LLMRequest


def make_endpoints(n: int, rng: random.Random) -> list[Endpoint]:
    now = time.monotonic()
    return [
        Endpoint(
            f"10.{i // 250}.{i % 250}.1",
            8000,
            metrics=EngineMetrics(
                waiting=rng.randint(0, 8),
                running=rng.randint(0, 32),
                kv_usage=rng.random(),
                updated_at=now,
            ),
        )
        for i in range(n)
    ]


def make_requests(count: int, prompt_chars: int, rng: random.Random) -> list[LLMRequest]:
    systems = ["".join(rng.choices("abcdefghij ", k=prompt_chars * 3 // 4)) for _ in range(50)]
    out = []
    for i in range(count):
        suffix = "".join(rng.choices("klmnopqrst ", k=prompt_chars // 4))
        out.append(
            LLMRequest(
                request_id=str(i),
                path="/v1/completions",
                model="m",
                prompt=rng.choice(systems) + suffix,
            )
        )
    return out


async def measure(
    n_endpoints: int, decisions: int, prompt_chars: int, observed: bool
) -> tuple[float, float]:
    rng = random.Random(n_endpoints)
    deps = SchedulerDeps(rng=random.Random(1), observer=RecordingObserver() if observed else None)
    scheduler = build_scheduler(load_config(None, default_registry()), deps)
    endpoints = make_endpoints(n_endpoints, rng)
    requests = make_requests(decisions * 2, prompt_chars, rng)
    for r in requests[:decisions]:  # warm the prefix index
        await scheduler.schedule(r, endpoints)
    timings = []
    clock = time.perf_counter
    for r in requests[decisions:]:
        t0 = clock()
        await scheduler.schedule(r, endpoints)
        timings.append(clock() - t0)
        if observed:
            deps.observer.durations.clear()  # type: ignore[union-attr]
    timings.sort()
    p99 = timings[min(len(timings) - 1, int(0.99 * len(timings)))]
    return statistics.median(timings), p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--prompt-chars", type=int, default=4000)
    args = parser.parse_args()
    print(f"default profile, prompt {args.prompt_chars} chars, {args.decisions} decisions")
    print(f"{'endpoints':>9} {'observer':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for n in (10, 100):
        for observed in (False, True):
            p50, p99 = asyncio.run(measure(n, args.decisions, args.prompt_chars, observed))
            print(f"{n:>9} {'yes' if observed else 'no':>8} {p50 * 1e3:>8.3f} {p99 * 1e3:>8.3f}")


if __name__ == "__main__":
    main()
