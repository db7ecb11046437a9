"""Prometheus text for `/metrics` with vLLM's metric and label names, read from engine state
at scrape time. One series per engine core (label ``engine`` = DP rank), as vLLM does."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtools.sim.engine import EngineCore


class EngineCollector(Collector):
    def __init__(
        self,
        engines: Callable[[], Sequence[EngineCore]],
        model_name: str,
        bad_requests: Callable[[], dict[str, int]],
    ) -> None:
        self._engines = engines
        self._model = model_name
        self._bad_requests = bad_requests

    def collect(self) -> Iterable[Metric]:
        engines = list(self._engines())
        labels = ["model_name", "engine"]

        def gauge(name: str, doc: str, value: Callable[[EngineCore], float]) -> Metric:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for core in engines:
                family.add_metric([self._model, str(core.data_parallel_rank)], value(core))
            return family

        def counter(name: str, doc: str, value: Callable[[EngineCore], float]) -> Metric:
            family = CounterMetricFamily(name, doc, labels=labels)
            for core in engines:
                family.add_metric([self._model, str(core.data_parallel_rank)], value(core))
            return family

        yield gauge(
            "vllm:num_requests_running",
            "Requests in model execution batches.",
            lambda c: len(c.running),
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be processed.",
            lambda c: len(c.waiting),
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            lambda c: c.pool.usage,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in tokens.",
            lambda c: c.stats.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in tokens.",
            lambda c: c.stats.prefix_cache_hits,
        )
        yield counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", lambda c: c.stats.prompt_tokens
        )
        yield counter(
            "vllm:generation_tokens",
            "Generation tokens processed.",
            lambda c: c.stats.generation_tokens,
        )
        yield counter(
            "vllm:request_success",
            "Successfully finished requests.",
            lambda c: c.stats.requests_finished,
        )

        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        # One series for the server (the picker takes the newest series), all ranks merged.
        running = sorted(
            {
                a
                for c in engines
                for a in c.lora_adapters_in([r.request for r in c.running.values()])
            }
        )
        waiting = sorted({a for c in engines for a in c.lora_adapters_in(c.waiting)})
        max_lora = engines[0].config.max_loras if engines else 0
        lora.add_metric([str(max_lora), ",".join(waiting), ",".join(running)], time.time())
        yield lora

        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[
                "block_size",
                "enable_prefix_caching",
                "engine",
                "num_cpu_blocks",
                "num_gpu_blocks",
                "prefix_caching_hash_algo",
            ],
        )
        for core in engines:
            cfg = core.config
            info.add_metric(
                [
                    str(cfg.block_size),
                    "True",
                    str(core.data_parallel_rank),
                    str(cfg.num_cpu_blocks or None),
                    str(cfg.num_gpu_blocks),
                    cfg.hash_algo,
                ],
                1.0,
            )
        yield info

        bad = CounterMetricFamily(
            "kvsim_bad_requests",
            "Requests rejected by the simulator, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self._bad_requests().items()):
            bad.add_metric([reason], count)
        yield bad


def render_metrics(collector: EngineCollector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
