"""Predicted-latency routing against queue-scorer in a small discrete-event simulation.

Four single-channel FIFO servers, two of them 3x slower (a different GPU). A request's TTFT
is its queueing delay plus prefill; the server then decodes it before starting the next.
queue-scorer sees equal queues as equal and sends work to slow servers whenever they are as
short; the predicted-latency scorer learns each server's cost from the completed responses
and routes by expected TTFT. Deterministic: seeded workload and scheduler randomness."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from epp.framework import RecordingObserver, SchedulerDeps, build_scheduler, load_config
from epp.plugins import default_registry
from epp.types import Endpoint, EngineMetrics, LLMRequest, ResponseStats

QUEUE_ONLY = """\
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
"""

PREDICTED = """\
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-scorer
  parameters: {minSamples: 5}
"""

SPEEDS = (1.0, 1.0, 1 / 3, 1 / 3)


@dataclass
class Server:
    endpoint: Endpoint
    speed: float
    # (start, end) of the requests assigned, in order.
    jobs: list[tuple[float, float]] = field(default_factory=list)

    def refresh(self, now: float) -> None:
        self.jobs = [j for j in self.jobs if j[1] > now]
        running = sum(1 for s, _e in self.jobs if s <= now)
        m = self.endpoint.metrics
        m.running, m.waiting, m.updated_at = running, len(self.jobs) - running, now

    def assign(self, now: float, prefill: float, decode: float) -> tuple[float, float]:
        start = max(now, self.jobs[-1][1]) if self.jobs else now
        first_token = start + prefill / self.speed
        end = first_token + decode / self.speed
        self.jobs.append((start, end))
        return first_token, end


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def simulate(config: str, n: int = 1500, rate: float = 1.8) -> list[float]:
    rng = random.Random(42)
    clock = [0.0]
    observer = RecordingObserver()
    scheduler = build_scheduler(
        load_config(config, default_registry()),
        SchedulerDeps(clock=lambda: clock[0], rng=random.Random(7), observer=observer),
    )
    servers = [
        Server(Endpoint(f"10.0.0.{i}", 8000, metrics=EngineMetrics()), speed)
        for i, speed in enumerate(SPEEDS)
    ]
    by_key = {s.endpoint.key: s for s in servers}
    completions: list[tuple[float, int, LLMRequest, ResponseStats]] = []
    ttfts: list[float] = []
    now = 0.0
    for i in range(n):
        now += rng.expovariate(rate)
        while completions and completions[0][0] <= now:
            end, _i, done, stats = heapq.heappop(completions)
            clock[0] = end
            scheduler.on_response_complete(done, stats)
        clock[0] = now
        for s in servers:
            s.refresh(now)
        prompt_tokens = rng.randint(200, 2000)
        output_tokens = rng.randint(20, 80)
        request = LLMRequest(
            request_id=str(i),
            path="/v1/completions",
            model="m",
            prompt="p" * (prompt_tokens * 4),
            max_tokens=output_tokens,
            stream=True,
        )
        result = await scheduler.schedule(request, [s.endpoint for s in servers])
        server = by_key[result.endpoints[0].key]
        prefill = 0.03 + 0.00015 * prompt_tokens
        decode = 0.008 * output_tokens
        first_token, end = server.assign(now, prefill, decode)
        ttfts.append(first_token - now)
        stats = ResponseStats(
            served=server.endpoint.key,
            status=200,
            streamed=True,
            started_at=now,
            first_byte_s=first_token - now,
            duration_s=end - now,
            prompt_tokens=prompt_tokens,
            completion_tokens=output_tokens,
        )
        heapq.heappush(completions, (end, i, request, stats))
    if config is PREDICTED:
        assert observer.predictions and observer.observations
    return ttfts


async def test_predicted_latency_beats_queue_scorer_on_mean_and_p90_ttft() -> None:
    queue = await simulate(QUEUE_ONLY)
    predicted = await simulate(PREDICTED)
    mean_q, mean_p = sum(queue) / len(queue), sum(predicted) / len(predicted)
    p90_q, p90_p = percentile(queue, 0.9), percentile(predicted, 0.9)
    assert mean_p < 0.8 * mean_q, (mean_p, mean_q)
    assert p90_p < 0.8 * p90_q, (p90_p, p90_q)
