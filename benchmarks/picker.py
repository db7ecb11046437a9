"""The picker's per-request cost with the real scheduling framework and the precise scorer.

The picker runs `epp serve`'s own pieces (`framework_scheduler`, `prefix_backend_factory`,
`PickerServer`) with llm-d's default profile weights, the prefix scorer being the
`precise-prefix-cache-scorer` (kvindex in process, the demo model's DeepSeek tokenizer and
ChatML template). Before measuring, its index is filled through kvindex's `EventApplier`
with BlockStored events: 64 engines, 8 tenants each with its own system prompt; every engine
holds one tenant's system prompt plus the prefixes of earlier requests of that tenant.

Requests are chat requests of ~1k and ~8k tokens: a tenant's system prompt (repeated, so the
tokenization cache is warm) + a user turn different in every request.

Measured:
1. In-process breakdown in the picker process (`--breakdown`): parse, tokenize, keys,
   lookup, the other scorers and picker, the ext_proc state machine.
2. Decision latency over a direct gRPC stream to the picker, with each ext_proc edge (the
   picker's own HTTP/2 edge `h2` and grpc.aio's server `grpcio`), TLS (as deployed) and
   plaintext: four picker processes taking turns; decisions/s per core = decisions / CPU
   seconds of the picker process (utime + stime from /proc/<pid>/stat). Two clients: the
   lean HTTP/2 client of `benchmarks.h2client` (a few frame headers per stream, as Envoy's
   C++ costs next to nothing here; pickers take turns in blocks of 50 streams, the first 5
   of each not counted) and grpc.aio's (`--no-grpc-client` skips it; streams alternated
   one by one), whose own Python cost on the same two cores is in its latencies. The lean
   run is made twice: fresh user turns (the system prompt is in the tokenization cache,
   the turn is tokenized), then the same requests again ("repeated prompts": each prompt
   wholly in the cache, as for a retried request).
3. Throughput (`--concurrency`, `--throughput`): per picker, streams with `--concurrency` in
   flight on one connection, as Envoy multiplexes them; decisions/s and per picker core.
4. Latency added by Envoy + picker versus Envoy alone, for the TLS h2 and TLS grpcio
   pickers (requests interleaved over the three Envoys in one run).

Run: python -m benchmarks.picker [--direct N] [--envoy N] [--breakdown N] [--concurrency K]
     [--throughput N] [--no-grpc-client] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.extproc import (
    WARMUP,
    PickerProcess,
    concurrent,
    direct,
    direct_lean,
    envoy_alone,
    machine_speed,
    ms,
    percentiles,
    request_messages,
    run_upstream,
    stop_all,
    through_envoy,
)
from kvtools.demo.envoy import EnvoyProcess
from kvtools.demo.model import MODEL_NAME, write_model_dir

SIZES = {"1k": 1024, "8k": 8192}
ENGINES = 64
TENANTS = 8
USER_TURN_WORDS = 40
HISTORY_PER_ENGINE = 32  # earlier requests of its tenant each engine holds
BLOCK = 16

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig:
      tokenizers: {{{model}: {model_dir}}}
    kvEventsConfig:
      zmqEndpoint: {events}
- type: single-profile-handler
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: precise-prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""

_WORDS = str.split(
    "the router keeps a block index of every engine and scores each candidate by the longest "
    "cached prefix of the request so that shared system prompts and conversation history are "
    "not recomputed tokens blocks hashes engines pods requests latency throughput policy "
    "eviction memory GPU CPU Kubernetes Envoy vLLM SGLang 2024 3.14 42% don't we'll it's"
)


def prose(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        w = rng.choice(_WORDS)
        out.append(w.capitalize() if i % 17 == 0 else w)
        if i % 17 == 16:
            out[-1] += "."
        if i % 85 == 84:
            out[-1] += "\n\n"
    return " ".join(out)


def system_prompt(size: str, tenant: int) -> str:
    # ~1.25 tokens per word with this vocabulary on the DeepSeek tokenizer
    words = int((SIZES[size] - USER_TURN_WORDS * 1.25 - 20) / 1.25)
    return f"You are assistant {tenant}.\n" + prose(random.Random(f"{size}/{tenant}"), words)


def messages(size: str, tenant: int, i: int) -> list[dict[str, str]]:
    user = f"Request {i}: " + prose(random.Random(f"user/{size}/{tenant}/{i}"), USER_TURN_WORDS)
    return [
        {"role": "system", "content": system_prompt(size, tenant)},
        {"role": "user", "content": user},
    ]


def chat_body(size: str, i: int) -> bytes:
    body = {"model": MODEL_NAME, "messages": messages(size, i % TENANTS, i), "max_tokens": 8}
    return json.dumps(body).encode()


# -- the picker process ----------------------------------------------------------------------


def build_picker(
    config_text: str, endpoints: str, plaintext: bool, cert: str, key: str, edge: str = "h2"
) -> Any:
    from epp.commands.serve import framework_scheduler
    from epp.endpoints import Datastore
    from epp.metrics import EppMetrics
    from epp.requests import ModelRegistry
    from epp.server import PickerDeps, PickerServer, ServeConfig

    config = ServeConfig(
        host="127.0.0.1",
        grpc_port=0,
        health_port=0,
        metrics_port=0,
        endpoints=endpoints,
        secure_serving=not plaintext,
        cert_path=None if plaintext else cert,
        key_path=None if plaintext else key,
        metrics_interval_s=3600,
        # a --baseline-src tree may predate the choice of edge
        **(
            {"extproc_server": edge} if "extproc_server" in ServeConfig.__dataclass_fields__ else {}
        ),
    )
    deps = PickerDeps(Datastore(), EppMetrics(), ModelRegistry({}))
    path = Path(tempfile.mkdtemp(prefix="epp-bench-cfg-")) / "config.yaml"
    path.write_text(config_text)
    scheduler = framework_scheduler(str(path), deps)
    server = PickerServer(
        config, scheduler, datastore=deps.datastore, metrics=deps.metrics, registry=deps.registry
    )
    return server, scheduler


def prefill(backend: Any, endpoint_keys: list[str]) -> int:
    """BlockStored events through kvindex's EventApplier: engine e holds tenant e % TENANTS's
    system prompt and HISTORY_PER_ENGINE earlier requests of that tenant, for both sizes."""
    from kvindex.ingest import EventApplier, IngestConfig
    from kvindex.wire import BlockStored, DecodedBatch

    # InProcessIndex keeps its tokenizers on its kvindex Indexer (older trees: on itself)
    tokenizers = getattr(backend, "tokenizers", None) or backend.indexer.tokenizers
    tokenizer = tokenizers.get(MODEL_NAME)
    applier = EventApplier(backend.index, IngestConfig(block_size=BLOCK))
    next_hash = 1
    blocks = 0
    for e, engine in enumerate(endpoint_keys):
        tenant = e % TENANTS
        for size in SIZES:
            for h in range(HISTORY_PER_ENGINE):
                # request numbers that the benchmark will not send (negative)
                ids = tokenizer.apply_chat_template(messages(size, tenant, -1 - h - 1000 * e))
                full = len(ids) // BLOCK * BLOCK
                hashes = list(range(next_hash, next_hash + full // BLOCK))
                next_hash += len(hashes)
                event = BlockStored(hashes, None, list(ids[:full]), BLOCK)
                applier.apply_batch(engine, DecodedBatch(events=[event]), MODEL_NAME)
                blocks += len(hashes)
    return blocks


def run_picker(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)  # the fake upstream has no /metrics page
    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="epp-bench-model-")))
    config_text = CONFIG.format(model=MODEL_NAME, model_dir=model_dir, events=args.events)
    endpoints = args.upstream.split(",")

    async def main() -> None:
        server, scheduler = build_picker(
            config_text, args.upstream, args.plaintext, args.cert, args.key, args.edge
        )
        await server.start()
        backend = scheduler.plugin("precise-prefix-cache-scorer").backend
        blocks = prefill(backend, endpoints)
        gc.freeze()  # as `epp serve` does once started
        if args.breakdown:
            await breakdown(server, scheduler, backend, args.breakdown)
        print(json.dumps({**server.ports, "pid": os.getpid(), "blocks": blocks}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


async def breakdown(server: Any, scheduler: Any, backend: Any, n: int) -> None:
    """Per stage, median over n requests per size (printed to stderr, read by the bench).
    Every stage gets a fresh user turn: a repeated request is wholly in the tokenizer cache."""
    from epp.extproc import PickerContext, RequestStream
    from epp.framework.cycle import CycleState
    from epp.precise.query import score_query

    parser = server.parser
    service = backend.service
    scorer = service.scorer
    eps = server.datastore.endpoints()
    keys = [e.key for e in eps]
    ctx = PickerContext(scheduler, server.datastore.endpoints, parser, server.metrics)
    profile = next(iter(scheduler.profiles.values()))
    headers = {":path": "/v1/chat/completions", ":method": "POST"}
    out: dict[str, dict[str, float]] = {}
    for size in SIZES:
        stages: dict[str, list[float]] = {}
        for i in range(n + WARMUP):
            bodies = [chat_body(size, 1_000_000 * stage + i) for stage in range(1, 6)]
            requests = [parser.parse(headers, b, None) for b in bodies[1:4]]
            messages_ = request_messages(bodies[4])
            t = [time.perf_counter()]
            request = parser.parse(headers, bodies[0], None)
            t.append(time.perf_counter())
            tokens = service.tokenize(score_query(request, keys))
            t.append(time.perf_counter())
            content_keys = scorer.keys(tokens.model, tokens.token_ids)
            t.append(time.perf_counter())
            scorer.score_keys(content_keys, keys)
            t.append(time.perf_counter())
            await backend.score(requests[0], keys)
            t.append(time.perf_counter())
            await profile.run(CycleState(time.monotonic()), requests[1], eps)
            t.append(time.perf_counter())
            await scheduler.schedule(requests[2], eps)
            t.append(time.perf_counter())
            stream = RequestStream(ctx)
            for m in messages_:
                await stream.handle(m)
            stream.close()
            t.append(time.perf_counter())
            for name, t0, t1 in zip(STAGES, t[:-1], t[1:], strict=True):
                stages.setdefault(name, []).append(t1 - t0)
        out[size] = {k: statistics.median(v[WARMUP:]) for k, v in stages.items()}
    print(json.dumps({"breakdown": out}), file=sys.stderr, flush=True)


STAGES = (
    "parse (RequestParser)",
    "tokenize (ScoreService.tokenize, cache warm)",
    "keys (Scorer.keys)",
    "lookup + per-engine scores (Scorer.score_keys)",
    "precise scorer total (backend.score)",
    "profile run (all scorers + picker)",
    "scheduler.schedule",
    "ext_proc state machine (parse+schedule+responses)",
)


def spawn(
    *args: str, stderr: int | None = None, src: str | None = None
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """A child role; `src`: import epp and kvindex from that source tree (a baseline)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.picker", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"{args[:2]} exited {process.wait()}")
    return process, json.loads(line)


