"""Routing against the Rust routers on real vLLM engines (issue 16: "with real vLLM engines
too"): the routing benchmark's setups over the CPU build of vLLM (`make vllm-env`) instead of
`kvindex-sim`, same client, same workload generator.

The engines start once (about 3.5 min for two on 2 cores; each engine as the tests run it:
`kvtools.real_vllm`, the tiny random-weight model, prefix caching with sha256_cbor, block size
32, a KV cache of `--kv-tokens` tokens so that the working set does not fit, KV events with
llm-d's topic from a PUB that connects to one address a precise picker binds, and a replay
ROUTER). Before each setup every engine's prefix cache is reset; the setup's router starts,
the workload runs closed loop, the router stops. Setups: round-robin (Envoy alone),
precise, precise-weighted, approximate (Envoy + `epp serve`), sglang-router, smg and
vllm-router (cache_aware). vllm-router's KV-event mode needs vLLM's empty topic and is left
out here (the simulated run has it).

Per setup: hit rate from the engines' own counters (`vllm:prefix_cache_hits_total` over
`_queries_total`, the routed requests only: the counters are read before and after), TTFT
p50/p90 as the client saw it, requests/s, errors, requests per engine
(`vllm:request_success_total`: max/mean), router CPU per request (the picker's event ingest
apart) and Envoy's.

Run: .venv/bin/python -m benchmarks.routing_vllm [--setups ...] [--requests 120] [--json-file F]
(needs `make vllm-env`, or KVINDEX_VLLM_PYTHON pointing at a Python with vLLM's CPU build).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.routing import (
    PEERS,
    SETUPS,
    RunningEngines,
    Scenario,
    SimEngine,
    _f,
    _ms,
    closed_loop,
    cluster,
    group_cpu_s,
    is_event_ingest_thread,
)
from kvtools.demo.model import MODEL_NAME
from kvtools.demo.processes import PortReservation
from kvtools.demo.report import summarise
from kvtools.demo.workload import WorkloadConfig, generate
from kvtools.real_vllm.engines import (
    DEFAULT_ENGINE_BLOCK_SIZE,
    KV_BYTES_PER_TOKEN,
    EngineCounters,
    VLLMEngine,
    central_specs,
    start_engines,
)
from kvtools.real_vllm.model import write_real_model_dir

# vllm-router's KV-event mode reads only vLLM's empty topic; these engines publish llm-d's.
REAL_SETUPS = tuple(s for s in SETUPS if s != "vllm-router-kv")


@dataclass(slots=True)
class RealRow:
    setup: str
    requests: int
    errors: int
    hit_rate: float  # the engines' prefix-cache hits / queries over the routed requests
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    req_s: float
    per_engine: dict[str, int]
    load_max_mean: float
    router_cpu_ms_per_req: float | None
    router_ingest_cpu_ms_per_req: float | None
    envoy_cpu_ms_per_req: float | None
    error_sample: str = ""


def _counters(engines: list[VLLMEngine]) -> dict[str, EngineCounters]:
    return {e.spec.name: e.counters() for e in engines}


def _reset(engines: list[VLLMEngine]) -> None:
    """Empty every engine's prefix cache (each setup starts cold, as with fresh simulated
    engines)."""
    for engine in engines:
        engine.reset_prefix_cache()


async def run_setup(
    setup: str,
    engines: list[VLLMEngine],
    given: RunningEngines,
    scenario: Scenario,
    workload: WorkloadConfig,
    workdir: Path,
    model_dir: Path,
) -> RealRow:
    _reset(engines)
    requests = generate(workload)
    sub = workdir / setup
    sub.mkdir()
    with cluster(setup, scenario, sub, model_dir, given) as c:
        before = _counters(engines)
        router0 = group_cpu_s(c.router_pids)
        ingest0 = group_cpu_s(c.router_pids, is_event_ingest_thread)
        envoy0 = group_cpu_s(c.envoy_pids)
        start = time.perf_counter()
        results = await closed_loop(c.url + "/v1/chat/completions", requests, scenario.concurrency)
        wall = time.perf_counter() - start
        router = group_cpu_s(c.router_pids) - router0
        ingest = group_cpu_s(c.router_pids, is_event_ingest_thread) - ingest0
        envoy = group_cpu_s(c.envoy_pids) - envoy0
        after = _counters(engines)
    ok = [r for r in results if r.error is None and r.status == 200]
    errors = [r for r in results if not (r.error is None and r.status == 200)]
    queries = sum(after[n].queries - before[n].queries for n in after)
    hits = sum(after[n].hits - before[n].hits for n in after)
    per_engine = {n: int(after[n].requests - before[n].requests) for n in after}
    mean = statistics.fmean(per_engine.values()) if per_engine else 0.0
    summary = summarise(setup, results, wall, list(per_engine))  # TTFT as routing.py's
    n = len(results) or 1

    def per_request(cpu: float, pids: list[int]) -> float | None:
        return cpu / n * 1000 if pids else None

    return RealRow(
        setup=setup,
        requests=len(results),
        errors=len(errors),
        hit_rate=hits / queries if queries else 0.0,
        ttft_p50_ms=_ms(summary.ttft_p50_s),
        ttft_p90_ms=_ms(summary.ttft_p90_s),
        req_s=len(ok) / wall,
        per_engine=per_engine,
        load_max_mean=max(per_engine.values()) / mean if mean else 0.0,
        router_cpu_ms_per_req=per_request(router, c.router_pids),
        router_ingest_cpu_ms_per_req=per_request(ingest, c.router_pids),
        envoy_cpu_ms_per_req=per_request(envoy, c.envoy_pids),
        error_sample=(errors[0].error or f"status {errors[0].status}")[:160] if errors else "",
    )


def report(rows: list[RealRow], header: str) -> None:
    console = Console(width=200)
    console.print(header)
    table = Table(title="chat on real vLLM engines (closed loop)")
    cols = ["setup", "hit", "TTFT p50", "TTFT p90", "req/s", "err", "load max/mean"]
    cols += ["router CPU ms/req (ingest)", "Envoy CPU ms/req", "vs best peer"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("setup", "vs best peer") else "right")
    peers = [r for r in rows if r.setup in PEERS and r.errors == 0]
    best_hit = max((r.hit_rate for r in peers), default=None)
    best_p90 = min((r.ttft_p90_ms for r in peers if r.ttft_p90_ms), default=None)
    best_rps = max((r.req_s for r in peers), default=None)
    for r in rows:
        ratio = ""
        if r.setup not in PEERS and best_hit is not None and best_p90 and best_rps:
            ratio = (
                f"hit {100 * (r.hit_rate - best_hit):+.1f} pt, "
                f"p90 x{(r.ttft_p90_ms or 0) / best_p90:.2f}, req/s x{r.req_s / best_rps:.2f}"
            )
        cpu = _f(r.router_cpu_ms_per_req, "{:.2f}")
        if r.router_ingest_cpu_ms_per_req:
            cpu += f" ({r.router_ingest_cpu_ms_per_req:.2f})"
        table.add_row(
            r.setup,
            f"{r.hit_rate:.1%}",
            _f(r.ttft_p50_ms, "{:.0f} ms"),
            _f(r.ttft_p90_ms, "{:.0f} ms"),
            f"{r.req_s:.1f}",
            str(r.errors),
            f"{r.load_max_mean:.2f} " + "/".join(str(v) for v in r.per_engine.values()),
            cpu,
            _f(r.envoy_cpu_ms_per_req, "{:.2f}"),
            ratio,
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default=",".join(REAL_SETUPS), help="comma list")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--kv-tokens", type=int, default=8192, help="KV cache per engine")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--context-words", type=int, default=700)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json-file", default="")
    args = parser.parse_args(argv)
    setups = [x.strip() for x in args.setups.split(",") if x.strip()]
    bad = [x for x in setups if x not in REAL_SETUPS]
    if bad:
        parser.error(f"unknown setup {bad}; setups {list(REAL_SETUPS)}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-vllm-"))
    model_dir = write_real_model_dir(workdir / "model")
    ports = PortReservation()
    events_port, specs = central_specs(
        args.engines,
        model=MODEL_NAME,
        model_dir=model_dir,
        port=ports.port,
        kv_cache_bytes=args.kv_tokens * KV_BYTES_PER_TOKEN,
    )
    ports.close()
    scenario = Scenario(
        "real-vllm-chat",
        "multi-tenant chat on real vLLM engines",
        "closed",
        args.requests,
        concurrency=args.concurrency,
        engines=args.engines,
    )
    workload = WorkloadConfig(
        tenants=args.tenants,
        system_prompt_words=args.context_words,
        users_per_tenant=2,
        turns=3,
        requests=args.requests,
        seed=args.seed,
    )
    started = time.perf_counter()
    engines = start_engines(specs, workdir)
    try:
        up = time.perf_counter() - started
        given = RunningEngines(
            [
                SimEngine(e.spec.name, e.spec.url, e.spec.endpoint, "", e.spec.replay_endpoint)
                for e in engines
            ],
            f"tcp://127.0.0.1:{events_port}",
            DEFAULT_ENGINE_BLOCK_SIZE,
        )
        rows: list[RealRow] = []
        for setup in setups:
            try:
                row = asyncio.run(
                    run_setup(setup, engines, given, scenario, workload, workdir, model_dir)
                )
            except Exception as exc:  # one setup failing must not lose the others' rows
                print(f"{setup} FAILED: {exc}"[:2000], flush=True)
                continue
            rows.append(row)
            print(
                f"{setup:16s} hit {row.hit_rate:6.1%} p90 {_f(row.ttft_p90_ms, '{:.0f}')} ms "
                f"req/s {row.req_s:5.1f} err {row.errors}",
                flush=True,
            )
    finally:
        for engine in engines:
            engine.stop()
    header = (
        f"routing on real vLLM: {args.engines} engines x {args.kv_tokens} KV tokens, "
        f"{args.requests} requests, {args.concurrency} clients, {args.tenants} tenants x "
        f"{args.context_words} words, seed {args.seed}; engines up in {up:.0f} s, "
        f"total {time.perf_counter() - started:.0f} s"
    )
    report(rows, header)
    if args.json_file:
        doc: dict[str, Any] = {"header": header, "rows": [asdict(r) for r in rows]}
        Path(args.json_file).write_text(json.dumps(doc, indent=1))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
