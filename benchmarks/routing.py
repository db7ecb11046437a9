"""Routing against the Rust routers: our picker and the routers users can `pip install`
today, on the same simulated cluster, same seed and workload, in one run (issue 16, item 1).

Setups (`--setups`, comma list; all by default):

- round-robin: Envoy alone, ROUND_ROBIN over the engines.
- precise: Envoy + `epp serve` with the precise profile (`epp.plugins.precise_profile`): our
  predicted-ttft-scorer over the KV-event prefix matches and the engines' load.
- precise-weighted: Envoy + `epp serve`, llm-d's weighted sum: queue 2, kv-util 2, precise
  prefix 3 (the engines' KV events); the precise profile before issue 16 item 2.
- approximate: Envoy + `epp serve` with its default profile (approximate prefix).
- sglang-router: `sglang-router launch --policy cache_aware` (module `sglang_router`).
- smg: `smg launch --policy cache_aware`, run as `python -m smg` because `.venv/bin/smg` is
  sglang-router's own `smg` script (both wheels install one); over HTTP smg runs its text tree.
- vllm-router: `vllm-router --policy cache_aware`.
- vllm-router-kv: `vllm-router --policy kv_aware` fed by the engines' KV events
  (`--kv-event-source`, `--kv-event-replay-source`, `--kv-event-model`, block size 16). Its
  engines publish with vLLM's default empty topic: it silently ignores llm-d's
  `kv@ip:port@model` topics.

Every setup of a scenario gets a fresh cluster of `kvindex-sim` engines (cold caches), its
router, then the scenario's workload; nothing carries over. Scenarios (`--scenario`, comma
list; all by default):

- chat-closed: multi-tenant shared-prefix chat (kvtools.demo.workload) on 4 engines of 480 KV
  blocks and at most 4 running requests (queueing), closed loop, 8 clients.
- chat-open: the same, open loop (Poisson arrivals).
- low-reuse: a window of the Mooncake conversation trace (each 512-token hash block becomes a
  fixed chunk of words), closed loop.
- hot-prefix: one tenant, every request shares one long system prompt; 32 clients for 16
  running slots.
- hetero: chat on engines of different speeds (time scales 1, 1, 0.4, 0.4), open loop.
- replicas: chat through two router replicas behind one gateway: Envoy balancing ext_proc
  streams over two pickers; each peer as two processes behind a round-robin Envoy.
  Approximate replicas each see half the traffic; both precise pickers get every engine's
  events (a ZMQ forwarder in this process).
- restart: chat; at a third of the run engine 0 restarts (`/admin/restart`: cache emptied,
  event seq back to 0), at two thirds engine 1's cache is reset (`/reset_prefix_cache`).
- oversize: chat with 40 tenants: a working set about twice the cluster's KV capacity.
- bypass: chat while 2 side clients send the same tenants' conversations (other users)
  straight to the engines in turn, past the router.
- latency: concurrency 1, engines answering instantly (time scale 0), short prompts: what a
  setup adds over sending straight to an engine (the `direct` row); also the router's idle
  CPU over 10 s before the run (after 2 s to settle).

Per setup: hit rate (cached / prompt tokens from the engines' usage of the routed requests),
TTFT p50/p90 (first generated text as the client saw it), requests/s, errors, load balance
(requests per engine from the engines' `x-kvsim-engine`: max/mean and CV), router CPU per
request (utime + stime from /proc of every process in the router's process groups, before and
after the drive: the picker or router, plus Envoy for Envoy-based setups, reported apart), and
ratios to the best peer. `--json` prints everything as JSON on stdout.

`--seed 7,8,9,10` runs every scenario once per seed and reports each setup over the seeds
(hit rate, req/s, load and CPU as means; TTFT p50/p90 as the median of the runs'), the goals
judged on those; `seed_rows` in the JSON holds each run. A single seed's p90 is decided by a
handful of requests (benchmarks/RESULTS.md, chat open loop over four seeds).

Run: make bench NAME=routing ARGS="[--scenario S,...] [--setups X,...] [--seed N[,N...]]
[--quick] [--json]"
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
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml
import zmq

from kvindex.keys import DEFAULT_BLOCK_SIZE
from kvtools.demo.driver import RequestResult, _one, drive
from kvtools.demo.envoy import EnvoyProcess
from kvtools.demo.model import MODEL_NAME, write_model_dir
from kvtools.demo.policies import picker_config
from kvtools.demo.processes import ManagedProcess, PortReservation, start_picker
from kvtools.demo.report import summarise
from kvtools.demo.run import _round_robin_envoy
from kvtools.demo.workload import SIM_GPU_BLOCKS, ChatRequest, WorkloadConfig, generate

OURS = ("precise", "precise-weighted", "approximate")
APPROX_PEERS = ("sglang-router", "smg", "vllm-router")
PEERS = (*APPROX_PEERS, "vllm-router-kv")
SETUPS = ("round-robin", *OURS, *PEERS)
# `--ttft-params`: parameters of the precise profile's predicted-ttft-scorer (tuning runs).
TTFT_PARAMETERS: dict[str, Any] = {}
TRACE = "mooncake_conversation_trace.jsonl"
# The latency scenario's idle window: 10 s resolves 0.1% of a core (CPU ticks are 10 ms),
# after 2 s for the start to settle (first scrapes, connections, the index's first polls).
IDLE_SETTLE_S = 2.0
IDLE_WINDOW_S = 10.0
# Open loop req/s counts as equal to the best peer's within this ratio (see goals()).
OPEN_LOOP_TPUT_EQUAL = 0.99
TRACE_DIRS = (Path("/work/shared/traces"),)


# -- scenarios -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    mode: str  # "closed" or "open"
    requests: int
    concurrency: int = 8  # closed loop: clients
    rate: float = 16.0  # open loop: arrivals per second
    engines: int = 4
    gpu_blocks: int = SIM_GPU_BLOCKS
    max_num_seqs: int = 4
    time_scales: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    replicas: int = 1
    tenants: int = 12
    users: int = 3
    turns: int = 4
    context_words: int = 1500
    trace: bool = False
    actions: bool = False  # restart / reset engines mid-run
    side_clients: int = 0  # bypass traffic straight to the engines
    latency: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("chat-closed", "multi-tenant chat, closed loop, 8 clients", "closed", 160),
        Scenario("chat-open", "multi-tenant chat, open loop, 16 req/s", "open", 160, rate=16.0),
        Scenario(
            "low-reuse", "Mooncake conversation trace window, 8 clients", "closed", 120, trace=True
        ),
        Scenario(
            "hot-prefix",
            "one shared prefix, 32 clients for 16 slots",
            "closed",
            160,
            concurrency=32,
            tenants=1,
            users=64,
            turns=2,
        ),
        Scenario(
            "hetero",
            "engines of speeds 1, 1, 2.5, 2.5, open loop 16 req/s",
            "open",
            160,
            time_scales=(1.0, 1.0, 0.4, 0.4),
        ),
        Scenario("replicas", "two router replicas behind one gateway", "closed", 160, replicas=2),
        Scenario(
            "restart",
            "engine 0 restarted at 1/3, engine 1 reset at 2/3",
            "closed",
            160,
            actions=True,
        ),
        Scenario(
            "oversize", "40 tenants: working set ~2x the KV capacity", "closed", 160, tenants=40
        ),
        Scenario("bypass", "2 side clients straight to the engines", "closed", 160, side_clients=2),
        Scenario(
            "latency",
            "concurrency 1, engines instant, short prompts",
            "closed",
            100,
            concurrency=1,
            time_scales=(0.0, 0.0, 0.0, 0.0),
            tenants=4,
            context_words=200,
            latency=True,
        ),
    )
}


_VOCAB = tuple(
    [
        "account",
        "agent",
        "alpha",
        "answer",
        "archive",
        "audit",
        "balance",
        "batch",
        "billing",
        "branch",
        "bridge",
        "budget",
        "cache",
        "catalog",
        "channel",
        "claim",
        "client",
        "cluster",
        "column",
        "config",
    ]
)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_VOCAB) for _ in range(n))


def _trace_path() -> Path:
    for d in TRACE_DIRS:
        if (d / TRACE).exists():
            return d / TRACE
    from kvtools.analyze.traces import resolve_trace

    return resolve_trace("mooncake-conversation")


def trace_requests(n: int, seed: int, words_per_block: int = 16) -> list[ChatRequest]:
    """A window of the Mooncake conversation trace, scaled down: each 512-token hash block
    becomes a fixed chunk of `words_per_block` words (the same id, the same words), so
    requests share exactly the prefixes the trace says they share."""
    rows: list[dict[str, Any]] = []
    with open(_trace_path()) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= 2000:
                break
    start = random.Random(seed).randrange(0, len(rows) - n)
    window = rows[start : start + n]
    t0 = window[0]["timestamp"]
    out = []
    for i, row in enumerate(window):
        chunks = [_words(random.Random(h), words_per_block) for h in row["hash_ids"][:60]]
        messages = [{"role": "user", "content": " ".join(chunks)}]
        max_tokens = max(4, min(32, int(row["output_length"]) // 16))
        out.append(ChatRequest(i, (row["timestamp"] - t0) / 1000, 0, i, 0, messages, max_tokens))
    return out


def workload(s: Scenario, n: int, seed: int) -> list[ChatRequest]:
    if s.trace:
        return trace_requests(n, seed)
    rate = s.rate if s.mode == "open" else 1000.0
    return generate(
        WorkloadConfig(
            tenants=s.tenants,
            system_prompt_words=s.context_words,
            users_per_tenant=s.users,
            turns=s.turns,
            requests=n,
            rate=rate,
            seed=seed,
        )
    )


def side_workload(s: Scenario, n: int, seed: int) -> list[ChatRequest]:
    """The bypass traffic: the same tenants (same system prompts: same seed), other users."""
    reqs = generate(
        WorkloadConfig(
            tenants=s.tenants,
            system_prompt_words=s.context_words,
            users_per_tenant=s.users * 2,
            turns=s.turns,
            requests=n * 2,
            seed=seed,
        )
    )
    return [r for r in reqs if r.user >= s.users][:n]


# -- processes -------------------------------------------------------------------------------


_SIM_LINE = re.compile(
    r"^(engine-\d+) rank 0: http (http://([\d.]+):(\d+)) events (\S+) replay (\S+) topic"
)


@dataclass(frozen=True, slots=True)
class SimEngine:
    name: str
    url: str
    endpoint: str
    events: str
    replay: str


def start_engines(
    workdir: Path, s: Scenario, model_dir: Path, events: str, empty_topic: bool
) -> tuple[ManagedProcess, list[SimEngine]]:
    argv = [
        str(Path(sys.executable).parent / "kvindex-sim"),
        f"--engines={s.engines}",
        "--base-port=0",
        f"--model={MODEL_NAME}",
        f"--tokenizer={model_dir}",
        f"--num-gpu-blocks={s.gpu_blocks}",
        f"--max-num-seqs={s.max_num_seqs}",
        "--prefill-ms-per-token=0.3",
        "--decode-ms-per-token=4.0",
        "--engine-time-scales=" + ",".join(str(v) for v in s.time_scales),
    ]
    if empty_topic:  # engines bind PUB + replay, vLLM's default empty topic (vllm-router)
        argv += [
            "--kv-events-endpoint=tcp://127.0.0.1:*",
            "--kv-replay-endpoint=tcp://127.0.0.1:*",
            "--kv-topic=",
        ]
    else:
        argv.append(f"--kv-events-endpoint={events}")
    process = ManagedProcess("engines", argv, workdir)
    deadline = time.monotonic() + 30
    while True:
        found = [_SIM_LINE.match(line) for line in process.log(100_000).splitlines()]
        matches = [m for m in found if m]
        if len(matches) >= s.engines:
            return process, [SimEngine(m[1], m[2], f"{m[3]}:{m[4]}", m[5], m[6]) for m in matches]
        process.check_alive()
        if time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"engines not up:\n{process.log()}")
        time.sleep(0.05)


class Forwarder:
    """One SUB the engines connect to, one PUB connected to every precise picker replica's
    bound events socket: each replica gets every engine's events (frames untouched)."""

    def __init__(self, bind: str, targets: Sequence[str]) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.bind(bind)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        for target in targets:
            self.pub.connect(target)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            zmq.proxy(self.sub, self.pub)
        except zmq.ContextTerminated:
            pass
        finally:
            self.sub.close()
            self.pub.close()

    def stop(self) -> None:
        self.ctx.term()
        self.thread.join(5)


