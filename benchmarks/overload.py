"""Flow control under overload, through real parts (issue 17): Envoy + `epp serve` + two
`kvindex-sim` engines (4 running requests each: the pool serves 8 at a time), objectives from
an `--objects-file` (InferenceObjective `critical` priority 10, `batch` priority -1).

Per mode, on one picker and Envoy of its own (the engines are shared, their caches do not
matter: every prompt is unique):

- idle: critical requests alone, open loop (Poisson) at `--critical-rate`: the idle TTFT.
- overload: the same critical stream plus two sheddable flows (`batch`, fairness ids
  `tenant-a` and `tenant-b`), each at `--batch-rate`, together about twice what the pool
  serves.

Modes: `flow-control` (`featureGates: [flowControl]`, the concurrency-detector at the engines'
slot count, round-robin fairness in the sheddable band, a bounded queue with a TTL; in-flight
eviction on, the default), `flow-control-no-eviction` (the same with
`--no-flow-control-in-flight-eviction`: llm-d's behaviour, a waiting critical request gets
the next slot that frees) and `no-flow-control` (the same config without the gate:
upstream's admission only, sheddable requests get 429 while the pool is saturated, the
concurrency filter may leave a request no endpoint).

Reported per mode and class: sent, served, 429 / 503 by `x-llm-d-request-dropped-reason`,
cut (evicted in flight after the engine's response began: Envoy can only reset the client
then; a streaming engine sends its headers at admission, so that is every eviction here),
lost (neither served, nor answered with a reason, nor cut), TTFT p50 / p90 and their ratio to the
mode's idle values, served requests/s; the two flows' served ratio; and the accounting check:
the picker's `llm_d_epp_flow_control_requests_total{priority, outcome}` and
`..._in_flight_evictions_total{priority}` against what the clients saw (every dispatched
request served or evicted, every rejection answered, every cut one counted as evicted).

Goals (issue 17): with flow control, critical TTFT (p50 and p90) within 1.5x of idle; the
two sheddable flows' served throughput equal (within 10%); nothing lost; flow control adds
nothing measurable when the pool is idle (idle TTFT against the no-flow-control mode).

Run: make bench NAME=overload ARGS="[--duration S] [--quick] [--json]"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.routing import Scenario, SimEngine, _f, _words, group_cpu_s, start_engines
from kvtools.demo.envoy import EnvoyProcess
from kvtools.demo.model import MODEL_NAME, write_model_dir
from kvtools.demo.processes import ManagedProcess, PortReservation, start_picker
from kvtools.demo.report import quantile

SLOTS = 4  # running requests per engine (kvindex-sim --max-num-seqs)
ENGINES = 2
TIME_SCALE = 2.0  # prefill 0.6 ms per token, decode 8 ms per token
PROMPT_WORDS = 200
MAX_TOKENS = 16
MODES = ("flow-control", "flow-control-no-eviction", "no-flow-control")
OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
REASON_HEADER = "x-llm-d-request-dropped-reason"

OBJECTS = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1}
"""


def picker_config(flow_control: bool, queue: int, ttl: str) -> str:
    gate = "featureGates: [flowControl]\n" if flow_control else ""
    return f"""\
kind: EndpointPickerConfig
{gate}plugins:
- type: concurrency-detector
  parameters: {{maxConcurrency: {SLOTS}}}
- type: queue-scorer
- type: max-score-picker
- type: round-robin-fairness-policy
saturationDetector: {{pluginRef: concurrency-detector}}
flowControl:
  maxRequests: {queue}
  defaultRequestTTL: {ttl}
  priorityBands:
  - {{priority: -1, fairnessPolicyRef: round-robin-fairness-policy}}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: concurrency-detector}}
  - {{pluginRef: queue-scorer}}
  - {{pluginRef: max-score-picker}}
"""


@dataclass(frozen=True, slots=True)
class Stream:
    """One open-loop client stream: its objective, fairness id and arrival rate."""

    name: str
    objective: str
    flow: str
    rate: float


@dataclass(slots=True)
class Outcome:
    stream: str
    status: int = 0
    reason: str = ""
    ttft_s: float | None = None
    error: str = ""

    @property
    def served(self) -> bool:
        return self.status == 200 and self.ttft_s is not None and not self.error

    @property
    def answered(self) -> bool:
        """Turned away with a status and a dropped reason."""
        return not self.served and bool(self.reason) and not self.error

    @property
    def cut(self) -> bool:
        """The response began (200) and then broke: an in-flight eviction once the engine
        had answered (Envoy can only reset the client then)."""
        return self.status == 200 and not self.served


