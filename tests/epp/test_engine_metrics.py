"""Engine metrics: parsing real-shaped vLLM/SGLang pages, and scraping real aiohttp servers
(including a failing and a slow one)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.endpoints import Datastore, make_endpoint
from epp.engine_metrics import EngineMetricsScraper, filter_lines, parse_engine_metrics
from epp.metrics import EppMetrics
from epp.requests import ModelRegistry
from tests.polling import wait_until_async as wait_for

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.5
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,ch",waiting_lora_adapters="x"} 1.8e9
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="2048",cache_dtype="auto"} 1.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="llama"} 1.7e9
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 250.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="llama"} 5.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="llama"} 9.0
vllm:time_to_first_token_seconds_count{model_name="llama"} 9.0
vllm:time_to_first_token_seconds_sum{model_name="llama"} 1.5
"""

SGLANG_PAGE = """\
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen"} 7
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen"} 2
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen"} 0.75
sglang:cache_config_info{page_size="1",block_size="64",num_gpu_blocks="100"} 1
vllm:num_requests_waiting 99
"""


def test_vllm_page() -> None:
    parsed = parse_engine_metrics(VLLM_PAGE, "vllm", now=12.0)
    m = parsed.metrics
    assert (m.waiting, m.running, m.kv_usage) == (5, 5, 0.5)
    assert m.running_loras == {"sql", "ch"} and m.waiting_loras == {"x"} and m.max_loras == 4
    assert (m.block_size, m.num_gpu_blocks) == (16, 2048)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (1000.0, 250.0)
    assert m.updated_at == 12.0 and parsed.model_names == {"llama"}


def test_untyped_and_old_names() -> None:
    page = "vllm:num_requests_waiting 2\nvllm:gpu_cache_usage_perc 0.9\nvllm:prefix_cache_hits 3\n"
    m = parse_engine_metrics(page, "vllm", now=1.0).metrics
    assert (m.waiting, m.kv_usage, m.prefix_cache_hits) == (2, 0.9, 3.0)


def test_sglang_page_reads_sglang_names_only() -> None:
    m = parse_engine_metrics(SGLANG_PAGE, "sglang", now=1.0).metrics
    assert (m.waiting, m.running, m.kv_usage, m.block_size) == (7, 2, 0.75, 64)


def test_page_without_load_metrics_is_an_error() -> None:
    with pytest.raises(ValueError, match="engine-type"):
        parse_engine_metrics(VLLM_PAGE, "sglang", now=1.0)


def test_filter_keeps_only_wanted_families() -> None:
    kept = filter_lines(VLLM_PAGE, frozenset({"vllm:num_requests_waiting"}))
    assert "time_to_first_token" not in kept and kept.count("num_requests_waiting") == 4


@settings(max_examples=200, deadline=None)
@given(page=st.text(max_size=300))
def test_garbage_pages_raise_value_error_at_most(page: str) -> None:
    with contextlib.suppress(ValueError):
        parse_engine_metrics(page, "vllm", now=1.0)


class MetricsServer:
    def __init__(self, page: str, status: int = 200, delay_s: float = 0.0) -> None:
        self.page, self.status, self.delay_s = page, status, delay_s
        self.hits = 0
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        self.runner = web.AppRunner(app)
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(text=self.page, status=self.status)

    async def __aenter__(self) -> MetricsServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def test_scraper_updates_good_endpoints_and_keeps_stale_ones_stale() -> None:
    async with (
        MetricsServer(VLLM_PAGE) as good,
        MetricsServer("", status=500) as broken,
        MetricsServer("{{{ not prometheus", status=200) as garbage,
        MetricsServer(SGLANG_PAGE, delay_s=1.0) as slow,
    ):
        store, metrics, registry = Datastore(), EppMetrics(), ModelRegistry()
        store.replace(
            "static",
            [
                make_endpoint("127.0.0.1", good.port),
                make_endpoint("127.0.0.1", broken.port),
                make_endpoint("127.0.0.1", garbage.port),
                make_endpoint("127.0.0.1", slow.port, {"llm-d.ai/engine-type": "sglang"}),
            ],
        )
        by_port = {e.port: e for e in store.endpoints()}
        scraper = EngineMetricsScraper(
            store.endpoints, metrics, registry, interval_s=0.01, timeout_s=0.2
        )
        task = asyncio.create_task(scraper.run())
        try:
            await wait_for(lambda: by_port[good.port].metrics.updated_at > 0)
            errors = metrics.engine_scrape_total.labels(outcome="error")
            await wait_for(lambda: errors._value.get() >= 6 and good.hits >= 3)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert by_port[good.port].metrics.waiting == 5
        for port in (broken.port, garbage.port, slow.port):
            assert by_port[port].metrics.updated_at == 0.0
            assert by_port[port].metrics.age() == float("inf")
        # One scrape at a time per endpoint: the slow one never piles up requests.
        assert slow.hits <= good.hits
        assert registry.resolve("sql") == ("llama", "sql")


async def test_ticks_skip_endpoints_with_a_scrape_in_flight() -> None:
    async with MetricsServer(VLLM_PAGE, delay_s=0.3) as slow:
        store = Datastore()
        store.replace("static", [make_endpoint("127.0.0.1", slow.port)])
        scraper = EngineMetricsScraper(store.endpoints, EppMetrics(), timeout_s=2.0)
        assert scraper.tick() == 1
        assert scraper.tick() == 0
        await wait_for(lambda: store.endpoints()[0].metrics.updated_at > 0)
        await wait_for(lambda: scraper.tick() == 1)
        await wait_for(lambda: not scraper._inflight)