def _python_module(module: str) -> list[str]:
    if module == "vllm_router":
        return [sys.executable, "-c", "from vllm_router.launch_router import main; main()"]
    return [sys.executable, "-m", module, "launch"]


def start_peer(
    setup: str,
    workdir: Path,
    engines: Sequence[SimEngine],
    ports: PortReservation,
    index: int = 0,
) -> tuple[ManagedProcess, str]:
    port, prom = ports.port(), ports.port()
    workers = [e.url for e in engines]
    module = {"sglang-router": "sglang_router", "smg": "smg"}.get(setup, "vllm_router")
    argv = [
        *_python_module(module),
        "--host=127.0.0.1",
        f"--port={port}",
        "--worker-urls",
        *workers,
        f"--prometheus-port={prom}",
    ]
    if setup == "vllm-router-kv":
        argv += ["--policy", "kv_aware", "--log-level", "warning"]
        for e in engines:
            argv += ["--kv-event-source", f"{e.url}={e.events}"]
            argv += ["--kv-event-replay-source", f"{e.url}={e.replay}"]
        argv += ["--kv-event-model", MODEL_NAME, "--kv-event-block-size", "16"]
    else:
        level = "warning" if module == "vllm_router" else "warn"
        argv += ["--policy", "cache_aware", "--log-level", level]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    process = ManagedProcess(f"{setup}-{index}", argv, workdir, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        process.check_alive()
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"{setup} not ready:\n{process.log()}")
        time.sleep(0.2)


