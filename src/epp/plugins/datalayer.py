"""llm-d's data-layer plugins: where per-endpoint data comes from.

This picker has one data layer: the datastore's endpoints and the engine-metrics scraper
that fills each `Endpoint.metrics` (`epp.engine_metrics`), which every metric-based plugin
reads. These plugin types configure that layer instead of adding a second one:

- `metrics-data-source`: the scraper's scheme, path and TLS verification.
- `core-metrics-extractor`: how the scraper finds an endpoint's engine and its metric names
  (built-ins: vllm, sglang, trtllm-serve, triton-tensorrt-llm; more via `engineConfigs`).
- `endpoint-notification-source`: endpoint add/remove events; the picker hands its current
  endpoints to every plugin on every request, so there is nothing to subscribe to.
- `models-data-source`, `models-data-extractor`, `k8s-notification-source`: load and say at
  start-up what they do not do here.

`apply_to_scraper(plugins, scraper)` (called by `epp serve` once the scheduler is built)
applies the first two."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from epp.engine_metrics import (
    ENGINE_LABEL_KEY,
    ENGINE_METRIC_NAMES,
    EngineMetricNames,
    EngineMetricsScraper,
    EngineSelection,
    split_metric_spec,
)
from epp.framework.params import Params
from epp.framework.plugin import Plugin
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.common import no_parameters

log = logging.getLogger(__name__)


# --- metrics-data-source ------------------------------------------------------------------


@dataclass(frozen=True)
class HTTPSourceParams:
    scheme: str = "http"
    path: str = "/metrics"
    insecure_skip_verify: bool = True


def _parse_http_source(default_path: str) -> Any:
    def parse(params: Params) -> HTTPSourceParams:
        path = params.string("path", default_path)
        if not path.startswith("/"):
            path = "/" + path
        return HTTPSourceParams(
            scheme=params.string("scheme", "http", choices=("http", "https")),
            path=path,
            insecure_skip_verify=params.boolean("insecureSkipVerify", True),
        )

    return parse


class MetricsDataSource(Plugin):
    """Engine metrics scraped from `<scheme>://<endpoint><path>` (the picker's scraper; its
    interval and timeout are `epp serve` options)."""

    type_name = "metrics-data-source"

    def __init__(self, name: str, params: HTTPSourceParams) -> None:
        super().__init__(name)
        self.params = params


# --- core-metrics-extractor ---------------------------------------------------------------

_SPEC_FIELDS = (
    ("queuedRequestsSpec", "waiting"),
    ("runningRequestsSpec", "running"),
    ("kvUsageSpec", "kv_usage"),
    ("loraSpec", "lora_info"),
    ("cacheInfoSpec", "cache_config"),
    ("cacheBlockSizeSpec", "block_size"),
    ("cacheNumBlocksSpec", "num_gpu_blocks"),
)


@dataclass(frozen=True)
class ExtractorParams:
    engine_label_key: str = ENGINE_LABEL_KEY
    default_engine: str = "vllm"
    engines: dict[str, EngineMetricNames] = field(default_factory=dict)


def _parse_engine_config(index: int, raw: object) -> tuple[str, EngineMetricNames]:
    where = f"engineConfigs[{index}]"
    if not isinstance(raw, dict):
        raise Params(None).fail(where, "must be a mapping")
    entry = Params(raw, where)
    name = entry.string("name", "")
    if not name:
        raise entry.fail("name", "engine config name cannot be empty")
    if name == "default":
        raise entry.fail("name", "engine config name cannot be 'default' (reserved)")
    specs: dict[str, tuple[str, ...]] = {}
    for param, attr in _SPEC_FIELDS:
        spec = entry.string(param, "")
        if spec:
            try:
                split_metric_spec(spec)
            except ValueError as exc:
                raise entry.fail(param, str(exc)) from None
        specs[attr] = (spec,) if spec else ()
    # Label names of the cache-info metric; this parser reads vLLM's and SGLang's
    # `block_size` and `num_gpu_blocks` labels and accepts others without effect.
    entry.ignore("cacheBlockSizeLabelName", "cacheNumBlocksLabelName")
    entry.finish()
    return name, EngineMetricNames(**specs)


def _parse_extractor(params: Params) -> ExtractorParams:
    engines: dict[str, EngineMetricNames] = {}
    for i, raw in enumerate(params.items("engineConfigs")):
        name, names = _parse_engine_config(i, raw)
        engines[name] = names
    default = params.string("defaultEngine", "vllm") or "vllm"
    if default not in engines and default not in ENGINE_METRIC_NAMES:
        known = sorted(set(engines) | set(ENGINE_METRIC_NAMES))
        raise params.fail(
            "defaultEngine", f"unknown engine {default!r} (known: {', '.join(known)})"
        )
    return ExtractorParams(
        engine_label_key=params.string("engineLabelKey", ENGINE_LABEL_KEY) or ENGINE_LABEL_KEY,
        default_engine=default,
        engines=engines,
    )


class CoreMetricsExtractor(Plugin):
    """Waiting and running requests, KV usage, LoRA adapters and cache geometry from the
    scraped page, by engine: the endpoint's `engineLabelKey` label, else `defaultEngine`."""

    type_name = "core-metrics-extractor"

    def __init__(self, name: str, params: ExtractorParams) -> None:
        super().__init__(name)
        self.params = params

    def selection(self) -> EngineSelection:
        p = self.params
        return EngineSelection(p.engine_label_key, p.default_engine, dict(p.engines))


