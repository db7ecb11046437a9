"""Scrape each endpoint's Prometheus `/metrics` into its `EngineMetrics`.

Every tick (50 ms by default) each endpoint without a scrape in flight gets one, concurrently,
with a per-request timeout; a slow endpoint skips ticks instead of piling up requests. Only
a successful scrape replaces the endpoint's metrics (so `updated_at` measures staleness).

Engine pages are large (histograms) and parsing runs on the event loop, so lines are first
filtered by metric name with plain string operations and only the few wanted families reach
`prometheus_client.parser.text_string_to_metric_families`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from epp.metrics import EppMetrics
from epp.requests import ModelRegistry
from epp.types import Endpoint, EngineMetrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.05
DEFAULT_TIMEOUT_S = 0.5


@dataclass(frozen=True, slots=True)
class EngineMetricNames:
    """Metric names per engine; each tuple lists accepted names, newest first."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...]
    lora_info: tuple[str, ...] = ()
    cache_config: tuple[str, ...] = ()
    prefix_queries: tuple[str, ...] = ()
    prefix_hits: tuple[str, ...] = ()

    def all(self) -> frozenset[str]:
        names = (
            self.waiting
            + self.running
            + self.kv_usage
            + self.lora_info
            + self.cache_config
            + self.prefix_queries
            + self.prefix_hits
        )
        # Counters appear as `<name>_total`; accept both spellings of every name.
        return frozenset(
            n for name in names for n in (name, name.removesuffix("_total") + "_total")
        )


ENGINE_METRIC_NAMES: dict[str, EngineMetricNames] = {
    "vllm": EngineMetricNames(
        waiting=("vllm:num_requests_waiting",),
        running=("vllm:num_requests_running",),
        # vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc (V1).
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        lora_info=("vllm:lora_requests_info",),
        cache_config=("vllm:cache_config_info",),
        prefix_queries=("vllm:prefix_cache_queries",),
        prefix_hits=("vllm:prefix_cache_hits",),
    ),
    "sglang": EngineMetricNames(
        waiting=("sglang:num_queue_reqs",),
        running=("sglang:num_running_reqs",),
        kv_usage=("sglang:token_usage",),
        cache_config=("sglang:cache_config_info",),
    ),
}


@dataclass(slots=True)
class ParsedEngineMetrics:
    metrics: EngineMetrics
    model_names: set[str] = field(default_factory=set)  # `model_name` labels seen


def _base_name(sample_name: str) -> str:
    for suffix in ("_total", "_created"):
        if sample_name.endswith(suffix):
            return sample_name[: -len(suffix)]
    return sample_name


def filter_lines(text: str, wanted: frozenset[str]) -> str:
    """Keep the sample and `# TYPE`/`# HELP` lines of the wanted metric names."""
    kept: list[str] = []
    for line in text.splitlines():
        if not line:
            continue
        if line[0] == "#":
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("TYPE", "HELP") and parts[2] in wanted:
                kept.append(line)
            continue
        end = len(line)
        for stop in ("{", " "):
            index = line.find(stop)
            if 0 <= index < end:
                end = index
        if line[:end] in wanted:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _csv(value: str) -> frozenset[str]:
    return frozenset(item.strip() for item in value.split(",") if item.strip())


