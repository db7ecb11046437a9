"""The data the picker's layers share: a parsed request, an endpoint with its live metrics,
and the scheduler's decision. Pure data, no I/O; both the ext_proc edge and the scheduling
framework import only this module from each other."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from epp.errors import EPPError


class Role(StrEnum):
    """P/D role of an endpoint, from the pod label `llm-d.ai/role`."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"
    # Encodes multimodal inputs only (E/P/D); neither the prefill nor the decode filter
    # passes it, the encode filter reads the label itself.
    ENCODE = "encode"


@dataclass(slots=True)
class EngineMetrics:
    """What the metrics scraper last read from an endpoint's `/metrics`."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # 0..1
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int = 0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    # time.monotonic() of the last successful scrape; 0.0 means never scraped.
    updated_at: float = 0.0

    def age(self, now: float | None = None) -> float:
        """Seconds since the last successful scrape (infinite if never scraped)."""
        if self.updated_at == 0.0:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.updated_at


@dataclass(slots=True)
class Endpoint:
    """One schedulable model-server port. `key` is `ip:port`, the value of the destination
    header and the engine identity kvindex uses. `address` and `port` are fixed once made
    (a pod that moves is a new endpoint), so `key` is formatted once, not per read: the
    scheduler reads it for every candidate of every request."""

    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    role: Role = Role.BOTH
    engine_type: str = "vllm"  # label llm-d.ai/engine-type
    pod_name: str = ""
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = f"[{self.address}]" if ":" in self.address else self.address
        self.key = f"{host}:{self.port}"


@dataclass(slots=True)
class LLMRequest:
    """An inference request as the scheduler sees it, parsed from the HTTP request."""

    request_id: str
    path: str
    model: str = ""
    # The model name the client asked for may be a LoRA adapter; `base_model` is what serves
    # it (equal to `model` when it is not an adapter).
    base_model: str = ""
    lora: str | None = None
    prompt: str | None = None  # completions prompt (or Anthropic/chat rendered text, if any)
    messages: list[dict[str, Any]] | None = None  # chat messages (OpenAI or Anthropic shape)
    tools: list[dict[str, Any]] | None = None
    stream: bool = False
    cache_salt: str | None = None
    max_tokens: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: dict[str, Any] | None = None
    raw_body: bytes = b""
    # Filled lazily by whoever tokenizes first (the precise scorer), reused by the rest.
    token_ids: list[int] | None = None
    # Negative priority means sheddable (429 when saturated).
    priority: int = 0
    # Candidate subset from the proxy's subset hint (None: no hint).
    subset_hint: frozenset[str] | None = None
    # The model the client asked for when an InferenceModelRewrite replaced it ("" if not):
    # `model` and `raw_body` then carry the rewritten name.
    requested_model: str = ""
    # Set by an edge that can end the request's stream after it was scheduled (the h2 edge):
    # `evict(status, reason, message)` answers the client at once (Envoy then resets the
    # engine's request) and returns False when it cannot (the stream already ended).
    # Flow control's in-flight eviction calls it. Cleared when the stream ends.
    evict: Callable[[int, str, str], bool] | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class ProfileResult:
    """The ordered endpoints one scheduling profile picked (first is the pick)."""

    name: str
    endpoints: list[Endpoint]
    scores: dict[str, float] = field(default_factory=dict)  # endpoint key -> weighted score


@dataclass(slots=True)
class SchedulingResult:
    """The decision: the primary profile's endpoints become the destination header (pick plus
    fallbacks); `headers` are extra request headers (e.g. `x-prefiller-host-port`)."""

    profiles: dict[str, ProfileResult]
    primary_profile: str
    headers: dict[str, str] = field(default_factory=dict)
    # Headers for the edge to add to the response to the client (`x-session-token`).
    response_headers: dict[str, str] = field(default_factory=dict)

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.profiles[self.primary_profile].endpoints


@dataclass(slots=True)
class ResponseStats:
    """What the ext_proc edge observed of one response, for plugins that learn from it."""

    served: str | None  # endpoint key that served it
    status: int = 200
    streamed: bool = False
    started_at: float = 0.0  # monotonic time the request was scheduled
    first_byte_s: float | None = None  # seconds to the first response body byte (TTFT proxy)
    duration_s: float | None = None  # seconds to end of response
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    usage: Mapping[str, Any] | None = None


class SchedulingError(EPPError):
    """The scheduler could not place the request. `status` is the HTTP status the picker
    answers with and `reason` the `x-llm-d-request-dropped-reason` value."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class Scheduler(Protocol):
    """What the ext_proc edge calls once per request."""

    async def schedule(
        self, request: LLMRequest, endpoints: Sequence[Endpoint]
    ) -> SchedulingResult:
        """Pick endpoints or raise SchedulingError (503 no endpoints, 429 saturated/shed)."""
        ...

    def on_response_headers(self, request: LLMRequest, served: str | None) -> None:
        """The response started on `served` (from `x-gateway-destination-endpoint-served`)."""
        ...

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        """The response ended; the edge measured `stats` (feeds latency models, metrics)."""
        ...
