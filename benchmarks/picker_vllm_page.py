"""A vLLM-sized Prometheus `/metrics` page, for the scraper's tests and benchmarks.

A real vLLM (V1 engine, OpenAI server) page carries, besides the handful of series the
picker reads, every latency and token histogram of the engine (one `_bucket` line per
bucket), the HTTP instrumentator's per-handler series, and Python's process and GC series,
most counters with a `_created` twin: tens of KB. This renders the same families with vLLM's
names, labels and bucket boundaries (deterministically from `seed`), so that the parser sees
what it sees in production: the wanted families are a few lines among ~1,000.

`python -m benchmarks.picker_vllm_page > page.txt` writes one.
"""

from __future__ import annotations

import random
import sys

MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"

_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)
_HTTP_HIGHR_BUCKETS = tuple(
    [0.01, 0.025, 0.05, 0.075]
    + [round(0.1 + 0.05 * i, 3) for i in range(19)]
    + [round(1.0 + 0.5 * i, 2) for i in range(19)]
    + [round(10.0 + 2.5 * i, 2) for i in range(21)]
    + [60.0]
)
_HANDLERS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/metrics",
    "/health",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/ping",
    "/version",
    "/load",
)


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""


def _fmt(value: float) -> str:
    return repr(float(value))


class _Page:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lines: list[str] = []
        self.created = 1.7e9 + rng.random() * 1e6

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def gauge(self, name: str, help_text: str, series: list[tuple[dict[str, str], float]]) -> None:
        self.family(name, "gauge", help_text)
        for labels, value in series:
            self.lines.append(f"{name}{_labels(labels)} {_fmt(value)}")

    def counter(
        self, name: str, help_text: str, series: list[tuple[dict[str, str], float]]
    ) -> None:
        self.family(name, "counter", help_text)
        for labels, value in series:
            self.lines.append(f"{name}_total{_labels(labels)} {_fmt(value)}")
        for labels, _ in series:
            self.lines.append(f"{name}_created{_labels(labels)} {_fmt(self.created)}")

    def histogram(
        self,
        name: str,
        help_text: str,
        buckets: tuple[float, ...],
        labels_list: list[dict[str, str]],
    ) -> None:
        self.family(name, "histogram", help_text)
        for labels in labels_list:
            count = self.rng.randint(0, 50_000)
            cumulative = 0
            for bound in buckets:
                cumulative = min(count, cumulative + self.rng.randint(0, count // 8 + 1))
                le = {**labels, "le": _fmt(bound)}
                self.lines.append(f"{name}_bucket{_labels(le)} {_fmt(cumulative)}")
            self.lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {_fmt(count)}")
            self.lines.append(f"{name}_count{_labels(labels)} {_fmt(count)}")
            self.lines.append(f"{name}_sum{_labels(labels)} {_fmt(count * self.rng.random())}")
        for labels in labels_list:
            self.lines.append(f"{name}_created{_labels(labels)} {_fmt(self.created)}")


def vllm_metrics_page(
    seed: int = 0,
    model: str = MODEL,
    engines: int = 1,
    waiting: int = 3,
    running: int = 7,
    kv_usage: float = 0.42,
) -> str:
    """One vLLM `/metrics` page; `engines` > 1 is a data-parallel server (one series per
    engine index for every engine family)."""
    rng = random.Random(seed)
    page = _Page(rng)
    lines = page.lines
    # Python's own collectors (prometheus_client defaults).
    page.counter(
        "python_gc_objects_collected",
        "Objects collected during gc",
        [({"generation": str(g)}, rng.randint(0, 10**6)) for g in range(3)],
    )
    del lines[-3:]  # prometheus_client prints no _created for these
    page.counter(
        "python_gc_objects_uncollectable",
        "Uncollectable objects found during GC",
        [({"generation": str(g)}, 0) for g in range(3)],
    )
    del lines[-3:]
    page.counter(
        "python_gc_collections",
        "Number of times this generation was collected",
        [({"generation": str(g)}, rng.randint(0, 10**4)) for g in range(3)],
    )
    del lines[-3:]
    page.gauge(
        "python_info",
        "Python platform information",
        [
            (
                {
                    "implementation": "CPython",
                    "major": "3",
                    "minor": "12",
                    "patchlevel": "3",
                    "version": "3.12.3",
                },
                1,
            )
        ],
    )
    for name, value in (
        ("process_virtual_memory_bytes", 2.3e10),
        ("process_resident_memory_bytes", 3.1e9),
        ("process_start_time_seconds", page.created),
        ("process_open_fds", 97),
        ("process_max_fds", 1048576),
    ):
        page.gauge(name, name.replace("_", " "), [({}, value)])
    page.counter("process_cpu_seconds", "Total user and system CPU time", [({}, 1234.5)])
    del lines[-1:]
    # The HTTP instrumentator (prometheus-fastapi-instrumentator).
    statuses = ("2xx", "4xx", "5xx")
    page.counter(
        "http_requests",
        "Total number of requests by method, status and handler.",
        [
            ({"handler": h, "method": "POST" if h.startswith("/v1/c") else "GET", "status": s}, i)
            for i, h in enumerate(_HANDLERS)
            for s in statuses
        ],
    )
    for name in ("http_request_size_bytes", "http_response_size_bytes"):
        page.family(name, "summary", "Content bytes of requests/responses.")
        for h in _HANDLERS:
            lines.append(f'{name}_count{{handler="{h}"}} {_fmt(rng.randint(0, 10**5))}')
            lines.append(f'{name}_sum{{handler="{h}"}} {_fmt(rng.randint(0, 10**9))}')
        for h in _HANDLERS:
            lines.append(f'{name}_created{{handler="{h}"}} {_fmt(page.created)}')
    page.histogram(
        "http_request_duration_highr_seconds",
        "Latency with many buckets but no API specific labels.",
        _HTTP_HIGHR_BUCKETS,
        [{}],
    )
    page.histogram(
        "http_request_duration_seconds",
        "Latency with only few buckets by handler.",
        (0.1, 0.5, 1.0),
        [{"handler": h, "method": "POST" if h.startswith("/v1/c") else "GET"} for h in _HANDLERS],
    )
    # The engine's series, one per data-parallel engine index.
    per_engine = [{"engine": str(e), "model_name": model} for e in range(engines)]
    page.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        [(lbl, running) for lbl in per_engine],
    )
    page.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        [(lbl, waiting) for lbl in per_engine],
    )
    page.gauge(
        "vllm:engine_sleep_state",
        "Engine sleep state; awake = 0 means engine is sleeping.",
        [
            ({**lbl, "sleep_state": s}, 1 - i)
            for lbl in per_engine
            for i, s in enumerate(("awake", "weights_offloaded", "discard_all"))
        ],
    )
    page.gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        [(lbl, kv_usage) for lbl in per_engine],
    )
    for name, help_text in (
        (
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        ),
        ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
        (
            "vllm:mm_cache_queries",
            "Multi-modal cache queries, in terms of number of queried items.",
        ),
        ("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items."),
        ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
        ("vllm:prompt_tokens", "Number of prefill tokens processed."),
        ("vllm:generation_tokens", "Number of generation tokens processed."),
    ):
        page.counter(name, help_text, [(lbl, rng.randint(0, 10**8)) for lbl in per_engine])
    page.counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        [
            ({**lbl, "finished_reason": r}, rng.randint(0, 10**5))
            for lbl in per_engine
            for r in ("stop", "length", "abort", "error")
        ],
    )
    for name, buckets in (
        ("vllm:request_prompt_tokens", _TOKEN_BUCKETS),
        ("vllm:request_generation_tokens", _TOKEN_BUCKETS),
        ("vllm:iteration_tokens_total", _ITERATION_BUCKETS),
        ("vllm:request_max_num_generation_tokens", _TOKEN_BUCKETS),
        ("vllm:request_params_n", _N_BUCKETS),
        ("vllm:request_params_max_tokens", _TOKEN_BUCKETS),
        ("vllm:time_to_first_token_seconds", _TTFT_BUCKETS),
        ("vllm:time_per_output_token_seconds", _ITL_BUCKETS),
        ("vllm:inter_token_latency_seconds", _ITL_BUCKETS),
        ("vllm:e2e_request_latency_seconds", _LATENCY_BUCKETS),
        ("vllm:request_queue_time_seconds", _LATENCY_BUCKETS),
        ("vllm:request_inference_time_seconds", _LATENCY_BUCKETS),
        ("vllm:request_prefill_time_seconds", _LATENCY_BUCKETS),
        ("vllm:request_decode_time_seconds", _LATENCY_BUCKETS),
    ):
        page.histogram(name, f"Histogram of {name[5:].replace('_', ' ')}.", buckets, per_engine)
    page.gauge(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        [
            (
                {
                    "block_size": "16",
                    "cache_dtype": "auto",
                    "calculate_kv_scales": "False",
                    "cpu_offload_gb": "0",
                    "enable_prefix_caching": "True",
                    "engine": lbl["engine"],
                    "gpu_memory_utilization": "0.9",
                    "is_attention_free": "False",
                    "num_cpu_blocks": "None",
                    "num_gpu_blocks": "27306",
                    "num_gpu_blocks_override": "None",
                    "prefix_caching_hash_algo": "sha256_cbor",
                    "sliding_window": "None",
                    "swap_space": "4",
                    "swap_space_bytes": "4294967296",
                },
                1,
            )
            for lbl in per_engine
        ],
    )
    page.gauge(
        "vllm:lora_requests_info",
        "Running stats on lora requests.",
        [
            (
                {
                    "max_lora": "4",
                    "running_lora_adapters": "",
                    "waiting_lora_adapters": "",
                },
                page.created + 100,
            )
        ],
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(vllm_metrics_page())