def parse_engine_metrics(text: str, engine_type: str, now: float) -> ParsedEngineMetrics:
    """Pure: a metrics page -> EngineMetrics stamped `now`. Several series of one metric
    (data-parallel engines behind one port) are summed for counts, maxed for KV usage.
    Raises ValueError on a malformed page."""
    names = ENGINE_METRIC_NAMES.get(engine_type, ENGINE_METRIC_NAMES["vllm"])
    values: dict[str, list[float]] = {}
    lora_newest: tuple[float, dict[str, str]] | None = None
    cache_config: dict[str, str] = {}
    model_names: set[str] = set()
    for family in text_string_to_metric_families(filter_lines(text, names.all())):
        for sample in family.samples:
            base = _base_name(sample.name)
            if sample.name.endswith("_created"):
                continue
            model = sample.labels.get("model_name")
            if model:
                model_names.add(model)
            if base in names.lora_info:
                # One series per adapter set, valued with its timestamp: newest wins.
                if lora_newest is None or sample.value >= lora_newest[0]:
                    lora_newest = (sample.value, dict(sample.labels))
            elif base in names.cache_config:
                cache_config.update(sample.labels)
            else:
                values.setdefault(base, []).append(sample.value)

    def first(candidates: tuple[str, ...]) -> list[float] | None:
        for name in candidates:
            if name in values:
                return values[name]
        return None

    def as_int(text_value: str | None) -> int | None:
        try:
            return int(float(text_value)) if text_value else None
        except ValueError:
            return None

    if first(names.waiting) is None and first(names.running) is None:
        # A page without the engine's load metrics is the wrong engine type or not an
        # engine at all; scoring it as idle would silently attract traffic.
        raise ValueError(
            f"page has none of the {engine_type} load metrics "
            f"({', '.join(names.waiting + names.running)}); check llm-d.ai/engine-type"
        )
    metrics = EngineMetrics(updated_at=now)
    if (waiting := first(names.waiting)) is not None:
        metrics.waiting = int(sum(waiting))
    if (running := first(names.running)) is not None:
        metrics.running = int(sum(running))
    if (kv := first(names.kv_usage)) is not None:
        metrics.kv_usage = max(kv)
    if (queries := first(names.prefix_queries)) is not None:
        metrics.prefix_cache_queries = sum(queries)
    if (hits := first(names.prefix_hits)) is not None:
        metrics.prefix_cache_hits = sum(hits)
    if lora_newest is not None:
        labels = lora_newest[1]
        metrics.running_loras = _csv(labels.get("running_lora_adapters", ""))
        metrics.waiting_loras = _csv(labels.get("waiting_lora_adapters", ""))
        metrics.max_loras = as_int(labels.get("max_lora")) or 0
    metrics.block_size = as_int(cache_config.get("block_size"))
    metrics.num_gpu_blocks = as_int(cache_config.get("num_gpu_blocks"))
    return ParsedEngineMetrics(metrics=metrics, model_names=model_names)


class EngineMetricsScraper:
    """Background scraping of every datastore endpoint. `run()` until cancelled."""

    def __init__(
        self,
        endpoints: Callable[[], Sequence[Endpoint]],
        metrics: EppMetrics,
        registry: ModelRegistry | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        metrics_path: str = "/metrics",
    ) -> None:
        self.endpoints = endpoints
        self.metrics = metrics
        self.registry = registry
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.metrics_path = metrics_path
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._failing: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    async def scrape(self, session: aiohttp.ClientSession, endpoint: Endpoint) -> bool:
        url = f"http://{endpoint.key}{self.metrics_path}"
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                text = await response.text()
            parsed = parse_engine_metrics(text, endpoint.engine_type, time.monotonic())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # timeouts, refused connections, malformed pages
            self.metrics.engine_scrape_total.labels(outcome="error").inc()
            if endpoint.key not in self._failing:
                self._failing.add(endpoint.key)
                log.warning("scraping %s failed: %s", url, exc or type(exc).__name__)
            return False
        self._failing.discard(endpoint.key)
        endpoint.metrics = parsed.metrics  # one reference swap: readers see old or new
        self.metrics.engine_scrape_total.labels(outcome="ok").inc()
        if self.registry is not None and len(parsed.model_names) == 1:
            (base,) = parsed.model_names
            for adapter in parsed.metrics.running_loras | parsed.metrics.waiting_loras:
                self.registry.learn(adapter, base)
        return True

    async def _scrape_and_release(self, session: aiohttp.ClientSession, endpoint: Endpoint) -> None:
        try:
            await self.scrape(session, endpoint)
        finally:
            self._inflight.pop(endpoint.key, None)

    def tick(self, session: aiohttp.ClientSession) -> int:
        """Start a scrape for each endpoint that has none in flight; returns how many."""
        started = 0
        current = self.endpoints()
        if self._failing:
            self._failing.intersection_update(e.key for e in current)  # forget departed ones
        for endpoint in current:
            if endpoint.key in self._inflight:
                continue
            self._inflight[endpoint.key] = asyncio.create_task(
                self._scrape_and_release(session, endpoint)
            )
            started += 1
        return started

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                while True:
                    began = loop.time()
                    self.tick(session)
                    await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - began)))
            finally:
                tasks = list(self._inflight.values())
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
