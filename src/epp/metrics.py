"""The picker's own Prometheus metrics (`llm_d_epp_` prefix), in one registry per server so
that tests and several pickers in one process do not collide."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from epp.types import Endpoint

PREFIX = "llm_d_epp_"

_LATENCY_BUCKETS = (
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.5, 1.0)


class EppMetrics:
    """Every counter the edge and the framework update. The scheduling framework observes
    `plugin_duration` (labels plugin_type, plugin_name) for each plugin call."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_total = Counter(
            PREFIX + "request_total",
            "Requests the picker scheduled, by requested and target (base) model.",
            ["model", "target_model"],
            registry=r,
        )
        self.request_error_total = Counter(
            PREFIX + "request_error_total",
            "Requests answered with an error, by error code (HTTP status or reason).",
            ["model", "error_code"],
            registry=r,
        )
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds",
            "From the request headers to the end of the response, as the picker saw it.",
            ["model", "target_model"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.scheduler_e2e_duration = Histogram(
            PREFIX + "scheduler_e2e_duration_seconds",
            "Time spent in one scheduling decision (parse excluded).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.plugin_duration = Histogram(
            PREFIX + "plugin_duration_seconds",
            "Time spent in one plugin call.",
            ["extension_point", "plugin_type", "plugin_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.plugin_errors = Counter(
            PREFIX + "plugin_error_total",
            "Plugin calls that raised (the framework carried on without them).",
            ["extension_point", "plugin_type", "plugin_name"],
            registry=r,
        )
        self.latency_predicted = Histogram(
            PREFIX + "predicted_latency_seconds",
            "Latency the latency model predicted for the picked endpoint.",
            ["metric"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.latency_observed = Histogram(
            PREFIX + "observed_latency_seconds",
            "Latency measured for responses the latency model learns from.",
            ["metric"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.latency_prediction_error = Histogram(
            PREFIX + "latency_prediction_error_seconds",
            "|observed - predicted| for responses that had a prediction.",
            ["metric"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.request_ttft = Histogram(
            PREFIX + "request_ttft_seconds",
            "Time from scheduling to the first response body byte.",
            ["model", "target_model"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.request_tpot = Histogram(
            PREFIX + "request_tpot_seconds",
            "Mean time per output token after the first (needs usage in the response).",
            ["model", "target_model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.input_tokens = Counter(
            PREFIX + "input_tokens",
            "Prompt tokens reported by responses' usage.",
            ["model", "target_model"],
            registry=r,
        )
        self.output_tokens = Counter(
            PREFIX + "output_tokens",
            "Completion tokens reported by responses' usage.",
            ["model", "target_model"],
            registry=r,
        )
        self.cached_tokens = Counter(
            PREFIX + "cached_tokens",
            "Prompt tokens served from the engine's prefix cache (usage.prompt_tokens_details).",
            ["model", "target_model"],
            registry=r,
        )
        self.model_server_errors = Counter(
            PREFIX + "model_server_error_total",
            "Responses from model servers with a status other than 2xx.",
            ["status"],
            registry=r,
        )
        self.inflight_streams = Gauge(
            PREFIX + "inflight_streams", "Open ext_proc streams.", registry=r
        )
        self.client_disconnects = Counter(
            PREFIX + "client_disconnect_total",
            "Streams that ended before the response completed.",
            registry=r,
        )
        self.skipped = Counter(
            PREFIX + "skipped_total",
            "Inputs skipped and why (unknown ext_proc messages, unparsable usage, ...).",
            ["what"],
            registry=r,
        )
        self.endpoint_source_errors = Counter(
            PREFIX + "endpoint_source_errors_total",
            "Endpoint source updates rejected (invalid endpoints file, bad pool object, ...).",
            ["source"],
            registry=r,
        )
        self.engine_scrape_total = Counter(
            PREFIX + "engine_scrape_total",
            "Engine /metrics scrapes by outcome.",
            ["outcome"],
            registry=r,
        )
        self.pool_ready_endpoints = Gauge(
            PREFIX + "pool_ready_endpoints", "Endpoints known to the datastore.", registry=r
        )
        self.pool_average_queue_size = Gauge(
            PREFIX + "pool_average_queue_size",
            "Mean waiting requests across endpoints with fresh metrics.",
            registry=r,
        )
        self.pool_average_kv_cache_utilization = Gauge(
            PREFIX + "pool_average_kv_cache_utilization",
            "Mean KV-cache usage (0..1) across endpoints with fresh metrics.",
            registry=r,
        )

    def bind_pool(self, endpoints: Callable[[], Sequence[Endpoint]]) -> None:
        """Pool gauges are computed from the datastore at scrape time."""

        def scraped() -> list[Endpoint]:
            return [e for e in endpoints() if e.metrics.updated_at > 0.0]

        def mean_queue() -> float:
            eps = scraped()
            return sum(e.metrics.waiting for e in eps) / len(eps) if eps else 0.0

        def mean_kv() -> float:
            eps = scraped()
            return sum(e.metrics.kv_usage for e in eps) / len(eps) if eps else 0.0

        self.pool_ready_endpoints.set_function(lambda: float(len(endpoints())))
        self.pool_average_queue_size.set_function(mean_queue)
        self.pool_average_kv_cache_utilization.set_function(mean_kv)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PrometheusObserver:
    """The scheduling framework's `SchedulerObserver`, exported as Prometheus series. Endpoint
    keys are not used as labels (unbounded cardinality in a changing pool)."""

    def __init__(self, metrics: EppMetrics) -> None:
        self.metrics = metrics
        # (extension point, plugin type, plugin name) -> its histogram child: `labels()`
        # validates and joins the labels on every call, several times per decision. Bounded
        # by the configured plugins.
        self._durations: dict[tuple[str, str, str], Histogram] = {}

    def plugin_duration(
        self, extension_point: str, plugin_type: str, plugin_name: str, seconds: float
    ) -> None:
        key = (extension_point, plugin_type, plugin_name)
        child = self._durations.get(key)
        if child is None:
            child = self._durations[key] = self.metrics.plugin_duration.labels(*key)
        child.observe(seconds)

    def plugin_error(self, extension_point: str, plugin_type: str, plugin_name: str) -> None:
        self.metrics.plugin_errors.labels(extension_point, plugin_type, plugin_name).inc()

    def latency_predicted(self, endpoint_key: str, metric: str, seconds: float) -> None:
        self.metrics.latency_predicted.labels(metric).observe(seconds)

    def latency_observed(
        self, endpoint_key: str, metric: str, predicted_s: float | None, actual_s: float
    ) -> None:
        self.metrics.latency_observed.labels(metric).observe(actual_s)
        if predicted_s is not None:
            self.metrics.latency_prediction_error.labels(metric).observe(
                abs(actual_s - predicted_s)
            )