def _two_pickers(port2: int) -> Callable[[str], str]:
    def transform(text: str) -> str:
        doc = yaml.safe_load(text)
        for cluster in doc["static_resources"]["clusters"]:
            if cluster["name"] == "epp":
                endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
                second = json.loads(json.dumps(endpoints[0]))
                second["endpoint"]["address"]["socket_address"]["port_value"] = port2
                endpoints.append(second)
                cluster["lb_policy"] = "ROUND_ROBIN"
        return str(yaml.safe_dump(doc))

    return transform


def _stat_fields(path: str) -> tuple[str, list[str]] | None:
    """The command name and the fields after it of a /proc stat file (None: gone)."""
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def group_cpu_s(leaders: Sequence[int], threads: Callable[[str], bool] | None = None) -> float:
    """utime + stime of every live process in the process groups of `leaders`; with
    `threads`, of only those of their threads whose OS name it accepts (`kvindex.threads`
    names the index's background threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    groups = set(leaders)
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        process = _stat_fields(f"/proc/{entry}/stat")
        if process is None or int(process[1][2]) not in groups:  # pgrp
            continue
        if threads is None:
            total += int(process[1][11]) + int(process[1][12])
            continue
        try:
            tids = os.listdir(f"/proc/{entry}/task")
        except OSError:
            continue
        for tid in tids:
            task = _stat_fields(f"/proc/{entry}/task/{tid}/stat")
            if task is not None and threads(task[0]):
                total += int(task[1][11]) + int(task[1][12])
    return total / tick


def is_event_ingest_thread(name: str) -> bool:
    """The picker's threads that consume KV events, not requests: the index's ingest thread
    and libzmq's background I/O threads (the picker uses ZMQ for nothing else)."""
    return name == "kvindex-ingest" or name.startswith("ZMQbg/")