# -- measurements ----------------------------------------------------------------------------


def print_breakdown(name: str, stages: dict[str, dict[str, float]]) -> None:
    for size, values in stages.items():
        print(f"in-process breakdown, {name} picker, {size} (median):")
        for stage, value in values.items():
            print(f"  {stage:52s} {ms(value)}")


async def bench(args: argparse.Namespace) -> None:
    from epp.tls import self_signed_certificate
    from kvtools.demo.processes import PortReservation

    workdir = Path(tempfile.mkdtemp(prefix="epp-bench-"))
    cert, key = self_signed_certificate()
    (workdir / "cert.pem").write_bytes(cert)
    (workdir / "key.pem").write_bytes(key)
    upstream, up = spawn("--role", "upstream", "--ports", str(ENGINES))
    endpoints = ",".join(f"127.0.0.1:{p}" for p in up["ports"])
    tls_args = ["--cert", str(workdir / "cert.pem"), "--key", str(workdir / "key.pem")]
    # name -> (picker arguments, source tree, with the breakdown)
    variants: dict[str, tuple[list[str], str | None, bool]] = {
        "tls h2": ([*tls_args, "--edge", "h2"], None, True)
    }
    if args.baseline_src:
        built = Path(__file__).resolve().parent.parent / "src" / "kvindex"
        if any(built.glob("_native*.so")) and not any(
            (Path(args.baseline_src) / "kvindex").glob("_native*.so")
        ):
            # A `git archive` tree has no compiled index: its picker would fall back to the
            # pure-Python one and the comparison would measure that.
            raise SystemExit(
                f"{args.baseline_src}/kvindex has no built _native extension; copy it: "
                f"cp {built}/_native*.so {args.baseline_src}/kvindex/"
            )
        variants["baseline-tls"] = (tls_args, args.baseline_src, True)
    variants["tls grpcio"] = ([*tls_args, "--edge", "grpcio"], None, False)
    variants["plain h2"] = (["--plaintext", "--edge", "h2"], None, False)
    variants["plain grpcio"] = (["--plaintext", "--edge", "grpcio"], None, False)
    if args.only:
        wanted = {"tls h2", *(v.strip() for v in args.only.split(","))}
        unknown = wanted - set(variants)
        if unknown:
            raise SystemExit(f"--only: unknown picker {sorted(unknown)}; known: {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in wanted}
    started = time.perf_counter()
    processes: list[subprocess.Popen[bytes]] = [upstream]
    pickers: dict[str, PickerProcess] = {}
    envoys: list[EnvoyProcess] = []
    reserved = PortReservation()  # the pickers' events ports, held until the end
    try:
        blocks = 0
        for name, (extra, src, wanted) in variants.items():
            with_breakdown = wanted and args.breakdown > 0
            # One at a time: set-up and breakdown must not compete for the two cores.
            process, ports = spawn(
                "--role",
                "picker",
                "--upstream",
                endpoints,
                "--events",
                f"tcp://127.0.0.1:{reserved.port()}",
                *extra,
                *(("--breakdown", str(args.breakdown)) if with_breakdown else ()),
                stderr=subprocess.PIPE if with_breakdown else None,
                src=src,
            )
            processes.append(process)
            pickers[name] = PickerProcess(ports["grpc"], ports["pid"], "--plaintext" not in extra)
            blocks = ports["blocks"]
            if with_breakdown:
                assert process.stderr is not None
                for raw in process.stderr:
                    if raw.startswith(b'{"breakdown"'):
                        print_breakdown(name, json.loads(raw)["breakdown"])
                        break
        print(
            f"engines={ENGINES} tenants={TENANTS} blocks in index={blocks} "
            f"(setup {time.perf_counter() - started:.0f} s); direct={args.direct} "
            f"envoy={args.envoy} breakdown={args.breakdown} per size; cores={os.cpu_count()}; "
            f"machine: {machine_speed()}"
        )
        for size in SIZES:

            def messages_of(i: int, size: str = size) -> list[Any]:
                return request_messages(chat_body(size, i))

            runs = [
                ("lean client", direct_lean(pickers, cert, messages_of, args.direct)),
                # The same requests again: each prompt is now wholly in the tokenization
                # cache (a retried or repeated request), so no tokenizer call is left.
                (
                    "lean client, repeated prompts",
                    direct_lean(pickers, cert, messages_of, args.direct),
                ),
            ]
            if args.grpc_client:
                bodies = [messages_of(i) for i in range(args.direct + WARMUP)]
                grpc_aio = await direct(pickers, cert, bodies.__getitem__, args.direct)
                runs.append(("grpc.aio client", grpc_aio))
            for label, by_picker in runs:
                for name, samples in by_picker.items():
                    p50, p99 = percentiles(samples.decision)
                    cpu = samples.cpu_per_stream()
                    rate = 1 / cpu if cpu else float("inf")
                    print(
                        f"direct gRPC, {label:29s} {name:12s} {size}: decision p50 "
                        f"{ms(p50)} p99 {ms(p99)}; picker CPU {ms(cpu)}/decision = "
                        f"{rate:.0f} decisions/s per core"
                    )
            if args.concurrency:
                rates = concurrent(
                    pickers,
                    cert,
                    lambda i: messages_of(3_000_000 + i),
                    args.throughput,
                    args.concurrency,
                )
                for name, t in rates.items():
                    print(
                        f"throughput, {args.concurrency} streams in flight, {name:12s} {size}: "
                        f"{t.decisions / t.wall_s:.0f} decisions/s; picker CPU "
                        f"{ms(t.cpu_s / t.decisions)}/decision = {t.per_core():.0f} decisions/s "
                        "per core"
                    )
        if args.envoy:
            fallback = up["ports"][0]
            urls: dict[str, str] = {}
            alone = EnvoyProcess(
                transform=envoy_alone, FALLBACK_PORT=fallback, EPP_PORT=pickers["tls h2"].port
            )
            envoys.append(alone.start())
            urls["alone"] = alone.url
            behind_envoy = [name for name in ("tls h2", "tls grpcio") if name in pickers]
            for name in behind_envoy:
                envoy = EnvoyProcess(FALLBACK_PORT=fallback, EPP_PORT=pickers[name].port)
                envoys.append(envoy.start())
                urls[name] = envoy.url
            for size in SIZES:
                results = await through_envoy(
                    urls, lambda i, size=size: chat_body(size, 2_000_000 + i), args.envoy
                )
                a50, a99 = percentiles(results["alone"])
                line = [f"envoy {size}: alone p50 {ms(a50)} p99 {ms(a99)}"]
                for name in behind_envoy:
                    b50, b99 = percentiles(results[name])
                    line.append(
                        f"+picker ({name}) p50 {ms(b50)} p99 {ms(b99)}, added p50 {ms(b50 - a50)}"
                    )
                print("; ".join(line))
        print(f"machine at the end: {machine_speed()}")
    finally:
        stop_all(envoys, processes)
        reserved.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--direct", type=int, default=500, help="streams per picker and size")
    parser.add_argument("--envoy", type=int, default=300, help="requests per variant and size")
    parser.add_argument(
        "--breakdown", type=int, default=300, help="in-process breakdown: requests per size"
    )
    parser.add_argument(
        "--baseline-src",
        default="",
        help="also run a TLS picker importing epp/kvindex from this src directory (e.g. an "
        "older commit's `git archive`), alternated with the others for side-by-side numbers",
    )
    parser.add_argument(
        "--grpc-client",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the direct streams with grpc.aio's client (besides the lean one)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="throughput: streams in flight (0: skip)"
    )
    parser.add_argument(
        "--throughput", type=int, default=1000, help="throughput: streams per picker and size"
    )
    parser.add_argument(
        "--only",
        default="",
        help="run only these pickers (comma-separated: tls grpcio, plain h2, plain grpcio, "
        "baseline-tls), besides 'tls h2' (the deployed one), e.g. --only 'tls h2' alone: "
        "resident pickers share the caches even when idle",
    )
    parser.add_argument("--role", choices=("bench", "picker", "upstream"), default="bench")
    parser.add_argument("--upstream", default="")
    parser.add_argument("--ports", type=int, default=1)
    parser.add_argument("--events", default="")
    parser.add_argument("--plaintext", action="store_true")
    parser.add_argument("--edge", choices=("h2", "grpcio"), default="h2")
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    args = parser.parse_args()
    if args.role == "picker":
        if "--breakdown" not in sys.argv:
            args.breakdown = 0
        run_picker(args)
    elif args.role == "upstream":
        run_upstream(args.ports)
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