@dataclass(slots=True)
class ClassRow:
    mode: str
    phase: str
    stream: str
    sent: int
    served: int
    answers: dict[str, int]  # "429 rejected-saturated" -> count
    cut: int  # evicted after the response began (see Outcome.cut)
    lost: int
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    served_per_s: float
    p50_vs_idle: float | None = None
    p90_vs_idle: float | None = None


@dataclass(slots=True)
class ModeResult:
    mode: str
    rows: list[ClassRow] = field(default_factory=list)
    # the picker's flow-control outcome counters: "priority/outcome" -> count
    picker_outcomes: dict[str, float] = field(default_factory=dict)
    accounting: list[str] = field(default_factory=list)  # mismatches (empty: all accounted)
    picker_cpu_s: float = 0.0


def _body(rng: random.Random) -> bytes:
    return json.dumps(
        {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": _words(rng, PROMPT_WORDS)}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
        }
    ).encode()


async def _send(session: aiohttp.ClientSession, url: str, stream: Stream, body: bytes) -> Outcome:
    out = Outcome(stream.name)
    headers = {
        "content-type": "application/json",
        OBJECTIVE_HEADER: stream.objective,
        FAIRNESS_HEADER: stream.flow,
    }
    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            out.status = response.status
            out.reason = response.headers.get(REASON_HEADER, "")
            if response.status != 200:
                await response.read()
                return out
            async for raw in response.content:
                line = raw.strip()
                if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                    chunk = json.loads(line[5:])
                    choices = chunk.get("choices") or []
                    if out.ttft_s is None and any(
                        (c.get("delta") or {}).get("content") for c in choices
                    ):
                        out.ttft_s = time.perf_counter() - start
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def drive(url: str, streams: Sequence[Stream], duration_s: float, seed: int) -> list[Outcome]:
    """Every stream open loop (Poisson arrivals) for `duration_s`; waits for every answer."""
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    results: list[Outcome] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        pending: list[asyncio.Task[Outcome]] = []

        async def arrivals(stream: Stream, rng: random.Random) -> None:
            at = rng.expovariate(stream.rate)
            while at < duration_s:
                delay = at - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(_send(session, url, stream, _body(rng))))
                at += rng.expovariate(stream.rate)

        await asyncio.gather(*(arrivals(s, random.Random(f"{seed}-{s.name}")) for s in streams))
        results = list(await asyncio.gather(*pending))
    return results


def _pct(values: list[float], q: float) -> float | None:
    value = quantile(values, q)
    return None if value is None else value * 1000


def summarise(
    mode: str, phase: str, streams: Sequence[Stream], results: Sequence[Outcome], wall_s: float
) -> list[ClassRow]:
    rows = []
    for stream in streams:
        mine = [r for r in results if r.stream == stream.name]
        served = [r for r in mine if r.served]
        answers = Counter(f"{r.status} {r.reason}" for r in mine if r.answered)
        cut = sum(1 for r in mine if r.cut)
        lost = sum(1 for r in mine if not (r.served or r.answered or r.cut))
        ttfts = [r.ttft_s for r in served if r.ttft_s is not None]
        rows.append(
            ClassRow(
                mode,
                phase,
                stream.name,
                len(mine),
                len(served),
                dict(sorted(answers.items())),
                cut,
                lost,
                _pct(ttfts, 0.5),
                _pct(ttfts, 0.9),
                len(served) / wall_s if wall_s else 0.0,
            )
        )
    return rows


_METRIC = re.compile(
    r"^llm_d_epp_flow_control_(requests|in_flight_evictions)_total\{([^}]*)\}\s+([0-9.eE+-]+)$",
    re.MULTILINE,
)