@dataclass(slots=True)
class Cluster:
    url: str  # where the client sends
    engines: list[SimEngine]
    router_pids: list[int] = field(default_factory=list)  # picker(s) / peer router(s)
    envoy_pids: list[int] = field(default_factory=list)  # the setup's own Envoy


@dataclass(frozen=True, slots=True)
class RunningEngines:
    """Engines started by the caller (real vLLM, `benchmarks.routing_vllm`) instead of a
    `kvindex-sim` per setup: their PUB sockets connect to `events` (a precise picker binds
    it), their KV blocks are `block_size` tokens."""

    engines: list[SimEngine]
    events: str
    block_size: int


@contextlib.contextmanager
def cluster(
    setup: str,
    s: Scenario,
    workdir: Path,
    model_dir: Path,
    given: RunningEngines | None = None,
) -> Iterator[Cluster]:
    ports = PortReservation()
    running: list[ManagedProcess] = []
    envoys: list[EnvoyProcess] = []
    forwarder: Forwarder | None = None
    try:
        replicas = s.replicas
        if given is not None:
            if replicas > 1 or setup == "vllm-router-kv":
                raise ValueError(f"{setup} with {replicas} replicas needs simulated engines")
            picker_events = [given.events]
            engines = given.engines
        else:
            picker_events = [f"tcp://127.0.0.1:{ports.port()}" for _ in range(replicas)]
            events = picker_events[0]
            if setup.startswith("precise") and replicas > 1:
                events = f"tcp://127.0.0.1:{ports.port()}"
            sim, engines = start_engines(
                workdir, s, model_dir, events, empty_topic=setup == "vllm-router-kv"
            )
            running.append(sim)
        if setup.startswith("precise") and replicas > 1:
            forwarder = Forwarder(events, picker_events)
        endpoints = [e.endpoint for e in engines]
        out = Cluster("", engines)
        if setup == "round-robin":
            envoy = _round_robin_envoy(endpoints, 0)
            envoys.append(envoy.start())
            out.url, out.envoy_pids = envoy.url, [_pid(envoy)]
        elif setup in OURS:
            grpc = [ports.port() for _ in range(replicas)]
            envoy = EnvoyProcess(
                transform=_two_pickers(grpc[1]) if replicas > 1 else None,
                EPP_PORT=grpc[0],
                FALLBACK_PORT=int(endpoints[0].rsplit(":", 1)[1]),
            )
            envoys.append(envoy.start())
            for r in range(replicas):
                sub = workdir / f"picker-{r}"
                sub.mkdir(exist_ok=True)
                text = picker_config(
                    setup,
                    model=MODEL_NAME,
                    model_dir=model_dir,
                    events_endpoint=picker_events[r],
                    ttft_parameters=TTFT_PARAMETERS,
                    block_size=given.block_size if given is not None else DEFAULT_BLOCK_SIZE,
                )
                picker = start_picker(
                    sub,
                    config=text,
                    endpoints=endpoints,
                    grpc_port=grpc[r],
                    health_port=ports.port(),
                    metrics_port=ports.port(),
                )
                running.append(picker)
                out.router_pids.append(picker.process.pid)
            out.url, out.envoy_pids = envoy.url, [_pid(envoy)]
        else:
            urls = []
            for r in range(replicas):
                process, url = start_peer(setup, workdir, engines, ports, r)
                running.append(process)
                out.router_pids.append(process.process.pid)
                urls.append(url)
            if replicas > 1:  # a round-robin Envoy over the replicas (not counted as theirs)
                front = _round_robin_envoy([u.removeprefix("http://") for u in urls], 0)
                envoys.append(front.start())
                out.url = front.url
            else:
                out.url = urls[0]
        ports.close()
        yield out
    finally:
        for envoy in envoys:
            envoy.stop()
        for process in reversed(running):
            process.stop()
        if forwarder is not None:
            forwarder.stop()
        ports.close()


def _pid(envoy: EnvoyProcess) -> int:
    assert envoy.process is not None
    return envoy.process.pid


# -- driving ---------------------------------------------------------------------------------