# --- the rest -----------------------------------------------------------------------------


class EndpointNotificationSource(Plugin):
    """llm-d delivers endpoint add/delete events to extractors through this source. Here the
    datastore is the one source of endpoints and every plugin receives the current ones on
    each request (departed endpoints are dropped by the plugins that keep per-endpoint
    state), so it has nothing to do."""

    type_name = "endpoint-notification-source"


class ModelsDataSource(Plugin):
    type_name = "models-data-source"

    def __init__(self, name: str, params: HTTPSourceParams) -> None:
        super().__init__(name)
        self.params = params


class ModelsDataExtractor(Plugin):
    type_name = "models-data-extractor"


@dataclass(frozen=True)
class K8sSourceParams:
    group: str
    version: str
    kind: str


def _parse_k8s_source(params: Params) -> K8sSourceParams:
    version, kind = params.string("version", ""), params.string("kind", "")
    if not version or not kind:
        raise params.fail("version" if not version else "kind", "version and kind are required")
    return K8sSourceParams(params.string("group", ""), version, kind)


class K8sNotificationSource(Plugin):
    type_name = "k8s-notification-source"

    def __init__(self, name: str, params: K8sSourceParams) -> None:
        super().__init__(name)
        self.params = params


def apply_to_scraper(plugins: Iterable[Plugin], scraper: EngineMetricsScraper) -> None:
    """Point the engine-metrics scraper at the configured metrics-data-source and
    core-metrics-extractor (the first of each; without them the scraper keeps its
    defaults, as llm-d enables both by default)."""
    plugins = list(plugins)
    source = next((p for p in plugins if isinstance(p, MetricsDataSource)), None)
    if source is not None:
        scraper.scheme = source.params.scheme
        scraper.metrics_path = source.params.path
        scraper.verify_tls = not source.params.insecure_skip_verify
    extractor = next((p for p in plugins if isinstance(p, CoreMetricsExtractor)), None)
    if extractor is not None:
        scraper.selection = extractor.selection()


def register(registry: Registry) -> None:
    def build_metrics_source(name: str, p: HTTPSourceParams, _ctx: BuildContext) -> Plugin:
        return MetricsDataSource(name, p)

    registry.register(
        PluginType(
            MetricsDataSource.type_name,
            MetricsDataSource,
            _parse_http_source("/metrics"),
            build_metrics_source,
            "where the engine metrics are scraped",
        )
    )

    def build_extractor(name: str, p: ExtractorParams, _ctx: BuildContext) -> Plugin:
        return CoreMetricsExtractor(name, p)

    registry.register(
        PluginType(
            CoreMetricsExtractor.type_name,
            CoreMetricsExtractor,
            _parse_extractor,
            build_extractor,
            "engine metric names per engine type",
        )
    )
    registry.register(
        PluginType(
            EndpointNotificationSource.type_name,
            EndpointNotificationSource,
            no_parameters,
            lambda name, _p, _c: EndpointNotificationSource(name),
            "endpoint events (delivered by the datastore here)",
        )
    )

    def build_models_source(name: str, p: HTTPSourceParams, _ctx: BuildContext) -> Plugin:
        log.warning(
            "models-data-source %r: does not poll %s://<endpoint>%s; no plugin here reads "
            "the engines' model lists (LoRA adapters are learned from vLLM's "
            "lora_requests_info metric)",
            name,
            p.scheme,
            p.path,
        )
        return ModelsDataSource(name, p)

    registry.register(
        PluginType(
            ModelsDataSource.type_name,
            ModelsDataSource,
            _parse_http_source("/v1/models"),
            build_models_source,
            "engine model lists (not polled here)",
        )
    )

    def build_models_extractor(name: str, _p: None, _ctx: BuildContext) -> Plugin:
        log.warning(
            "models-data-extractor %r: does not extract served models per endpoint (no "
            "models-data-source is polled here)",
            name,
        )
        return ModelsDataExtractor(name)

    registry.register(
        PluginType(
            ModelsDataExtractor.type_name,
            ModelsDataExtractor,
            no_parameters,
            build_models_extractor,
            "served models per endpoint (not extracted here)",
        )
    )

    def build_k8s_source(name: str, p: K8sSourceParams, _ctx: BuildContext) -> Plugin:
        gvk = f"{p.group + '/' if p.group else ''}{p.version}, Kind={p.kind}"
        log.warning(
            "k8s-notification-source %r: does not watch Kubernetes objects (%s); no plugin "
            "here consumes such notifications",
            name,
            gvk,
        )
        return K8sNotificationSource(name, p)

    registry.register(
        PluginType(
            K8sNotificationSource.type_name,
            K8sNotificationSource,
            _parse_k8s_source,
            build_k8s_source,
            "Kubernetes object events (not watched here)",
        )
    )
