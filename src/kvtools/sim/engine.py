"""One simulated vLLM engine core (one DP rank): FCFS scheduler with a concurrency limit and
a waiting queue, a prefix-cache block pool with real vLLM hashes, a timing model, and KV
events handed to an `EventSink` (normally an `EventPublisher`)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

from kvindex.vllm_hash import HashAlgo, RequestExtras, hash_block, none_hash
from kvtools.sim.block_pool import Allocation, BlockPool, CpuTier, KVGroupSpec
from kvtools.sim.events import KVEvent
from kvtools.sim.timing import TimingModel, output_tokens

# vLLM's per-request `kv_cache_report_mode` (`vllm_xargs`): "incremental" (its default) reports
# only blocks a request newly caches; "full" also reports its prefix-cache hits again.
KVCacheReportMode: TypeAlias = Literal["incremental", "full"]
KV_CACHE_REPORT_MODES: tuple[KVCacheReportMode, ...] = ("incremental", "full")


class EventSink(Protocol):
    def publish(self, events: list[KVEvent], ts: float | None = None) -> None: ...


class RequestRejected(ValueError):
    """The request can never run on this engine (too long, unknown adapter...)."""


@dataclass(frozen=True)
class SlidingWindowGroup:
    """Hybrid-model option: a second KV group (group_idx 1) with its own block size."""

    block_size: int = 32
    window: int = 4096
    num_blocks: int = 1024


@dataclass
class EngineConfig:
    model: str = "sim-model"
    block_size: int = 16
    num_gpu_blocks: int = 2048
    # CPU offload tier (medium "CPU"); 0 disables it.
    num_cpu_blocks: int = 0
    max_num_seqs: int = 256
    max_model_len: int = 32_768
    hash_algo: HashAlgo = "sha256_cbor"
    # NONE_HASH seed string; None = random per engine process (vLLM without PYTHONHASHSEED
    # for the xxhash variants).
    hash_seed: str | None = "0"
    output_seed: int = 0
    timing: TimingModel = field(default_factory=TimingModel)
    # LoRA adapters loaded at start: name -> path.
    lora_adapters: Mapping[str, str] = field(default_factory=dict)
    max_loras: int = 4
    sliding_window: SlidingWindowGroup | None = None
    # Report mode of requests that do not choose one: vLLM's default, "incremental" (hits are
    # not re-reported; docs/simulator.md, "Fidelity against vLLM 0.32").
    kv_cache_report_mode: KVCacheReportMode = "incremental"


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    lora_name: str | None = None
    cache_salt: str | None = None
    # None: the engine's default (EngineConfig.kv_cache_report_mode).
    kv_cache_report_mode: KVCacheReportMode | None = None


@dataclass(frozen=True)
class Admitted:
    """First item of a generation: how many prompt tokens came from the prefix cache."""

    cached_tokens: int
    queue_seconds: float


@dataclass
class EngineStats:
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found cached
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    requests_rejected: int = 0


@dataclass
class _Running:
    request: EngineRequest
    extras: RequestExtras
    tokens: list[int]
    digests: list[bytes]
    allocs: list[tuple[BlockPool, Allocation, list[bytes]]]


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        sink: EventSink,
        *,
        engine_id: str = "engine-0",
        data_parallel_rank: int = 0,
    ) -> None:
        self.config = config
        self.sink = sink
        self.engine_id = engine_id
        self.data_parallel_rank = data_parallel_rank
        self.stats = EngineStats()
        self.waiting: list[EngineRequest] = []
        self.running: dict[str, _Running] = {}
        self._cond = asyncio.Condition()
        self._ids = itertools.count()
        self._new_process_state()

    def _new_process_state(self) -> None:
        cfg = self.config
        # Events waiting for the next engine step (vLLM publishes a reset's AllBlocksCleared
        # with the batch of the step after it).
        self._pending: list[KVEvent] = []
        self._none_hash = none_hash(cfg.hash_algo, cfg.hash_seed)
        spec = KVGroupSpec(0, cfg.block_size)
        offload = CpuTier(cfg.num_cpu_blocks, spec) if cfg.num_cpu_blocks > 0 else None
        self.pool = BlockPool(cfg.num_gpu_blocks, spec, offload=offload)
        self.sw_pool: BlockPool | None = None
        if cfg.sliding_window is not None:
            sw = cfg.sliding_window
            spec = KVGroupSpec(1, sw.block_size, "sliding_window", sw.window)
            self.sw_pool = BlockPool(sw.num_blocks, spec)

    # ----------------------------------------------------------------- hashing

    def _digests(
        self, tokens: list[int], block_size: int, extras: RequestExtras, start: list[bytes]
    ) -> list[bytes]:
        """Extend the digest chain `start` over every full block of `tokens`."""
        digests = list(start)
        prev = digests[-1] if digests else self._none_hash
        for i in range(len(digests), len(tokens) // block_size):
            block = tokens[i * block_size : (i + 1) * block_size]
            prev = hash_block(self.config.hash_algo, prev, block, extras.hash_keys(i, block_size))
            digests.append(prev)
        return digests

    def block_digests(self, tokens: list[int], extras: RequestExtras) -> list[bytes]:
        return self._digests(tokens, self.config.block_size, extras, [])

    # ----------------------------------------------------------------- admission

    def extras_for(self, request: EngineRequest) -> RequestExtras:
        path = None
        if request.lora_name is not None:
            if request.lora_name not in self.config.lora_adapters:
                raise RequestRejected(f"LoRA adapter {request.lora_name!r} is not loaded")
            path = self.config.lora_adapters[request.lora_name]
        return RequestExtras(
            lora_name=request.lora_name, lora_path=path, cache_salt=request.cache_salt or None
        )

    def validate(self, request: EngineRequest) -> None:
        cfg = self.config
        total = len(request.prompt_token_ids) + request.max_tokens
        if not request.prompt_token_ids:
            raise RequestRejected("the prompt is empty")
        if request.max_tokens < 0:
            raise RequestRejected("max_tokens must be >= 0")
        if total > cfg.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {cfg.max_model_len} tokens; the "
                f"request has {len(request.prompt_token_ids)} prompt tokens and asks for "
                f"{request.max_tokens} more"
            )
        kv = kv_tokens(request)
        if self.pool.blocks_needed(kv) > self.pool.num_blocks:
            raise RequestRejected(
                f"request needs {self.pool.blocks_needed(kv)} KV blocks; the engine has "
                f"{self.pool.num_blocks}"
            )
        if self.sw_pool is not None and self.sw_pool.blocks_needed(kv) > self.sw_pool.num_blocks:
            raise RequestRejected("request does not fit the sliding-window KV group")

    def _admissible(
        self, request: EngineRequest, extras: RequestExtras, digests: list[bytes]
    ) -> bool:
        if not self.waiting or self.waiting[0] is not request:
            return False
        if len(self.running) >= self.config.max_num_seqs:
            return False
        prompt = request.prompt_token_ids
        total = kv_tokens(request)
        if not self.pool.can_allocate(digests, len(prompt), total):
            return False
        if self.sw_pool is not None:
            sw_digests = self._digests(prompt, self.sw_pool.block_size, extras, [])
            if not self.sw_pool.can_allocate(sw_digests, len(prompt), total):
                return False
        return True

    def new_request_id(self) -> str:
        return f"{self.engine_id}-r{next(self._ids)}"

    async def generate(self, request: EngineRequest) -> AsyncGenerator[Admitted | int, None]:
        """Yield `Admitted` once, then each output token id."""
        try:
            self.validate(request)
            extras = self.extras_for(request)
        except RequestRejected:
            self.stats.requests_rejected += 1
            raise
        prompt = list(request.prompt_token_ids)
        digests = self.block_digests(prompt, extras)
        arrived = time.monotonic()
        async with self._cond:
            self.waiting.append(request)
            try:
                await self._cond.wait_for(lambda: self._admissible(request, extras, digests))
            finally:
                self.waiting.remove(request)
                self._cond.notify_all()
            running, events, hit_tokens = self._admit(request, extras, prompt, digests)
        self._publish_step(events)
        try:
            yield Admitted(hit_tokens, time.monotonic() - arrived)
            await asyncio.sleep(self.config.timing.prefill_seconds(len(prompt) - hit_tokens))
            outputs = output_tokens(self.config.output_seed, prompt, request.max_tokens)
            for n, token in enumerate(outputs, 1):
                await asyncio.sleep(self.config.timing.decode_seconds())
                running.tokens.append(token)
                self.stats.generation_tokens += 1
                if n < len(outputs):
                    # Like vLLM: a sampled token's KV is computed (and a block it fills is
                    # cached) in the next decode step, so the last token's never is.
                    self._publish_step(self._cache_new_blocks(running))
                yield token
            self.stats.requests_finished += 1
        finally:
            async with self._cond:
                self._finish(running)
                self._cond.notify_all()

    def _publish_step(self, events: list[KVEvent]) -> None:
        """Publish one engine step's events, after any left by a reset since the last step."""
        if self._pending:
            events = [*self._pending, *events]
            self._pending = []
        if events:
            self.sink.publish(events)

    def _admit(
        self, request: EngineRequest, extras: RequestExtras, prompt: list[int], digests: list[bytes]
    ) -> tuple[_Running, list[KVEvent], int]:
        total = kv_tokens(request)
        report = request.kv_cache_report_mode or self.config.kv_cache_report_mode
        events: list[KVEvent] = []
        allocs: list[tuple[BlockPool, Allocation, list[bytes]]] = []
        pools = [(self.pool, digests)]
        if self.sw_pool is not None:
            pools.append((self.sw_pool, self._digests(prompt, self.sw_pool.block_size, extras, [])))
        hit_tokens = 0
        for pool, pool_digests in pools:
            alloc, evictions = pool.allocate(
                request.request_id, pool_digests, len(prompt), total, extras
            )
            if report == "full":
                # vLLM reports the hits (blocks 0.., parent None) when it looks them up,
                # before the allocation evicts anything.
                events.extend(pool.hit_blocks_event(alloc, pool_digests, prompt))
            events.extend(evictions)
            events.extend(pool.cache_blocks(alloc, pool_digests, prompt))
            allocs.append((pool, alloc, pool_digests))
            if pool is self.pool:
                cpu_hits = pool.cpu_hits(pool_digests, alloc.hit_blocks, len(prompt))
                hit_tokens = (alloc.hit_blocks + cpu_hits) * pool.block_size
        self.stats.prefix_cache_queries += len(prompt)
        self.stats.prefix_cache_hits += hit_tokens
        self.stats.prompt_tokens += len(prompt)
        running = _Running(request, extras, list(prompt), digests, allocs)
        self.running[request.request_id] = running
        return running, events, hit_tokens

    def _cache_new_blocks(self, running: _Running) -> list[KVEvent]:
        events: list[KVEvent] = []
        for i, (pool, alloc, digests) in enumerate(running.allocs):
            if len(running.tokens) // pool.block_size <= len(digests):
                continue
            digests = self._digests(running.tokens, pool.block_size, running.extras, digests)
            running.allocs[i] = (pool, alloc, digests)
            events.extend(pool.cache_blocks(alloc, digests, running.tokens))
        return events

    def _finish(self, running: _Running) -> None:
        for pool, alloc, _ in running.allocs:
            pool.free(alloc)
        self.running.pop(running.request.request_id, None)

    # ----------------------------------------------------------------- admin

    def reset_prefix_cache(self) -> None:
        """Forget every cached block. Like vLLM, AllBlocksCleared is published with the next
        engine step's batch (the next request admitted or decode step), not on its own."""
        self._pending.extend(self.pool.reset())
        if self.sw_pool is not None:
            self.sw_pool.reset()

    def restart(self) -> None:
        """As if the engine process restarted: empty cache, new NONE_HASH if unseeded.
        (The caller restarts the publisher; running requests finish on the old pools.)"""
        self._new_process_state()

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting)

    def lora_adapters_in(self, requests: list[EngineRequest]) -> list[str]:
        return sorted({r.lora_name for r in requests if r.lora_name is not None})


def kv_tokens(request: EngineRequest) -> int:
    """Tokens whose KV a request computes: its prompt and every output token but the last
    (the last one sampled is returned, never fed back)."""
    return len(request.prompt_token_ids) + max(request.max_tokens - 1, 0)