async def closed_loop(
    url: str,
    requests: Sequence[ChatRequest],
    clients: int,
    on_done: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    results: list[RequestResult | None] = [None] * len(requests)
    queue = list(reversed(range(len(requests))))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client() -> None:
            while queue:
                i = queue.pop()
                result = await _one(session, url, MODEL_NAME, requests[i])
                results[i] = result
                if on_done is not None:
                    on_done(result)

        await asyncio.gather(*(client() for _ in range(clients)))
    return [r for r in results if r is not None]


async def _post(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url) as response:
        await response.read()


@dataclass(slots=True)
class Row:
    scenario: str
    setup: str
    requests: int
    errors: int
    hit_rate: float
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    req_s: float
    tok_s: float
    wall_s: float
    per_engine: dict[str, int]
    load_max_mean: float
    load_cv: float
    router_cpu_ms_per_req: float | None  # picker(s) / router(s)
    # of which the threads that consume KV events (our pickers' in-process index; 0 for the
    # peers, whose event consumption, if any, runs on their request threads)
    router_ingest_cpu_ms_per_req: float | None
    envoy_cpu_ms_per_req: float | None  # the setup's own Envoy
    duration_p50_ms: float | None = None
    idle_cpu_pct: float | None = None  # router (+ Envoy) over an idle window
    side_requests: int = 0
    error_sample: str = ""
    ratios: dict[str, float] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)  # the runs this row stands for


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def combine(runs: Sequence[Row]) -> Row:
    """One row for the same scenario and setup over several seeds: hit rate, req/s, load and
    CPU as means, TTFT and request percentiles as the median of the runs' (a seed's p90 is
    decided by a handful of requests, benchmarks/RESULTS.md), counts summed."""
    first = runs[0]
    per_engine: dict[str, int] = {}
    for r in runs:
        for engine, count in r.per_engine.items():
            per_engine[engine] = per_engine.get(engine, 0) + count
    return Row(
        scenario=first.scenario,
        setup=first.setup,
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
        hit_rate=statistics.fmean(r.hit_rate for r in runs),
        ttft_p50_ms=_median([r.ttft_p50_ms for r in runs]),
        ttft_p90_ms=_median([r.ttft_p90_ms for r in runs]),
        req_s=statistics.fmean(r.req_s for r in runs),
        tok_s=statistics.fmean(r.tok_s for r in runs),
        wall_s=sum(r.wall_s for r in runs),
        per_engine=per_engine,
        load_max_mean=statistics.fmean(r.load_max_mean for r in runs),
        load_cv=statistics.fmean(r.load_cv for r in runs),
        router_cpu_ms_per_req=_mean([r.router_cpu_ms_per_req for r in runs]),
        router_ingest_cpu_ms_per_req=_mean([r.router_ingest_cpu_ms_per_req for r in runs]),
        envoy_cpu_ms_per_req=_mean([r.envoy_cpu_ms_per_req for r in runs]),
        duration_p50_ms=_median([r.duration_p50_ms for r in runs]),
        idle_cpu_pct=_mean([r.idle_cpu_pct for r in runs]),
        side_requests=sum(r.side_requests for r in runs),
        error_sample=next((r.error_sample for r in runs if r.error_sample), ""),
        seeds=[seed for r in runs for seed in r.seeds],
    )


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


