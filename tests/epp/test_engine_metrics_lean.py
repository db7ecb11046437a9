"""The lean scraper: the page parser against prometheus_client's on vLLM-sized pages, the
layout hints, the prepared-GET HTTP client (chunked, read-to-close, gzip, keep-alive,
timeouts) and the slower ticks without traffic."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.picker_vllm_page import vllm_metrics_page
from epp.endpoints import Datastore, make_endpoint
from epp.engine_metrics import (
    ENGINE_METRIC_NAMES,
    EngineMetricsScraper,
    PageLayout,
    parse_engine_metrics,
)
from epp.metrics import EppMetrics
from tests.polling import wait_until_async as wait_for


def reference(page: str) -> tuple[int, int, float, float, int | None, frozenset[str]]:
    """What prometheus_client's full parser reads from the page (vLLM names)."""
    values: dict[str, list[float]] = {}
    labels_of: dict[str, dict[str, str]] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            values.setdefault(name, []).append(sample.value)
            labels_of[name] = dict(sample.labels)
    return (
        int(sum(values["vllm:num_requests_waiting"])),
        int(sum(values["vllm:num_requests_running"])),
        max(values["vllm:kv_cache_usage_perc"]),
        sum(values["vllm:prefix_cache_hits"]),
        int(labels_of["vllm:cache_config_info"]["num_gpu_blocks"]),
        frozenset(
            a for a in labels_of["vllm:lora_requests_info"]["running_lora_adapters"].split(",") if a
        ),
    )


def read(parsed) -> tuple[int, int, float, float, int | None, frozenset[str]]:
    m = parsed.metrics
    return (
        m.waiting,
        m.running,
        m.kv_usage,
        m.prefix_cache_hits,
        m.num_gpu_blocks,
        m.running_loras,
    )


