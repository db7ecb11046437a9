"""llm-d's data-layer plugins configure the one engine-metrics scraper; parsers, the
request-attribute reporter, the notification and models sources and the flow-control
policies load and say at start-up what they do not do here."""

from __future__ import annotations

import logging
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from epp.engine_metrics import EngineMetricsScraper, parse_engine_metrics, split_metric_spec
from epp.framework import ConfigError, build_scheduler, load_config
from epp.metrics import EppMetrics
from epp.plugins import default_registry
from epp.plugins.datalayer import apply_to_scraper
from epp.types import Endpoint

# llm-d-router config/charts/epplib/templates/_config.yaml (commit 520af47), rendered with the
# chart's default values (latency predictor off, vLLM over HTTP).
CHART_DEFAULT = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters:
    scheme: "http"
    path: "/metrics"
    insecureSkipVerify: true
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""

CUSTOM_PAGE = """\
# TYPE custom_queue_size gauge
custom_queue_size{status="waiting"} 7
custom_queue_size{status="done"} 100
# TYPE custom_running gauge
custom_running 3
# TYPE custom_cache_utilization gauge
custom_cache_utilization 0.25
"""


def test_metric_spec_syntax() -> None:
    assert split_metric_spec("vllm:num_requests_waiting") == ("vllm:num_requests_waiting", {})
    assert split_metric_spec('m{a=b, c="d"}') == ("m", {"a": "b", "c": "d"})
    with pytest.raises(ValueError):
        split_metric_spec("m{a=b")


def test_triton_metrics_are_selected_by_label() -> None:
    page = """\
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{request_type="waiting"} 4
nv_trt_llm_request_metrics{request_type="scheduled"} 2
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"} 0.5
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per"} 32
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"} 1000
"""
    m = parse_engine_metrics(page, "triton-tensorrt-llm", now=1.0).metrics
    assert (m.waiting, m.running, m.kv_usage) == (4, 2, 0.5)
    assert (m.block_size, m.num_gpu_blocks) == (32, 1000)


def test_the_charts_default_config_builds_and_configures_the_scraper() -> None:
    s = build_scheduler(load_config(CHART_DEFAULT, default_registry()))
    scraper = EngineMetricsScraper(lambda: [], EppMetrics())
    apply_to_scraper(s.plugins, scraper)
    assert (scraper.scheme, scraper.metrics_path, scraper.verify_tls) == ("http", "/metrics", False)
    assert scraper.selection is not None and scraper.selection.default_engine == "vllm"


async def test_custom_engine_metrics_reach_the_endpoint() -> None:
    text = """\
plugins:
- type: metrics-data-source
  parameters: {path: /custom-metrics}
- type: core-metrics-extractor
  parameters:
    engineLabelKey: example.com/engine
    engineConfigs:
    - name: my-custom-engine
      queuedRequestsSpec: "custom_queue_size{status=waiting}"
      runningRequestsSpec: "custom_running"
      kvUsageSpec: "custom_cache_utilization"
- type: queue-scorer
"""
    s = build_scheduler(load_config(text, default_registry()))

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=CUSTOM_PAGE)

    app = web.Application()
    app.router.add_get("/custom-metrics", page)
    async with TestServer(app, host="127.0.0.1") as server:
        endpoint = Endpoint(
            "127.0.0.1", server.port or 0, labels={"example.com/engine": "my-custom-engine"}
        )
        scraper = EngineMetricsScraper(lambda: [endpoint], EppMetrics())
        apply_to_scraper(s.plugins, scraper)
        assert await scraper.scrape(endpoint)
    m = endpoint.metrics
    assert (m.waiting, m.running, m.kv_usage) == (7, 3, 0.25)
    assert m.updated_at <= time.monotonic()


def test_core_metrics_extractor_validation() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        load_config(
            "plugins:\n- type: core-metrics-extractor\n  parameters:\n"
            "    engineConfigs: [{name: default}]\n",
            default_registry(),
        )
    with pytest.raises(ConfigError, match="unknown engine"):
        load_config(
            "plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: nope}\n",
            default_registry(),
        )
    with pytest.raises(ConfigError, match="scheme"):
        load_config(
            "plugins:\n- type: metrics-data-source\n  parameters: {scheme: ftp}\n",
            default_registry(),
        )


def test_sources_that_do_nothing_here_say_so(caplog: pytest.LogCaptureFixture) -> None:
    text = """\
plugins:
- type: endpoint-notification-source
- type: models-data-source
- type: models-data-extractor
- type: k8s-notification-source
  parameters: {group: inference.networking.k8s.io, version: v1, kind: InferencePool}
- type: request-attribute-reporter
  parameters:
    attributes:
    - key: {name: tokens}
      expression: usage.prompt_tokens + usage.completion_tokens
- type: vllmgrpc-parser
- type: passthrough-parser
- type: vertexai-parser
- type: openai-parser
- type: queue-scorer
"""
    with caplog.at_level(logging.INFO):
        build_scheduler(load_config(text, default_registry()))
    warned = {
        r.getMessage().split(" ", 1)[0] for r in caplog.records if r.levelno == logging.WARNING
    }
    assert warned >= {
        "models-data-source",
        "models-data-extractor",
        "k8s-notification-source",
        "request-attribute-reporter",
        "vllmgrpc-parser",
        "passthrough-parser",
        "vertexai-parser",
    }
    assert "openai-parser" not in warned
    assert "InferencePool" in caplog.text and "/v1/models" in caplog.text


def test_source_parameter_validation() -> None:
    with pytest.raises(ConfigError, match="version and kind"):
        load_config(
            "plugins:\n- type: k8s-notification-source\n  parameters: {kind: Pod}\n",
            default_registry(),
        )
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(
            "plugins:\n- type: request-attribute-reporter\n  parameters: {attributes: []}\n",
            default_registry(),
        )
    reporter = load_config(
        "plugins:\n- type: request-attribute-reporter\n  parameters:\n    attributes:\n"
        "    - {key: {name: n}, expression: '1'}\n",
        default_registry(),
    ).plugin("request-attribute-reporter")
    assert reporter.parameters.namespace == "envoy.lb"


FLOW_CONTROL_TYPES = (
    "fcfs-ordering-policy",
    "edf-ordering-policy",
    "slo-deadline-ordering-policy",
    "global-strict-fairness-policy",
    "round-robin-fairness-policy",
    "static-usage-limit-policy",
    "priority-then-time-eviction-order-policy",
    "sheddable-eviction-filter",
)


def test_flow_control_policies_load_as_real_policies() -> None:
    from epp.flowcontrol import core

    text = (
        "plugins:\n"
        + "".join(f"- type: {t}\n" for t in FLOW_CONTROL_TYPES)
        + "- type: queue-scorer\n"
    )
    scheduler = build_scheduler(load_config(text, default_registry()))
    kinds = (
        core.OrderingPolicy,
        core.FairnessPolicy,
        core.UsageLimitPolicy,
        core.EvictionOrder,
        core.EvictionFilter,
    )
    for type_name in FLOW_CONTROL_TYPES:
        assert isinstance(scheduler.plugin(type_name), kinds)
    assert scheduler.flow_control is None  # no flowControl gate: nothing queues
    with pytest.raises(ConfigError, match="threshold"):
        load_config(
            "plugins:\n- type: static-usage-limit-policy\n  parameters: {threshold: 0}\n",
            default_registry(),
        )
