"""Scrape each endpoint's Prometheus `/metrics` into its `EngineMetrics`.

Every tick (50 ms by default) each endpoint without a scrape in flight gets one, concurrently,
with a per-request timeout; a slow endpoint skips ticks instead of piling up requests. Only
a successful scrape replaces the endpoint's metrics (so `updated_at` measures staleness).

Engine pages are large (a real vLLM page is ~60 KB: histograms, HTTP and process series) and
everything runs on the event loop, so a scrape costs as little as it can: a prepared GET on a
keep-alive connection per endpoint (no HTTP client library, no task per scrape), and one pass
of a compiled regex over the reply finding the few lines of the wanted metrics; nothing else
of the page is parsed (`parse_engine_metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import ssl
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from epp.metrics import EppMetrics
from epp.requests import ModelRegistry
from epp.types import Endpoint, EngineMetrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.05
DEFAULT_TIMEOUT_S = 0.5
# Without traffic (no ext_proc stream open, none opened for IDLE_AFTER_S) nothing reads the
# metrics, so they are scraped every DEFAULT_IDLE_INTERVAL_S; the first stream brings the
# fast interval back at once.
DEFAULT_IDLE_INTERVAL_S = 1.0
IDLE_AFTER_S = 1.0


def split_metric_spec(spec: str) -> tuple[str, dict[str, str]]:
    """llm-d's metric spec `name` or `name{label=value,...}` -> (name, required labels)."""
    name, brace, rest = spec.partition("{")
    if not brace:
        return spec.strip(), {}
    if not rest.endswith("}"):
        raise ValueError(f"metric spec {spec!r}: missing closing brace")
    labels: dict[str, str] = {}
    for pair in rest[:-1].split(","):
        if not pair.strip():
            continue
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"metric spec {spec!r}: expected label=value, got {pair!r}")
        labels[key.strip()] = value.strip().strip('"')
    return name.strip(), labels


