"""The picker's own Prometheus metrics (`llm_d_epp_` prefix), in one registry per server so
that tests and several pickers in one process do not collide."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from epp.types import Endpoint

PREFIX = "llm_d_epp_"
# Counted once per unknown (plugin, parameter) occurrence when the config loads.
CONFIG_UNKNOWN_PARAMETERS = PREFIX + "config_unknown_parameters_total"

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
_QUEUE_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
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
        self.config_unknown_parameters = Counter(
            CONFIG_UNKNOWN_PARAMETERS,
            "Plugin parameters in the EndpointPickerConfig that the plugin type does not read "
            "(ignored, as llm-d ignores them; --strict-config refuses them).",
            ["plugin_type", "parameter"],
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

        # Flow control (`flowControl` with its feature gate): llm-d-router's
        # inference_extension_flow_control_* series under this picker's prefix.
        self.flow_control_requests = Counter(
            PREFIX + "flow_control_requests_total",
            "Requests through flow control by priority and outcome (Dispatched, "
            "RejectedCapacity, EvictedTTL, EvictedContextCancelled, EvictedPriority, ...); "
            "requests dispatched at once without queueing count as Dispatched.",
            ["priority", "outcome"],
            registry=r,
        )
        self.flow_control_queue_duration = Histogram(
            PREFIX + "flow_control_request_queue_duration_seconds",
            "Time from enqueue to the final flow-control outcome (0 for the fast path).",
            ["priority", "outcome"],
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.flow_control_queue_size = Gauge(
            PREFIX + "flow_control_queue_size",
            "Requests held in the flow-control queue, by priority band.",
            ["priority"],
            registry=r,
        )
        self.flow_control_queue_bytes = Gauge(
            PREFIX + "flow_control_queue_bytes",
            "Request bytes held in the flow-control queue, by priority band.",
            ["priority"],
            registry=r,
        )
        self.flow_control_pool_saturation = Gauge(
            PREFIX + "flow_control_pool_saturation",
            "The pool's saturation at the last flow-control dispatch cycle (1.0: full).",
            registry=r,
        )
        self.flow_control_in_flight_evictions = Counter(
            PREFIX + "flow_control_in_flight_evictions_total",
            "Dispatched requests evicted (429 evicted; Envoy resets the engine's request) to "
            "make room for a waiting higher-priority request, by the evicted one's priority.",
            ["priority"],
            registry=r,
        )
        # InferenceModelRewrite: llm-d-router's model_rewrite_decisions_total.
        self.model_rewrite_decisions = Counter(
            PREFIX + "model_rewrite_decisions_total",
            "Requests whose model an InferenceModelRewrite rewrote, by rewrite, requested "
            "model and target model.",
            ["model_rewrite_name", "model_name", "target_model"],
            registry=r,
        )
        # InferenceObjective: requests naming an objective no source defines.
        self.unknown_objectives = Counter(
            PREFIX + "unknown_objective_total",
            "Requests whose x-gateway-inference-objective names no known InferenceObjective "
            "(served at priority 0).",
            registry=r,
        )
        self.objects_source_errors = Counter(
            PREFIX + "objects_source_errors_total",
            "Rejected InferenceObjective / InferenceModelRewrite updates (bad objects file or "
            "object, failed watch), by source.",
            ["source"],
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


class PrometheusFlowControlObserver:
    """Flow control's observer (`epp.flowcontrol.controller.FlowControlObserver`) as the
    picker's `flow_control_*` series. Priorities are bounded by the objectives configured."""

    def __init__(self, metrics: EppMetrics) -> None:
        self.metrics = metrics
        self._outcomes: dict[tuple[int, str], tuple[Counter, Histogram]] = {}

    def outcome(self, priority: int, outcome: str, wait_s: float) -> None:
        key = (priority, outcome)
        pair = self._outcomes.get(key)
        if pair is None:
            labels = (str(priority), outcome)
            pair = self._outcomes[key] = (
                self.metrics.flow_control_requests.labels(*labels),
                self.metrics.flow_control_queue_duration.labels(*labels),
            )
        pair[0].inc()
        pair[1].observe(wait_s)

    def queue(self, priority: int, length: int, size_bytes: int) -> None:
        self.metrics.flow_control_queue_size.labels(str(priority)).set(length)
        self.metrics.flow_control_queue_bytes.labels(str(priority)).set(size_bytes)

    def saturation(self, value: float) -> None:
        self.metrics.flow_control_pool_saturation.set(value)

    def evicted_in_flight(self, priority: int) -> None:
        self.metrics.flow_control_in_flight_evictions.labels(str(priority)).inc()