def picker_outcomes(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        page = r.read().decode()
    out: dict[str, float] = {}
    for series, labels, value in _METRIC.findall(page):
        parts = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        outcome = parts.get("outcome", "?") if series == "requests" else "EvictedInFlight"
        key = f"{parts.get('priority', '?')}/{outcome}"
        out[key] = out.get(key, 0.0) + float(value)
    return out


# What a request evicted in flight gets when its response had not begun.
IN_FLIGHT_EVICTED = "429 evicted"
# The dropped-reason each flow-control outcome is answered with (epp.flowcontrol.controller).
_REASONS = {
    "RejectedCapacity": "429 rejected-saturated",
    "EvictedTTL": "503 rejected-ttl-expired",
    "EvictedPriority": "429 evicted-priority",
    "EvictedContextCancelled": "503 rejected-context-cancelled",
}


def check_accounting(
    streams: Sequence[Stream], results: Sequence[Outcome], outcomes: dict[str, float]
) -> list[str]:
    """Every request the clients sent appears in the picker's counters with the outcome the
    client saw: dispatched = served, each rejection = the answers with its reason."""
    priority = {"critical": "10", "batch": "-1"}
    problems = []
    for objective, p in priority.items():
        names = {s.name for s in streams if s.objective == objective}
        mine = [r for r in results if r.stream in names]
        if not mine:
            continue
        expected: Counter[str] = Counter()
        for r in mine:
            answer = f"{r.status} {r.reason}"
            if r.served:
                expected["Dispatched"] += 1
            elif r.cut or answer == IN_FLIGHT_EVICTED:  # dispatched, then evicted
                expected["Dispatched"] += 1
                expected["EvictedInFlight"] += 1
            else:
                expected[next((k for k, v in _REASONS.items() if v == answer), "?")] += 1
        for outcome, count in sorted(expected.items()):
            got = outcomes.get(f"{p}/{outcome}", 0.0)
            if got != count:
                problems.append(
                    f"priority {p} {outcome}: clients saw {count}, picker counted {got:.0f}"
                )
        for key, value in sorted(outcomes.items()):
            prio, outcome = key.split("/", 1)
            if prio == p and value and outcome not in expected:
                problems.append(f"priority {p} {outcome}: picker counted {value:.0f}, clients none")
    return problems


@contextlib.contextmanager
def gateway(
    workdir: Path, engines: Sequence[SimEngine], mode: str, queue: int, ttl: str
) -> Iterator[tuple[str, int, ManagedProcess]]:
    ports = PortReservation()
    grpc, health, metrics = ports.port(), ports.port(), ports.port()
    objects = workdir / "objects.yaml"
    objects.write_text(OBJECTS)
    envoy = EnvoyProcess(EPP_PORT=grpc, FALLBACK_PORT=int(engines[0].endpoint.rsplit(":", 1)[1]))
    picker: ManagedProcess | None = None
    try:
        envoy.start()
        ports.close()
        picker = start_picker(
            workdir,
            config=picker_config(mode.startswith("flow-control"), queue, ttl),
            endpoints=[e.endpoint for e in engines],
            grpc_port=grpc,
            health_port=health,
            metrics_port=metrics,
            extra_args=[
                f"--objects-file={objects}",
                f"--{'no-' if mode == 'flow-control-no-eviction' else ''}"
                "flow-control-in-flight-eviction",
            ],
        )
        yield envoy.url, metrics, picker
    finally:
        envoy.stop()
        if picker is not None:
            picker.stop()
        ports.close()


def run_mode(
    mode: str,
    workdir: Path,
    engines: Sequence[SimEngine],
    *,
    idle_s: float,
    duration_s: float,
    critical_rate: float,
    batch_rate: float,
    queue: int,
    ttl: str,
    seed: int,
) -> ModeResult:
    result = ModeResult(mode)
    critical = Stream("critical", "critical", "interactive", critical_rate)
    batch = [Stream(f"batch-{t}", "batch", f"tenant-{t}", batch_rate) for t in ("a", "b")]
    sub = workdir / mode
    sub.mkdir()
    with gateway(sub, engines, mode, queue, ttl) as (url, metrics_port, picker):
        url += "/v1/chat/completions"
        # warm-up: connections, the tokenizer's first call
        asyncio.run(drive(url, [critical], 0.5, seed + 99))
        before = picker_outcomes(metrics_port)
        t = time.perf_counter()
        idle = asyncio.run(drive(url, [critical], idle_s, seed))
        result.rows += summarise(mode, "idle", [critical], idle, time.perf_counter() - t)
        cpu0 = group_cpu_s([picker.process.pid])
        t = time.perf_counter()
        overload = asyncio.run(drive(url, [critical, *batch], duration_s, seed + 1))
        wall = time.perf_counter() - t
        result.picker_cpu_s = group_cpu_s([picker.process.pid]) - cpu0
        rows = summarise(mode, "overload", [critical, *batch], overload, wall)
        idle_row = result.rows[0]
        for row in rows:
            if row.stream == "critical":
                row.p50_vs_idle = _ratio(row.ttft_p50_ms, idle_row.ttft_p50_ms)
                row.p90_vs_idle = _ratio(row.ttft_p90_ms, idle_row.ttft_p90_ms)
        result.rows += rows
        after = picker_outcomes(metrics_port)
        counted = {k: v - before.get(k, 0.0) for k, v in after.items()}
        result.picker_outcomes = {k: v for k, v in sorted(counted.items()) if v}
        if mode.startswith("flow-control"):
            result.accounting = check_accounting(
                [critical, *batch], [*idle, *overload], result.picker_outcomes
            )
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_tables(results: Sequence[ModeResult], header: str) -> None:
    print(header)
    print()
    print(
        "| mode | phase | stream | sent | served | served/s | answered (status reason) | cut "
        "| lost | TTFT p50 ms | p90 ms | p50 / idle | p90 / idle |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in results:
        for r in m.rows:
            answers = ", ".join(f"{k}: {v}" for k, v in r.answers.items()) or "-"
            print(
                f"| {r.mode} | {r.phase} | {r.stream} | {r.sent} | {r.served} | "
                f"{r.served_per_s:.1f} | {answers} | {r.cut} | {r.lost} | {_f(r.ttft_p50_ms)} | "
                f"{_f(r.ttft_p90_ms)} | {_f(r.p50_vs_idle, '{:.2f}x')} | "
                f"{_f(r.p90_vs_idle, '{:.2f}x')} |"
            )
    print()
    for m in results:
        batch = [r for r in m.rows if r.phase == "overload" and r.stream.startswith("batch")]
        if len(batch) == 2 and min(b.served for b in batch):
            ratio = max(b.served for b in batch) / min(b.served for b in batch)
            print(
                f"{m.mode}: sheddable flows served {batch[0].served} / {batch[1].served} "
                f"(max/min {ratio:.2f}); picker CPU {m.picker_cpu_s:.1f} s in the overload"
            )
        if m.mode.startswith("flow-control"):
            print(
                "accounting: "
                + (
                    "every request counted with the outcome its client saw"
                    if not m.accounting
                    else "; ".join(m.accounting)
                )
            )
            print("picker outcomes: " + json.dumps(m.picker_outcomes))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="overload seconds")
    parser.add_argument("--idle", type=float, default=10.0, help="idle-phase seconds")
    parser.add_argument("--critical-rate", type=float, default=4.0, help="critical req/s")
    parser.add_argument(
        "--batch-rate", type=float, default=0.0, help="req/s per sheddable flow (0: capacity)"
    )
    parser.add_argument("--queue", type=int, default=32, help="flowControl.maxRequests")
    parser.add_argument("--ttl", default="1s", help="flowControl.defaultRequestTTL")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s overload, 2 s idle")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        parser.error(f"modes: {MODES}")
    if args.quick:
        args.duration, args.idle = 3.0, 2.0
    scenario = Scenario(
        "overload",
        "flow control under overload",
        "open",
        0,
        engines=ENGINES,
        max_num_seqs=SLOTS,
        time_scales=(TIME_SCALE,) * ENGINES,
    )
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    results: list[ModeResult] = []
    engines_process: ManagedProcess | None = None
    try:
        model_dir = write_model_dir(workdir / "model")
        ports = PortReservation()
        events = f"tcp://127.0.0.1:{ports.port()}"
        ports.close()
        engines_process, engines = start_engines(
            workdir, scenario, model_dir, events, empty_topic=False
        )
        # what the pool serves: ENGINES * SLOTS requests, each prefill + decode long
        seconds = TIME_SCALE * (PROMPT_WORDS * 0.3 + MAX_TOKENS * 4.0) / 1000
        capacity = ENGINES * SLOTS / seconds
        batch_rate = args.batch_rate or capacity
        for mode in modes:
            t = time.perf_counter()
            results.append(
                run_mode(
                    mode,
                    workdir,
                    engines,
                    idle_s=args.idle,
                    duration_s=args.duration,
                    critical_rate=args.critical_rate,
                    batch_rate=batch_rate,
                    queue=args.queue,
                    ttl=args.ttl,
                    seed=args.seed,
                )
            )
            print(f"{mode}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    finally:
        if engines_process is not None:
            engines_process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    header = (
        f"overload benchmark: {ENGINES} engines x {SLOTS} slots (~{capacity:.0f} req/s), "
        f"critical {args.critical_rate:g} req/s, 2 sheddable flows x {batch_rate:.0f} req/s, "
        f"queue {args.queue}, TTL {args.ttl}, overload {args.duration:g} s, idle "
        f"{args.idle:g} s, seed {args.seed}; {time.perf_counter() - started:.0f} s; "
        f"cores {os.cpu_count()}"
    )
    if args.json:
        print(json.dumps({"header": header, "modes": [asdict(m) for m in results]}, indent=2))
    else:
        print_tables(results, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