@pytest.mark.parametrize("engines", [1, 4])
def test_vllm_sized_pages_read_as_prometheus_client_reads_them(engines: int) -> None:
    layout = PageLayout()
    for i in range(40):
        page = vllm_metrics_page(seed=i, engines=engines, waiting=i, running=i % 7, kv_usage=i / 40)
        assert len(page) > 30_000
        full = parse_engine_metrics(page, "vllm", 1.0)
        hinted = parse_engine_metrics(page.encode(), "vllm", 1.0, layout=layout)
        assert read(full) == read(hinted) == reference(page)
        assert (
            full.model_names == hinted.model_names == {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"}
        )
    assert layout.offsets  # the hints were in use


def test_text_format_corners() -> None:
    page = (
        'vllm:num_requests_waiting{model_name="a \\"q\\" \\\\ b",engine="0"} 2 1700000000000\r\n'
        "# TYPE vllm:num_requests_running gauge\r\n"
        "vllm:num_requests_running 3\r\n"
        "vllm:num_requests_running_foo 100\r\n"
        'vllm:kv_cache_usage_perc{le="x}"} 0.5\n'
        "vllm:prefix_cache_hits_total 4.0\n"
        "vllm:prefix_cache_hits_created 1.7e9\n"
        "other 1\n"
        "vllm:num_requests_waiting 5\n"  # the family split (not the text format): still read
    )
    parsed = parse_engine_metrics(page, "vllm", 1.0)
    m = parsed.metrics
    assert (m.waiting, m.running, m.kv_usage, m.prefix_cache_hits) == (7, 3, 0.5, 4.0)
    assert parsed.model_names == {'a "q" \\ b'}
    with pytest.raises(ValueError):
        parse_engine_metrics("vllm:num_requests_waiting{a=1} 2\n", "vllm", 1.0)
    with pytest.raises(ValueError):
        parse_engine_metrics("vllm:num_requests_waiting 2 3 4\n", "vllm", 1.0)


def test_layout_hints_survive_a_reshuffled_page() -> None:
    layout = PageLayout()
    first = vllm_metrics_page(waiting=1)
    parse_engine_metrics(first, "vllm", 1.0, layout=layout)
    # the same families, the wanted ones moved far (another exporter version)
    lines = first.splitlines(keepends=True)
    waiting = (
        'num_requests_waiting{engine="0",model_name="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"}'
    )
    moved = "".join(lines[len(lines) // 2 :] + lines[: len(lines) // 2])
    moved = moved.replace(f"{waiting} 1.0", f"{waiting} 9.0")
    assert parse_engine_metrics(moved, "vllm", 1.0, layout=layout).metrics.waiting == 9


PAGE = b"vllm:num_requests_waiting 4\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5\n"


class RawServer:
    """Answers GET requests per `mode`: content-length (keep-alive), chunked, close
    (read-to-close body), gzip, or silent (never answers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.requests = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"GET /metrics HTTP/1.1\r\n")
                self.requests += 1
                if self.mode == "silent":
                    continue
                if self.mode == "chunked":
                    half = len(PAGE) // 2
                    parts = (PAGE[:half], PAGE[half:])
                    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    writer.write(body[:7])
                    await writer.drain()
                    writer.write(body[7:])
                elif self.mode == "close":
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + PAGE)
                    await writer.drain()
                    writer.close()
                    return
                elif self.mode == "gzip":
                    body = gzip.compress(PAGE)
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                        + b"Content-Length: %d\r\n\r\n" % len(body)
                        + body
                    )
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAGE))
                    writer.write(PAGE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return


@pytest.mark.parametrize("mode", ["length", "chunked", "close", "gzip"])
async def test_replies_of_every_framing_are_read(mode: str) -> None:
    async with RawServer(mode) as server:
        endpoint = make_endpoint("127.0.0.1", server.port)
        scraper = EngineMetricsScraper(lambda: [endpoint], EppMetrics(), timeout_s=5.0)
        for _ in range(3):
            endpoint.metrics.waiting = 0
            assert await scraper.scrape(endpoint)
            assert endpoint.metrics.waiting == 4
        # keep-alive: one connection for all scrapes, unless the server closes each
        assert server.connections == (3 if mode == "close" else 1)


async def test_a_silent_endpoint_times_out_and_is_scraped_again() -> None:
    async with RawServer("silent") as server:
        store = Datastore()
        store.replace("static", [make_endpoint("127.0.0.1", server.port)])
        metrics = EppMetrics()
        scraper = EngineMetricsScraper(store.endpoints, metrics, interval_s=0.01, timeout_s=0.05)
        errors = metrics.engine_scrape_total.labels(outcome="error")
        task = asyncio.create_task(scraper.run())
        try:
            await wait_for(lambda: errors._value.get() >= 2 and server.requests >= 3)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert server.connections >= 2  # a timed-out connection is not reused
        assert store.endpoints()[0].metrics.updated_at == 0.0


async def test_without_traffic_ticks_slow_down_and_traffic_wakes_them() -> None:
    async with RawServer("length") as server:
        store = Datastore()
        store.replace("static", [make_endpoint("127.0.0.1", server.port)])
        busy = False
        scraper = EngineMetricsScraper(
            store.endpoints,
            EppMetrics(),
            interval_s=0.01,
            idle_interval_s=3600.0,
            busy=lambda: busy,
        )
        scraper._active_at -= 10.0  # no traffic for a while
        assert scraper.idle(scraper._active_at + 20.0)
        task = asyncio.create_task(scraper.run())
        try:
            await wait_for(lambda: server.requests == 1 and scraper._idle_wait is not None)
            assert server.requests == 1  # waiting out the idle tick
            scraper.wake()  # a stream opened
            await wait_for(lambda: server.requests >= 3)  # fast ticks again
            busy = True
            assert not scraper.idle(scraper._active_at + 20.0)  # streams open: never idle
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def test_without_a_busy_probe_or_a_slower_idle_interval_there_is_no_backoff() -> None:
    scraper = EngineMetricsScraper(lambda: [], EppMetrics(), interval_s=0.05)
    assert not scraper.idle(scraper._active_at + 100)
    scraper = EngineMetricsScraper(
        lambda: [], EppMetrics(), interval_s=0.05, idle_interval_s=0.05, busy=lambda: False
    )
    assert not scraper.idle(scraper._active_at + 100)
    assert ENGINE_METRIC_NAMES["vllm"].kv_usage[0] == "vllm:kv_cache_usage_perc"
