"""A discrete-event cluster simulation (pure Python, one heapq event loop, deterministic for
a seed).

Engines: a KV cache of ``capacity_blocks`` (:class:`EngineKV`), a FIFO waiting queue, at most
``max_running`` running requests and one prefill at a time (prefill is compute bound; decode
of running requests overlaps). A request is admitted from the head of the queue when a
running slot is free, no prefill is in progress and its blocks fit (evicting unreferenced
blocks); its cache hit is the engine's cached prefix at that moment. Prefill takes
``prefill_overhead_ms + uncached_tokens * prefill_ms_per_token``; the first token is out when
it ends (TTFT), its blocks are then cached and announced; decode takes ``output_tokens *
(decode_ms_per_token + decode_ms_per_running * running)``, after which its blocks are
released (last first). Store/evict events reach the precise index ``event_delay_ms`` after
they happen. The oracle computes hits at arrival against one unbounded cache shared by all
engines (the trace's reuse ceiling) and skips memory admission.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvindex.keys import ContentKey
from kvtools.analyze.cache import EngineKV
from kvtools.analyze.config import PickerSetup
from kvtools.analyze.metrics import PolicyResult, summarise
from kvtools.analyze.model import Trace
from kvtools.analyze.policies import (
    EngineView,
    PolicyContext,
    PrecisePrefixPolicy,
    make_policy,
)

__all__ = ["CostModel", "SimSettings", "simulate"]

# H100-class engine serving an 8B model in bf16 (e.g. Llama-3.1-8B on vLLM): ~20k prompt
# tokens/s prefill, ~10 ms per output token at small batch, 128 KiB of KV per token, so
# ~60 GB of KV memory holds ~480k tokens.
DEFAULT_CAPACITY_TOKENS = 491_520


@dataclass(frozen=True, slots=True)
class CostModel:
    prefill_ms_per_token: float = 0.05  # per uncached prompt token (20k tokens/s)
    prefill_overhead_ms: float = 15.0  # per prefill (scheduling, launch, sampling)
    decode_ms_per_token: float = 10.0  # per output token, single request
    decode_ms_per_running: float = 0.25  # added per output token per running request
    max_running: int = 32  # concurrent requests per engine (running slots)


@dataclass(frozen=True, slots=True)
class SimSettings:
    engines: int = 8
    capacity_blocks: int | None = None  # per engine; None: DEFAULT_CAPACITY_TOKENS / block
    cost: CostModel = field(default_factory=CostModel)
    event_delay_ms: float = 50.0
    speed: float = 1.0  # >1 compresses time (arrivals come faster)
    seed: int = 0
    # The EndpointPickerConfig the prefix policies schedule with (the picker's framework).
    picker: PickerSetup = field(default_factory=PickerSetup)
    windows: int = 60  # buckets of the hit-rate-over-time series
    precise_ingest: str = "wire"  # "wire" (vLLM msgpack -> EventApplier) or "ops"

    def capacity_for(self, block_tokens: int) -> int:
        if self.capacity_blocks is not None:
            return self.capacity_blocks
        return max(1, DEFAULT_CAPACITY_TOKENS // block_tokens)


_ARRIVE, _PREFILL_DONE, _DECODE_DONE, _STORED, _REMOVED = range(5)


@dataclass(slots=True)
class _Engine:
    view: EngineView
    kv: EngineKV | None  # None for the oracle
    waiting: deque[int] = field(default_factory=deque)
    prefilling: bool = False
    requests: int = 0
    busy_ms: float = 0.0  # prefill time
    max_waiting: int = 0


def simulate(
    trace: Trace,
    policy_name: str,
    settings: SimSettings,
    progress: Callable[[int], None] | None = None,
) -> PolicyResult:
    """Run one policy over the trace; ``progress(n)`` is called with requests arrived so far
    (every 512)."""
    reqs = trace.requests
    n_req = len(reqs)
    bt = trace.block_tokens
    cost = settings.cost
    rng = random.Random(settings.seed)
    if (
        policy_name == "precise-prefix"
        and settings.precise_ingest == "wire"
        and any(len(r.tokens) != len(r.keys) * trace.chain_block for r in reqs)
    ):
        raise ValueError("wire ingest needs every request's tokens; use precise_ingest='ops'")
    context = PolicyContext(
        settings.engines, rng, settings.picker, bt, trace.chain_block, settings.precise_ingest
    )
    policy = make_policy(policy_name, context)
    capacity = settings.capacity_for(bt)
    engines = [
        _Engine(EngineView(f"engine-{i}"), None if policy.oracle else EngineKV(capacity))
        for i in range(settings.engines)
    ]
    views = [e.view for e in engines]
    shared: set[ContentKey] = set()  # oracle cache

    engine_of = [-1] * n_req
    hits = [0] * n_req
    start = [0.0] * n_req
    first_token = [0.0] * n_req
    finish = [0.0] * n_req
    out_blocks = [-(-r.output_tokens // bt) for r in reqs]

    # (time, seq, kind, request or engine, payload): payload is the stored positions of
    # request a (_STORED, with the engine as payload[0]) or the evicted keys (_REMOVED).
    heap: list[tuple[float, int, int, int, Any]] = []
    seq = 0
    scale = 1.0 / settings.speed
    for i, r in enumerate(reqs):
        heap.append((r.arrival_ms * scale, seq, _ARRIVE, i, None))
        seq += 1
    heapq.heapify(heap)
    delay = settings.event_delay_ms
    wants_events = policy.wants_events

    def deliver(now: float, kind: int, a: int, payload: Any) -> None:
        if kind == _STORED:
            engine, positions = payload
            policy.stored(now, engine, reqs[a], positions)
        else:
            policy.removed(now, a, payload)

    def announce_stored(now: float, engine: int, i: int, positions: list[int]) -> None:
        nonlocal seq
        if not positions or not wants_events:
            return
        if delay <= 0:
            policy.stored(now, engine, reqs[i], positions)
            return
        heapq.heappush(heap, (now + delay, seq, _STORED, i, (engine, positions)))
        seq += 1

    def announce_removed(now: float, engine: int, keys: list[ContentKey]) -> None:
        nonlocal seq
        if not keys or not wants_events:
            return
        if delay <= 0:
            policy.removed(now, engine, keys)
            return
        heapq.heappush(heap, (now + delay, seq, _REMOVED, engine, keys))
        seq += 1

    def try_start(now: float, e: int) -> None:
        nonlocal seq
        eng = engines[e]
        if eng.prefilling or not eng.waiting or eng.view.running >= cost.max_running:
            return
        i = eng.waiting[0]
        keys = reqs[i].keys
        kv = eng.kv
        if kv is not None:
            h = kv.cached_prefix(keys)
            if eng.view.running and not kv.fits(keys, h, out_blocks[i]):
                return  # head-of-line waits for memory (an oversized request runs alone)
            announce_removed(now, e, kv.admit(keys, h, out_blocks[i]))
            hits[i] = h
            eng.view.kv_usage = kv.usage()
        eng.waiting.popleft()
        eng.view.waiting -= 1
        eng.view.running += 1
        eng.prefilling = True
        start[i] = now
        r = reqs[i]
        uncached = r.input_tokens - min(hits[i] * bt, r.input_tokens)
        duration = cost.prefill_overhead_ms + uncached * cost.prefill_ms_per_token
        eng.busy_ms += duration
        heapq.heappush(heap, (now + duration, seq, _PREFILL_DONE, i, None))
        seq += 1

    arrived = 0
    while heap:
        now, _, kind, a, payload = heapq.heappop(heap)
        if kind == _ARRIVE:
            keys = reqs[a].keys
            e = policy.choose(a, keys, views)
            eng = engines[e]
            engine_of[a] = e
            eng.requests += 1
            if policy.oracle:
                h = 0
                for key in keys:
                    if key not in shared:
                        break
                    h += 1
                hits[a] = h
                shared.update(keys)
            eng.waiting.append(a)
            eng.view.waiting += 1
            eng.max_waiting = max(eng.max_waiting, eng.view.waiting)
            try_start(now, e)
            arrived += 1
            if progress is not None and arrived % 512 == 0:
                progress(arrived)
        elif kind == _PREFILL_DONE:
            e = engine_of[a]
            eng = engines[e]
            first_token[a] = now
            eng.prefilling = False
            if eng.kv is not None:
                announce_stored(now, e, a, eng.kv.commit(reqs[a].keys, hits[a]))
                eng.view.kv_usage = eng.kv.usage()
            per_token = cost.decode_ms_per_token + cost.decode_ms_per_running * eng.view.running
            heapq.heappush(
                heap, (now + reqs[a].output_tokens * per_token, seq, _DECODE_DONE, a, None)
            )
            seq += 1
            try_start(now, e)
        elif kind == _DECODE_DONE:
            e = engine_of[a]
            eng = engines[e]
            finish[a] = now
            eng.view.running -= 1
            policy.finished(a, e)
            if eng.kv is not None:
                announce_removed(now, e, eng.kv.release(reqs[a].keys, out_blocks[a]))
                eng.view.kv_usage = eng.kv.usage()
            try_start(now, e)
        else:
            deliver(now, kind, a, payload)
    if progress is not None:
        progress(n_req)

    index_keys = None
    ingest_skipped = None
    if isinstance(policy, PrecisePrefixPolicy):
        index_keys = policy.index.stats().keys
        ingest_skipped = dict(policy.sink.skipped)
    return summarise(
        policy=policy_name,
        trace=trace,
        settings_windows=settings.windows,
        speed=settings.speed,
        engine_of=engine_of,
        hits=hits,
        start=start,
        first_token=first_token,
        per_engine=[
            (e.requests, e.busy_ms, e.max_waiting, 0 if e.kv is None else e.kv.evicted)
            for e in engines
        ],
        index_keys=index_keys,
        ingest_skipped=ingest_skipped,
    )