async def run_one(
    setup: str,
    s: Scenario,
    n: int,
    seed: int,
    c: Cluster,
    request_log: list[dict[str, Any]] | None = None,
) -> Row:
    requests = workload(s, n, seed)
    idle_pct: float | None = None
    pids = c.router_pids + c.envoy_pids
    if s.latency:  # idle CPU (scrapes, health checks, polls) once the start has settled
        await asyncio.sleep(IDLE_SETTLE_S)
        a = group_cpu_s(pids)
        await asyncio.sleep(IDLE_WINDOW_S)
        idle_pct = (group_cpu_s(pids) - a) / IDLE_WINDOW_S * 100
        # warm-up: connections and the tokenizer's first call are not what is compared
        await closed_loop(c.url + "/v1/chat/completions", workload(s, 5, seed + 1), 1)
    router0, envoy0 = group_cpu_s(c.router_pids), group_cpu_s(c.envoy_pids)
    ingest0 = group_cpu_s(c.router_pids, is_event_ingest_thread)
    done = 0
    actions: list[asyncio.Task[None]] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    stop_side = asyncio.Event()
    side_results: list[RequestResult] = []

    def on_done(_: RequestResult) -> None:
        nonlocal done
        done += 1
        if s.actions and done == n // 3:
            actions.append(asyncio.create_task(_post(session, c.engines[0].url + "/admin/restart")))
        if s.actions and done == 2 * n // 3:
            url = c.engines[1].url + "/reset_prefix_cache"
            actions.append(asyncio.create_task(_post(session, url)))

    async def side(k: int, reqs: list[ChatRequest]) -> None:
        for j, request in enumerate(reqs):
            if stop_side.is_set():
                return
            engine = c.engines[(j * s.side_clients + k) % len(c.engines)]
            side_results.append(
                await _one(session, engine.url + "/v1/chat/completions", MODEL_NAME, request)
            )

    sides = []
    if s.side_clients:
        pool = side_workload(s, n, seed)
        sides = [
            asyncio.create_task(side(k, pool[k :: s.side_clients])) for k in range(s.side_clients)
        ]
    url = c.url + "/v1/chat/completions"
    start = time.perf_counter()
    try:
        if s.mode == "open":
            results = await drive(url, MODEL_NAME, requests, timeout_s=120, on_done=on_done)
        else:
            results = await closed_loop(url, requests, s.concurrency, on_done)
        wall = time.perf_counter() - start
        stop_side.set()
        await asyncio.gather(*sides, *actions)
    finally:
        await session.close()
    router_cpu = group_cpu_s(c.router_pids) - router0
    envoy_cpu = group_cpu_s(c.envoy_pids) - envoy0
    ingest_cpu = group_cpu_s(c.router_pids, is_event_ingest_thread) - ingest0
    summary = summarise(setup, results, wall, [e.name for e in c.engines])
    loads = list(summary.per_engine.values())
    mean = statistics.fmean(loads) if loads else 0.0
    ok = [r for r in results if r.error is None and r.status == 200]
    durations = sorted(r.duration_s for r in ok)
    errors = [r for r in results if not (r.error is None and r.status == 200)]
    if request_log is not None:  # --requests-file: what each request got, to see why
        by_index = {q.index: q for q in requests}
        for r in sorted(results, key=lambda r: r.index):
            q = by_index.get(r.index)
            request_log.append(
                {
                    "scenario": s.name,
                    "setup": setup,
                    "seed": seed,
                    "index": r.index,
                    "tenant": r.tenant,
                    "user": q.user if q is not None else None,
                    "turn": q.turn if q is not None else None,
                    "engine": r.engine,
                    "prompt_tokens": r.prompt_tokens,
                    "cached_tokens": r.cached_tokens,
                    "ttft_ms": _ms(r.ttft_s),
                    "duration_ms": _ms(r.duration_s),
                    # the schedule's time (s from the start): open loop, when it was sent;
                    # closed loop, unused (the clients send back to back)
                    "at_s": q.at if q is not None else None,
                    "status": r.status,
                }
            )
    return Row(
        scenario=s.name,
        setup=setup,
        requests=len(results),
        errors=summary.errors,
        hit_rate=summary.hit_rate,
        ttft_p50_ms=_ms(summary.ttft_p50_s),
        ttft_p90_ms=_ms(summary.ttft_p90_s),
        req_s=len(ok) / wall,
        tok_s=summary.throughput_tok_s,
        wall_s=wall,
        per_engine=summary.per_engine,
        load_max_mean=max(loads) / mean if mean else 0.0,
        load_cv=summary.load_cv,
        router_cpu_ms_per_req=router_cpu / len(results) * 1000 if c.router_pids else None,
        router_ingest_cpu_ms_per_req=(ingest_cpu / len(results) * 1000 if c.router_pids else None),
        envoy_cpu_ms_per_req=envoy_cpu / len(results) * 1000 if c.envoy_pids else None,
        duration_p50_ms=_ms(durations[len(durations) // 2]) if durations else None,
        idle_cpu_pct=idle_pct,
        side_requests=len(side_results),
        error_sample=(errors[0].error or f"status {errors[0].status}")[:160] if errors else "",
    )


async def direct_baseline(s: Scenario, n: int, seed: int, c: Cluster) -> Row:
    """Latency scenario: the same requests straight to engine 0 (no router at all)."""
    direct = Cluster(c.engines[0].url, c.engines)
    return await run_one("direct", s, n, seed, direct)


# -- ratios and goals ------------------------------------------------------------------------


def add_ratios(rows: list[Row]) -> None:
    for peers, tag in ((PEERS, "best peer"), (APPROX_PEERS, "best approximate peer")):
        pool = [r for r in rows if r.setup in peers and r.requests]
        if not pool:
            continue
        best_hit = max(r.hit_rate for r in pool)
        p90s = [r.ttft_p90_ms for r in pool if r.ttft_p90_ms is not None]
        p50s = [r.ttft_p50_ms for r in pool if r.ttft_p50_ms is not None]
        best_tput = max(r.req_s for r in pool)
        for r in rows:
            if r.setup not in OURS:
                continue
            r.ratios[f"hit - {tag} (points)"] = (r.hit_rate - best_hit) * 100
            if p90s and r.ttft_p90_ms is not None:
                r.ratios[f"TTFT p90 / {tag}"] = r.ttft_p90_ms / min(p90s)
            if p50s and r.ttft_p50_ms is not None:
                r.ratios[f"TTFT p50 / {tag}"] = r.ttft_p50_ms / min(p50s)
            r.ratios[f"req/s / {tag}"] = r.req_s / best_tput if best_tput else 0.0


EVENT_SCENARIOS = ("replicas", "restart", "oversize", "bypass")


def goals(rows: list[Row]) -> list[tuple[str, str, str]]:
    """(goal, setup, 'met'/'missed: ...') for what this run measured."""
    out: list[tuple[str, str, str]] = []
    by = {(r.scenario, r.setup): r for r in rows}

    def verdict(ok: bool, detail: str) -> str:
        return ("met" if ok else "missed") + f" ({detail})"

    for ours in OURS:
        for sc in ("chat-closed", "chat-open"):
            r = by.get((sc, ours))
            if r is None or not r.ratios:
                continue
            hit = r.ratios.get("hit - best peer (points)", 0.0)
            p90 = r.ratios.get("TTFT p90 / best peer", 9.9)
            tput = r.ratios.get("req/s / best peer", 0.0)
            # Open loop every setup gets the same arrivals: req/s is their rate over the run's
            # wall time, which ends with the last response, so setups differ by that one
            # response's latency (~0.02%), not by throughput; within 1% is equal there.
            floor = OPEN_LOOP_TPUT_EQUAL if SCENARIOS[sc].mode == "open" else 1.0
            ok = hit >= 0 and p90 <= 1.0 and tput >= floor
            out.append(
                (
                    f"{sc}: hit >= best peer, p90 <= best peer, req/s >= best peer",
                    ours,
                    verdict(ok, f"hit {hit:+.1f} pt, p90 x{p90:.2f}, req/s x{tput:.2f}"),
                )
            )
        for sc in EVENT_SCENARIOS:
            r = by.get((sc, ours))
            if r is None or not r.ratios:
                continue
            hit = r.ratios.get("hit - best approximate peer (points)", 0.0)
            p90 = r.ratios.get("TTFT p90 / best approximate peer", 9.9)
            ok = hit >= 5 and p90 <= 0.75
            out.append(
                (
                    f"{sc}: p90 <= 0.75x and hit >= +5 pt vs best approximate peer",
                    ours,
                    verdict(ok, f"hit {hit:+.1f} pt, p90 x{p90:.2f}"),
                )
            )
        r, rr = by.get(("low-reuse", ours)), by.get(("low-reuse", "round-robin"))
        if r and rr and r.ttft_p50_ms and rr.ttft_p50_ms:
            ok = r.ttft_p50_ms <= rr.ttft_p50_ms and r.req_s >= rr.req_s
            detail = f"p50 x{r.ttft_p50_ms / rr.ttft_p50_ms:.2f}, req/s x{r.req_s / rr.req_s:.2f}"
            out.append(
                ("low-reuse: p50 and req/s no worse than round-robin", ours, verdict(ok, detail))
            )
        r = by.get(("hot-prefix", ours))
        if r and r.ratios:
            hit = r.ratios.get("hit - best peer (points)", 0.0)
            ok = r.load_max_mean <= 1.5 and hit >= -5
            detail = f"max/mean {r.load_max_mean:.2f}, hit {hit:+.1f} pt"
            out.append(
                (
                    "hot-prefix: max/mean <= 1.5, hit within 5 pt of best peer",
                    ours,
                    verdict(ok, detail),
                )
            )
        r = by.get(("chat-closed", ours))
        if r and r.router_cpu_ms_per_req is not None:
            ingest = r.router_ingest_cpu_ms_per_req or 0.0
            path = r.router_cpu_ms_per_req - ingest
            ok = path <= 2.0
            detail = (
                f"{path:.1f} ms/request on the request and response path, "
                f"+{ingest:.1f} event ingest (chat-closed)"
            )
            out.append(
                (
                    "picker CPU per request (request and response path) <= 2 ms",
                    ours,
                    verdict(ok, detail),
                )
            )
        r, env = by.get(("latency", ours)), by.get(("latency", "round-robin"))
        if r and env and r.duration_p50_ms is not None and env.duration_p50_ms is not None:
            added = r.duration_p50_ms - env.duration_p50_ms
            out.append(
                (
                    "added latency at concurrency 1 <= 1 ms over Envoy alone",
                    ours,
                    verdict(added <= 1.0, f"+{added:.1f} ms request p50 over Envoy alone"),
                )
            )
        if r and r.idle_cpu_pct is not None:
            out.append(
                (
                    "idle CPU <= 1% of a core, 4 endpoints (picker + Envoy)",
                    ours,
                    verdict(r.idle_cpu_pct <= 1.0, f"{r.idle_cpu_pct:.1f}%"),
                )
            )
    return out


# -- output ----------------------------------------------------------------------------------


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def print_tables(rows: list[Row], scenarios: Sequence[Scenario], header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    console.print(header)
    for s in scenarios:
        table = Table(title=f"{s.name}: {s.description}")
        latency = s.latency
        cols = ["setup", "hit", "TTFT p50", "TTFT p90", "req/s", "err", "load max/mean (cv)"]
        cols += ["router CPU ms/req (ingest)", "Envoy CPU ms/req"]
        if latency:
            cols += ["request p50", "idle CPU"]
        cols += ["vs best peer"]
        for col in cols:
            table.add_column(col, justify="left" if col in ("setup", "vs best peer") else "right")
        for r in rows:
            if r.scenario != s.name:
                continue
            ratio = ""
            if r.ratios:
                tag = "best approximate peer" if s.name in EVENT_SCENARIOS else "best peer"
                ratio = (
                    f"hit {r.ratios.get(f'hit - {tag} (points)', 0):+.1f} pt, "
                    f"p90 x{r.ratios.get(f'TTFT p90 / {tag}', 0):.2f}, "
                    f"req/s x{r.ratios.get(f'req/s / {tag}', 0):.2f}"
                )
            cells = [
                r.setup,
                f"{r.hit_rate:.1%}",
                _f(r.ttft_p50_ms, "{:.1f} ms" if latency else "{:.0f} ms"),
                _f(r.ttft_p90_ms, "{:.1f} ms" if latency else "{:.0f} ms"),
                f"{r.req_s:.1f}",
                str(r.errors),
                f"{r.load_max_mean:.2f} ({r.load_cv:.2f})",
                _f(r.router_cpu_ms_per_req, "{:.2f}")
                + (
                    f" ({r.router_ingest_cpu_ms_per_req:.2f})"
                    if r.router_ingest_cpu_ms_per_req
                    else ""
                ),
                _f(r.envoy_cpu_ms_per_req, "{:.2f}"),
            ]
            if latency:
                cells += [_f(r.duration_p50_ms, "{:.2f} ms"), _f(r.idle_cpu_pct, "{:.1f}%")]
            cells.append(ratio)
            table.add_row(*cells)
        console.print(table)
    table = Table(title="Goals (issue 16)")
    for col in ("goal", "setup", "verdict"):
        table.add_column(col)
    for goal, setup, verdict in goals(rows):
        table.add_row(goal, setup, verdict)
    console.print(table)


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="all", help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma list of setups")
    parser.add_argument("--requests", type=int, default=0, help="requests per run (0: scenario's)")
    parser.add_argument(
        "--seed",
        default="7",
        help="comma list: each scenario runs once per seed; rows and goals are over the seeds "
        "(means; TTFT the median of the runs' percentiles)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 requests per run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument(
        "--ttft-params",
        default="",
        help="JSON object: parameters of the precise profile's predicted-ttft-scorer",
    )
    parser.add_argument("--json-file", default="", help="also write the JSON to this file")
    parser.add_argument(
        "--requests-file",
        default="",
        help="write one JSON line per request (setup, tenant, user, turn, engine, cached tokens, "
        "TTFT) to this file: to see where each request went and what it got",
    )
    args = parser.parse_args(argv)
    if args.ttft_params:
        TTFT_PARAMETERS.update(json.loads(args.ttft_params))
    names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    setups = [x.strip() for x in args.setups.split(",") if x.strip()]
    bad = [n for n in names if n not in SCENARIOS] + [x for x in setups if x not in SETUPS]
    if bad:
        parser.error(f"unknown scenario/setup {bad}; scenarios {list(SCENARIOS)}, setups {SETUPS}")
    scenarios = [SCENARIOS[n] for n in names]
    try:
        seeds = [int(x) for x in args.seed.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seed: a comma list of integers, got {args.seed!r}")
    if not seeds:
        parser.error("--seed: at least one seed")
    if args.quick:
        scenarios = [replace(s, requests=min(s.requests, 16)) for s in scenarios]
    load_before = _load()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    rows: list[Row] = []
    seed_rows: list[Row] = []  # with several seeds: each run's own row
    request_log: list[dict[str, Any]] | None = [] if args.requests_file else None
    try:
        model_dir = write_model_dir(workdir / "model")
        for s in scenarios:
            n = args.requests or s.requests
            runs: dict[str, list[Row]] = {}  # setup (and "direct") -> one row per seed
            for seed in seeds:
                for setup in setups:
                    sub = workdir / f"{s.name}-{setup}-{seed}"
                    sub.mkdir()
                    t = time.perf_counter()
                    try:
                        with cluster(setup, s, sub, model_dir) as c:
                            row = asyncio.run(run_one(setup, s, n, seed, c, request_log))
                            if s.latency and setup == setups[0]:
                                direct = asyncio.run(direct_baseline(s, n, seed, c))
                                direct.seeds = [seed]
                                runs.setdefault(direct.setup, []).append(direct)
                    except (RuntimeError, OSError, KeyError) as exc:  # a setup that cannot start
                        text = " ".join(str(exc).split())
                        print(
                            f"{s.name}/{setup} FAILED: {text[:200]} ... {text[-600:]}",
                            file=sys.stderr,
                        )
                        continue
                    row.seeds = [seed]
                    runs.setdefault(setup, []).append(row)
                    print(
                        f"{s.name:12s} {setup:15s} hit {row.hit_rate:6.1%} p90 "
                        f"{_f(row.ttft_p90_ms)} ms req/s {row.req_s:5.1f} err {row.errors} "
                        f"({time.perf_counter() - t:.0f} s) load {_load()}"
                        + (f" seed {seed}" if len(seeds) > 1 else ""),
                        file=sys.stderr,
                        flush=True,
                    )
            scenario_rows = [combine(r) if len(r) > 1 else r[0] for r in runs.values()]
            seed_rows.extend(row for r in runs.values() if len(r) > 1 for row in r)
            add_ratios(scenario_rows)
            rows.extend(scenario_rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    header = (
        f"routing benchmark: seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
        f", {len(scenarios)} scenarios, setups "
        f"{','.join(setups)}; {time.perf_counter() - started:.0f} s; cores {os.cpu_count()}; "
        f"load average before {load_before}, after {_load()}"
    )
    doc = {
        "header": header,
        "scenarios": [asdict(s) for s in scenarios],
        "rows": [asdict(r) for r in rows],
        "seed_rows": [asdict(r) for r in seed_rows],
        "goals": [list(g) for g in goals(rows)],
    }
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(doc, indent=2))
    if args.requests_file and request_log is not None:
        Path(args.requests_file).write_text("".join(json.dumps(r) + "\n" for r in request_log))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_tables(rows, scenarios, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