@dataclass(frozen=True, slots=True)
class EngineMetricNames:
    """Metric specs per engine; each tuple lists accepted specs, newest first. A spec is a
    metric name, optionally with required labels (`name{label=value}`, llm-d's syntax)."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...]
    lora_info: tuple[str, ...] = ()
    cache_config: tuple[str, ...] = ()
    prefix_queries: tuple[str, ...] = ()
    prefix_hits: tuple[str, ...] = ()
    # Engines that publish the cache geometry as values rather than info labels (TRT-LLM).
    block_size: tuple[str, ...] = ()
    num_gpu_blocks: tuple[str, ...] = ()

    def value_specs(self) -> tuple[str, ...]:
        return (
            self.waiting
            + self.running
            + self.kv_usage
            + self.prefix_queries
            + self.prefix_hits
            + self.block_size
            + self.num_gpu_blocks
        )

    def all(self) -> frozenset[str]:
        names = tuple(
            split_metric_spec(spec)[0]
            for spec in self.value_specs() + self.lora_info + self.cache_config
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
    # llm-d's core-metrics-extractor built-ins for TensorRT-LLM.
    "trtllm-serve": EngineMetricNames(
        waiting=("trtllm_num_requests_waiting",),
        running=("trtllm_num_requests_running",),
        kv_usage=("trtllm_kv_cache_utilization",),
        block_size=("trtllm_kv_cache_tokens_per_block",),
        num_gpu_blocks=("trtllm_kv_cache_max_blocks",),
    ),
    "triton-tensorrt-llm": EngineMetricNames(
        waiting=("nv_trt_llm_request_metrics{request_type=waiting}",),
        running=("nv_trt_llm_request_metrics{request_type=scheduled}",),
        kv_usage=("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",),
        block_size=("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}",),
        num_gpu_blocks=("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}",),
    ),
}


@dataclass(slots=True)
class ParsedEngineMetrics:
    metrics: EngineMetrics
    model_names: set[str] = field(default_factory=set)  # `model_name` labels seen


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


# Label pairs `name="value"`; values with backslash escapes take the slow path.
_LABEL_PAIR = re.compile(rb'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"([^"\\]*)"\s*(?:,|$)')
_LABELS_PLAIN = re.compile(rb'\s*(?:[A-Za-z_][A-Za-z0-9_]*\s*=\s*"[^"\\]*"\s*(?:,\s*|$))*')
_LABEL_ESCAPED = re.compile(rb'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = re.compile(rb"\\(.)")


def _unescape(match: re.Match[bytes]) -> bytes:
    return b"\n" if match.group(1) == b"n" else match.group(1)


@functools.lru_cache(maxsize=4096)
def _parse_labels(inner: bytes) -> dict[str, str]:
    """`a="x",b="y"` (between the braces) -> {"a": "x", "b": "y"}; ValueError when the
    text is not only such pairs. Memoized (a page's label sets repeat scrape after scrape):
    the dict returned is shared, read it only."""
    if b"\\" not in inner and _LABELS_PLAIN.fullmatch(inner):
        return {k.decode(): v.decode() for k, v in _LABEL_PAIR.findall(inner)}
    labels: dict[str, str] = {}
    pos, size = 0, len(inner)
    while pos < size:
        match = _LABEL_ESCAPED.match(inner, pos)
        if match is None or match.end() == pos:
            if inner[pos:].strip():
                raise ValueError(f"malformed labels {inner[:80]!r}")
            break
        value = match.group(2)
        if b"\\" in value:
            value = _UNESCAPE.sub(_unescape, value)
        labels[match.group(1).decode()] = value.decode()
        pos = match.end()
    return labels


def _sample(line: bytes) -> tuple[dict[str, str], float]:
    """The rest of a sample line after its name: `{labels} value [timestamp]` or
    ` value [timestamp]`. ValueError when it is not that."""
    labels: dict[str, str] = {}
    if line[:1] == b"{":
        close = line.rfind(b"}")  # values and timestamps hold no brace
        if close < 0:
            raise ValueError(f"unterminated labels {line[:80]!r}")
        labels = _parse_labels(line[1:close])
        line = line[close + 1 :]
    parts = line.split()
    if not parts or len(parts) > 2:
        raise ValueError(f"malformed sample {line[:80]!r}")
    return labels, float(parts[0])


def _samples_regex(bases: Sequence[str]) -> re.Pattern[bytes]:
    """Matches a line starting with one of `bases` (or its `_total` spelling) followed by
    labels or a blank; group 1 is the base name. A common prefix ("vllm:") is factored out
    so that the regex engine's literal search skips to its occurrences."""
    names = sorted((b.encode() for b in bases), key=len, reverse=True)
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    alternatives = b"|".join(re.escape(n[len(prefix) :]) for n in names)
    return re.compile(
        b"\n(" + re.escape(prefix) + b"(?:" + alternatives + b"))(?:_total)?(?=[{ \t])"
    )


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one parse of a page looks for (built once per set of names)."""

    regex: re.Pattern[bytes]
    specs_by_name: Mapping[str, list[tuple[str, dict[str, str]]]]
    lora_info: frozenset[str]
    cache_info: frozenset[str]
    plain: frozenset[str]  # value metrics whose specs require no labels


@functools.lru_cache(maxsize=64)
def _plan(names: EngineMetricNames) -> _Plan:
    specs_by_name: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for spec in names.value_specs():
        name, required = split_metric_spec(spec)
        specs_by_name.setdefault(name.removesuffix("_total"), []).append((spec, required))
    lora_info = frozenset(n.removesuffix("_total") for n in names.lora_info)
    cache_info = frozenset(n.removesuffix("_total") for n in names.cache_config)
    bases = sorted(set(specs_by_name) | lora_info | cache_info)
    plain = frozenset(
        name
        for name, specs in specs_by_name.items()
        if name not in lora_info | cache_info and not any(required for _, required in specs)
    )
    return _Plan(_samples_regex(bases), specs_by_name, lora_info, cache_info, plain)


# A wanted metric's samples are looked for again near where they were on the endpoint's
# previous page (a page's layout barely moves between scrapes: counters grow a digit), within
# this many bytes either way, and the whole page is searched every FULL_SCAN_EVERY scrapes
# (so that a family that appears later is found).
LAYOUT_WINDOW = 1024
FULL_SCAN_EVERY = 64


@dataclass(slots=True)
class PageLayout:
    """Where each wanted metric's sample group started on an endpoint's last page (byte
    offsets of the group's first line), for `parse_engine_metrics` to look there first."""

    offsets: dict[bytes, int] = field(default_factory=dict)
    scans_left: int = 0  # hinted parses before the next full scan


def _group(
    page: bytes, base: bytes, start: int, out: list[tuple[str, bytes]], one_line: bool = False
) -> int:
    """Append (base, rest of line) for the sample lines of `base` (or `base_total`) from
    the line at `start` on, while lines start with `base` (a family's samples are one group
    in the text format; its `_created`/`_bucket` lines are skipped); returns how many."""
    name = base.decode()
    size, found = len(base), 0
    while page.startswith(base, start):
        end = page.find(b"\n", start)
        if end < 0:
            end = len(page)
        at = start + size
        if page.startswith(b"_total", at):
            at += 6
        if page[at : at + 1] in (b"{", b" ", b"\t"):
            out.append((name, page[at:end]))
            found += 1
        if one_line:
            break
        start = end + 1
    return found


def _locate_hinted(page: bytes, layout: PageLayout) -> list[tuple[str, bytes]] | None:
    """The wanted samples found near their previous offsets; None when any group is not
    where it was (moved further than LAYOUT_WINDOW, or the find landed inside a group)."""
    out: list[tuple[str, bytes]] = []
    for base, offset in layout.offsets.items():
        if offset == 0:
            pos = 0 if page.startswith(base) else -1
        else:
            needle = b"\n" + base
            found = page.find(needle, max(0, offset - 1 - LAYOUT_WINDOW), offset + LAYOUT_WINDOW)
            pos = found + 1 if found >= 0 else -1
            if pos > 0 and page.startswith(base, page.rfind(b"\n", 0, found) + 1):
                return None  # the line before is of the same group: not its first line
        if pos < 0 or not _group(page, base, pos, out):
            return None
        layout.offsets[base] = pos
    return out


def _locate_all(
    page: bytes, regex: re.Pattern[bytes], layout: PageLayout | None
) -> list[tuple[str, bytes]]:
    """Every wanted sample line: one pass of the regex engine over the page (`regex` from
    `_samples_regex`) finds each group's first line, `_group` reads the group. Records the
    groups' offsets in `layout`."""
    out: list[tuple[str, bytes]] = []
    offsets: dict[bytes, int] = {}
    first_end = page.find(b"\n")
    head = regex.match(b"\n" + (page if first_end < 0 else page[: first_end + 1]))
    if head is not None:  # the page's first line (no newline before it)
        offsets[head.group(1)] = 0
    counts: dict[bytes, int] = dict.fromkeys(offsets, 1)
    for match in regex.finditer(page):
        base = match.group(1)
        if base in counts:
            counts[base] += 1
        else:
            offsets[base], counts[base] = match.start() + 1, 1
    grouped = True
    for base, offset in sorted(offsets.items(), key=lambda item: item[1]):
        grouped = _group(page, base, offset, out) == counts[base] and grouped
    if not grouped:  # a family split over the page (not the text format): line by line
        out = []
        starts = [0] if head is not None else []
        starts += [m.start() + 1 for m in regex.finditer(page)]
        for start in starts:
            base = page[start : page.find(b"\n", start) if b"\n" in page[start:] else None]
            line_match = regex.match(b"\n" + base)
            if line_match is not None:
                _group(page, line_match.group(1), start, out, one_line=True)
        offsets = {}
    if layout is not None:
        layout.offsets = offsets
        layout.scans_left = FULL_SCAN_EVERY
    return out


def parse_engine_metrics(
    text: str | bytes,
    engine_type: str,
    now: float,
    names: EngineMetricNames | None = None,
    layout: PageLayout | None = None,
) -> ParsedEngineMetrics:
    """Pure: a metrics page -> EngineMetrics stamped `now`. Several series of one metric
    (data-parallel engines behind one port) are summed for counts, maxed for KV usage.
    `names` overrides the built-in specs of `engine_type` (core-metrics-extractor's
    engineConfigs). Only the wanted metrics are looked at (`_locate_all`, or near where they
    were on the endpoint's previous page: `layout`); the rest of the
    page is never parsed. Raises ValueError on a malformed sample of a wanted metric."""
    if names is None:
        names = ENGINE_METRIC_NAMES.get(engine_type, ENGINE_METRIC_NAMES["vllm"])
    page = text.encode() if isinstance(text, str) else text
    if page.startswith(b"\xef\xbb\xbf"):
        page = page[3:]
    plan = _plan(names)
    values: dict[str, list[float]] = {}
    lora_newest: tuple[float, dict[str, str]] | None = None
    cache_config: dict[str, str] = {}
    model_names: set[str] = set()
    samples = None
    if layout is not None and layout.scans_left > 0 and layout.offsets:
        layout.scans_left -= 1
        samples = _locate_hinted(page, layout)
    if samples is None:
        samples = _locate_all(page, plan.regex, layout)
    for base, rest in samples:
        if base in plan.plain and b"\\" not in rest:
            # No label is read but the model name: skip parsing the others.
            close = rest.rfind(b"}") + 1
            parts = rest[close:].split()
            if len(parts) not in (1, 2) or (
                close and not _LABELS_PLAIN.fullmatch(rest, 1, close - 1)
            ):
                raise ValueError(f"malformed sample of {base!r}")
            value = float(parts[0])
            at = rest.find(b'model_name="', 0, close)
            if at >= 0:
                end = rest.find(b'"', at + 12)
                if end > 0:
                    model_names.add(rest[at + 12 : end].decode())
            for spec, _ in plan.specs_by_name[base]:
                values.setdefault(spec, []).append(value)
            continue
        labels, value = _sample(rest)
        model = labels.get("model_name")
        if model:
            model_names.add(model)
        if base in plan.lora_info:
            # One series per adapter set, valued with its timestamp: newest wins.
            if lora_newest is None or value >= lora_newest[0]:
                lora_newest = (value, labels)
        elif base in plan.cache_info:
            cache_config.update(labels)
        else:
            for spec, required in plan.specs_by_name.get(base, ()):
                if all(labels.get(k) == v for k, v in required.items()):
                    values.setdefault(spec, []).append(value)

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
    if (block := first(names.block_size)) is not None:
        metrics.block_size = int(max(block))
    if (blocks := first(names.num_gpu_blocks)) is not None:
        metrics.num_gpu_blocks = int(sum(blocks))
    return ParsedEngineMetrics(metrics=metrics, model_names=model_names)


# The label llm-d reads an endpoint's engine from, and GIE's deprecated spelling of it.
ENGINE_LABEL_KEY = "llm-d.ai/engine-type"
LEGACY_ENGINE_LABEL_KEY = "inference.networking.k8s.io/engine-type"


@dataclass(frozen=True, slots=True)
class EngineSelection:
    """How to find an endpoint's metric names (llm-d's core-metrics-extractor): the engine
    is the endpoint's `label_key` label (GIE's deprecated key as a fallback), else
    `default_engine`; `engines` adds or replaces specs by engine name."""

    label_key: str = ENGINE_LABEL_KEY
    default_engine: str = "vllm"
    engines: Mapping[str, EngineMetricNames] = field(default_factory=dict)

    def names_for(self, endpoint: Endpoint) -> tuple[str, EngineMetricNames]:
        labels = endpoint.labels
        engine = (
            labels.get(self.label_key) or labels.get(LEGACY_ENGINE_LABEL_KEY) or self.default_engine
        )
        names = self.engines.get(engine) or ENGINE_METRIC_NAMES.get(engine)
        if names is None:
            names = self.engines.get(self.default_engine) or ENGINE_METRIC_NAMES["vllm"]
        return engine, names


class _PageConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an endpoint's metrics port, one GET at a time.
    No client library: the request is a prepared byte string, the reply is read into one
    buffer and handed to `on_page(status, body)` (or `on_error(reason)`) from
    `data_received` itself, with no task or future per scrape. Content-Length, chunked and
    read-to-close bodies; gzip only if a server sends it unasked."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False
        self.started = 0.0  # loop time the GET in flight was sent
        self._buffer = bytearray()
        self._on_page: Callable[[int, bytes], None] | None = None
        self._on_error: Callable[[str], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get(
        self,
        request: bytes,
        now: float,
        on_page: Callable[[int, bytes], None],
        on_error: Callable[[str], None],
    ) -> None:
        assert self.transport is not None and not self.busy
        self.busy, self.started = True, now
        self._on_page, self._on_error = on_page, on_error
        self._buffer.clear()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.abort()  # bytes nobody asked for: the connection is not HTTP we understand
            return
        self._buffer += data
        try:
            reply = _parse_reply(self._buffer, eof=False)
        except ValueError as exc:
            self._fail(str(exc))
            return
        if reply is not None:
            self._deliver(*reply)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost finishes a read-to-close body

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy:
            try:
                reply = _parse_reply(self._buffer, eof=True)
            except ValueError as err:
                self._fail(str(err))
                return
            if reply is None:
                self._fail(f"connection closed ({exc or 'by the server'})")
            else:
                self._deliver(*reply)

    def _deliver(self, status: int, body: bytes, keep_alive: bool) -> None:
        on_page = self._on_page
        self.busy, self._on_page, self._on_error = False, None, None
        self._buffer.clear()
        if not keep_alive:
            self.abort()
        assert on_page is not None
        on_page(status, body)

    def _fail(self, reason: str) -> None:
        on_error = self._on_error
        self.busy, self._on_page, self._on_error = False, None, None
        self.abort()
        if on_error is not None:
            on_error(reason)

    def timed_out(self, timeout_s: float) -> None:
        self._fail(f"timed out after {timeout_s:g} s")

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


_MAX_HEAD = 64 << 10
_MAX_BODY = 64 << 20


def _parse_reply(buffer: bytearray, eof: bool) -> tuple[int, bytes, bool] | None:
    """(status, body, keep-alive) once `buffer` holds a whole HTTP/1.x reply, else None;
    ValueError when it is not one."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buffer) > _MAX_HEAD:
            raise ValueError("reply head too large")
        return None
    lines = bytes(buffer[:head_end]).split(b"\r\n")
    status_line = lines[0].split(None, 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1 reply: {lines[0][:60]!r}")
    status = int(status_line[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    keep_alive = (
        headers.get(b"connection", b"").lower() != b"close" and status_line[0] != b"HTTP/1.0"
    )
    start = head_end + 4
    encoding = headers.get(b"transfer-encoding", b"").lower()
    if b"chunked" in encoding:
        body = _dechunk(buffer, start)
        if body is None:
            if eof:
                raise ValueError("connection closed inside a chunked body")
            return None
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        if length > _MAX_BODY:
            raise ValueError("page too large")
        if len(buffer) - start < length:
            if eof:
                raise ValueError("connection closed inside the body")
            return None
        body = bytes(buffer[start : start + length])
    else:  # the body ends with the connection
        if not eof:
            if len(buffer) > _MAX_BODY:
                raise ValueError("page too large")
            return None
        body, keep_alive = bytes(buffer[start:]), False
    if headers.get(b"content-encoding", b"identity").lower() in (b"gzip", b"x-gzip"):
        body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
    return status, body, keep_alive


def _dechunk(buffer: bytearray, pos: int) -> bytes | None:
    parts: list[bytes] = []
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            return b"".join(parts) if buffer.find(b"\r\n", pos) >= 0 else None
        if len(buffer) < pos + size + 2:
            return None
        parts.append(bytes(buffer[pos : pos + size]))
        pos += size + 2


class EngineMetricsScraper:
    """Background scraping of every datastore endpoint. `run()` until cancelled.

    Every tick each endpoint without a scrape in flight gets a GET on its own keep-alive
    connection (`_PageConnection`); the reply is parsed where it lands, only for the metric
    names wanted (`parse_engine_metrics`). A scrape still in flight after `timeout_s` is
    abandoned (its connection closed, counted as an error) at the next tick.

    `scheme`, `metrics_path` and `verify_tls` are llm-d's metrics-data-source parameters;
    `selection` its core-metrics-extractor's (None: the endpoint's `engine_type` and the
    built-in names)."""

    def __init__(
        self,
        endpoints: Callable[[], Sequence[Endpoint]],
        metrics: EppMetrics,
        registry: ModelRegistry | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        metrics_path: str = "/metrics",
        *,
        scheme: str = "http",
        verify_tls: bool = False,
        selection: EngineSelection | None = None,
        idle_interval_s: float = DEFAULT_IDLE_INTERVAL_S,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.endpoints = endpoints
        # Slower ticks while `busy()` is false and `wake()` was not called for IDLE_AFTER_S
        # (None: always the fast interval; so is an idle interval not above `interval_s`).
        self.idle_interval_s = idle_interval_s
        self.busy = busy
        self._active_at = time.monotonic()
        self._idle_wait: asyncio.Event | None = None
        self.metrics = metrics
        self.registry = registry
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.metrics_path = metrics_path
        self.scheme = scheme
        self.verify_tls = verify_tls
        self.selection = selection
        # endpoint key -> the connection with a GET in flight, or the connecting task
        self._inflight: dict[str, _PageConnection | asyncio.Task[None]] = {}
        self._connections: dict[str, _PageConnection] = {}
        self._layouts: dict[str, PageLayout] = {}
        self._failing: set[str] = set()
        self._ok = metrics.engine_scrape_total.labels(outcome="ok")
        self._error = metrics.engine_scrape_total.labels(outcome="error")
        self._ssl: ssl.SSLContext | None = None

    def _request(self, endpoint: Endpoint) -> bytes:
        return (
            f"GET {self.metrics_path} HTTP/1.1\r\nHost: {endpoint.key}\r\n"
            "User-Agent: epp-scraper\r\nAccept: text/plain\r\n\r\n"
        ).encode()

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.scheme != "https":
            return None
        if self._ssl is None:
            context = ssl.create_default_context()
            if not self.verify_tls:  # llm-d's insecureSkipVerify
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._ssl = context
        return self._ssl

    async def scrape(self, endpoint: Endpoint) -> bool:
        """One scrape of `endpoint`, awaited (tests, tools); True when its metrics were
        replaced. The background loop uses `tick` instead."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        try:
            connection = await asyncio.wait_for(self._connect(endpoint), self.timeout_s)
        except (TimeoutError, OSError) as exc:
            self._failed(endpoint, f"connect: {exc or type(exc).__name__}")
            return False

        def finish(ok: bool) -> None:
            if not done.done():
                done.set_result(ok)

        self._get(connection, endpoint, loop.time(), finish)
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.timeout_s)
        except TimeoutError:
            connection.timed_out(self.timeout_s)
            return await done
        finally:
            if self._connections.get(endpoint.key) is not connection:
                connection.abort()  # a one-off beside a busy pooled connection

    async def _connect(self, endpoint: Endpoint) -> _PageConnection:
        connection = self._connections.get(endpoint.key)
        if connection is not None and not connection.closed and not connection.busy:
            return connection
        pooled = connection is None or connection.closed  # else: a one-off beside it
        loop = asyncio.get_running_loop()
        host = endpoint.address
        _, connection = await loop.create_connection(
            _PageConnection,
            host,
            endpoint.port,
            ssl=self._ssl_context(),
            server_hostname=host if self.scheme == "https" else None,
        )
        if pooled:
            self._connections[endpoint.key] = connection
        return connection

    def _get(
        self,
        connection: _PageConnection,
        endpoint: Endpoint,
        now: float,
        finish: Callable[[bool], None] | None = None,
    ) -> None:
        key = endpoint.key
        track = finish is None  # `scrape()` calls are not the loop's scrapes in flight

        def on_page(status: int, body: bytes) -> None:
            if track:
                self._inflight.pop(key, None)
            ok = self._accept(endpoint, status, body)
            if finish is not None:
                finish(ok)

        def on_error(reason: str) -> None:
            if track:
                self._inflight.pop(key, None)
            if self._connections.get(key) is connection:
                del self._connections[key]
            self._failed(endpoint, reason)
            if finish is not None:
                finish(False)

        if track:
            self._inflight[key] = connection
        connection.get(self._request(endpoint), now, on_page, on_error)

    def _accept(self, endpoint: Endpoint, status: int, body: bytes) -> bool:
        try:
            if status != 200:
                raise ValueError(f"HTTP {status}")
            layout = self._layouts.get(endpoint.key)
            if layout is None:
                layout = self._layouts[endpoint.key] = PageLayout()
            if self.selection is None:
                parsed = parse_engine_metrics(
                    body, endpoint.engine_type, time.monotonic(), layout=layout
                )
            else:
                engine, names = self.selection.names_for(endpoint)
                parsed = parse_engine_metrics(body, engine, time.monotonic(), names, layout)
        except ValueError as exc:
            self._failed(endpoint, str(exc))
            return False
        if self._failing:
            self._failing.discard(endpoint.key)
        endpoint.metrics = parsed.metrics  # one reference swap: readers see old or new
        self._ok.inc()
        if self.registry is not None and len(parsed.model_names) == 1:
            (base,) = parsed.model_names
            for adapter in parsed.metrics.running_loras | parsed.metrics.waiting_loras:
                self.registry.learn(adapter, base)
        return True

    def _failed(self, endpoint: Endpoint, reason: str) -> None:
        self._error.inc()
        if endpoint.key not in self._failing:
            self._failing.add(endpoint.key)
            url = f"{self.scheme}://{endpoint.key}{self.metrics_path}"
            log.warning("scraping %s failed: %s", url, reason)

    async def _connect_and_get(self, endpoint: Endpoint) -> None:
        try:
            connection = await asyncio.wait_for(self._connect(endpoint), self.timeout_s)
        except asyncio.CancelledError:
            self._inflight.pop(endpoint.key, None)
            raise
        except (TimeoutError, OSError) as exc:
            self._inflight.pop(endpoint.key, None)
            self._failed(endpoint, f"connect: {exc or type(exc).__name__}")
            return
        self._get(connection, endpoint, asyncio.get_running_loop().time())

    def tick(self) -> int:
        """Start a scrape for each endpoint that has none in flight (abandoning those in
        flight for longer than `timeout_s`); returns how many were started."""
        started = 0
        loop = asyncio.get_running_loop()
        now = loop.time()
        current = self.endpoints()
        if (
            len(self._connections) > len(current)
            or len(self._layouts) > len(current)
            or self._failing
        ):
            keys = {e.key for e in current}
            self._failing.intersection_update(keys)  # forget departed ones
            for key in [k for k in self._layouts if k not in keys]:
                del self._layouts[key]
            for key in [k for k in self._connections if k not in keys]:
                connection = self._connections.pop(key)
                if not connection.busy:
                    connection.abort()
        inflight = self._inflight
        for endpoint in current:
            pending = inflight.get(endpoint.key)
            if pending is not None:
                if (
                    not isinstance(pending, _PageConnection)
                    or now - pending.started < self.timeout_s
                ):
                    continue
                pending.timed_out(self.timeout_s)  # calls on_error: no longer in flight
            idle = self._connections.get(endpoint.key)
            if idle is not None and not idle.closed and not idle.busy:
                self._get(idle, endpoint, now)
            else:
                inflight[endpoint.key] = loop.create_task(self._connect_and_get(endpoint))
            started += 1
        return started

    def wake(self) -> None:
        """Traffic: scrape at the fast interval (now, if the loop is waiting out an idle
        tick)."""
        self._active_at = time.monotonic()
        if self._idle_wait is not None:
            self._idle_wait.set()

    def idle(self, now: float) -> bool:
        if self.busy is None or self.idle_interval_s <= self.interval_s:
            return False
        return now - self._active_at >= IDLE_AFTER_S and not self.busy()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                began = loop.time()
                self.tick()
                if self.idle(time.monotonic()):
                    self._idle_wait = wait = asyncio.Event()
                    timeout = max(0.0, self.idle_interval_s - (loop.time() - began))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wait.wait(), timeout)
                    self._idle_wait = None
                else:
                    await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - began)))
        finally:
            for pending in list(self._inflight.values()):
                if isinstance(pending, asyncio.Task):
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pending
            self._inflight.clear()
            for connection in self._connections.values():
                connection.abort()
            self._connections.clear()
