"""ext_proc edge overhead.

0. The state machine alone (RequestStream.handle in this process, no gRPC), for scale.
1. Decision latency over a direct gRPC stream (TLS, as deployed), for each ext_proc edge
   (`h2`, the picker's own; `grpcio`), streams alternated between the two pickers, with the
   picker's CPU per stream from /proc, once with grpc.aio's client and once with the lean
   client of `benchmarks.h2client`: request headers + body
   (16 KiB chunks, as Envoy forwards them) -> the decision and the re-emitted body, with a
   trivial scheduler (first endpoint), so the edge itself is measured: gRPC, buffering,
   msgspec parsing, header mutation, re-chunking.
2. Latency added by Envoy + picker versus Envoy alone routing to the same fixed upstream:
   Envoy alone, Envoy + the h2 picker and Envoy + the grpcio picker, requests interleaved
   over the three in one run.

Bodies: chat requests with ~1k- and ~8k-token prompts (4 characters per token).
The picker and the upstream run in their own processes; the client in this one.

Run: python -m benchmarks.extproc [--direct N] [--envoy N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from benchmarks.h2client import ExtProcClient
from epp.extproc_wire import MAX_CHUNK_BYTES
from epp.types import Endpoint, LLMRequest, ProfileResult, ResponseStats, SchedulingResult
from kvtools.demo.envoy import EnvoyProcess
from kvtools.demo.report import quantile

CHUNK = 16 << 10
EDGES = ("h2", "grpcio")  # epp serve --extproc-server
SIZES = {"1k": 1024, "8k": 8192}


class FirstEndpointScheduler:
    """The cheapest possible decision, so that only the edge is measured."""

    async def schedule(
        self, request: LLMRequest, endpoints: Sequence[Endpoint]
    ) -> SchedulingResult:
        return SchedulingResult({"p": ProfileResult("p", [endpoints[0]])}, "p")

    def on_response_headers(self, request: LLMRequest, served: str | None) -> None:
        pass

    def on_response_complete(self, request: LLMRequest, stats: ResponseStats) -> None:
        pass


def chat_body(tokens: int) -> bytes:
    prompt = ("lorem " * (tokens * 4 // 6 + 1))[: tokens * 4]
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
    ).encode()


# -- child processes -----------------------------------------------------------------


def run_picker(upstream: str, cert: str, key: str, edge: str) -> None:
    import logging

    from epp.server import PickerServer, ServeConfig

    logging.basicConfig(level=logging.ERROR)  # the fake upstream has no /metrics page

    async def main() -> None:
        config = ServeConfig(
            host="127.0.0.1",
            grpc_port=0,
            health_port=0,
            metrics_port=0,
            endpoints=upstream,
            cert_path=cert,
            key_path=key,
            metrics_interval_s=3600,
            extproc_server=edge,
        )
        server = PickerServer(config, FirstEndpointScheduler())
        await server.start()
        print(json.dumps({**server.ports, "pid": os.getpid()}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def run_upstream(n_ports: int = 1) -> None:
    """A stand-in model server on `n_ports` free ports; prints {"ports": [...]}."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"choices": [], "usage": {"prompt_tokens": 1}})

    async def main() -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ports = []
        for _ in range(n_ports):
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        print(json.dumps({"ports": ports}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def spawn(*args: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.extproc", *args], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


# -- measurements --------------------------------------------------------------------


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 of a non-empty sample."""
    p50, p99 = quantile(samples, 0.5), quantile(samples, 0.99)
    assert p50 is not None and p99 is not None, "no samples"
    return p50, p99


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads (/proc/<pid>/stat; 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


WARMUP = 20  # streams / requests per variant excluded from every sample


def machine_speed() -> str:
    """How fast this (shared, noisy) machine is right now: seconds for a loop of 10M Python
    additions and for copying 256 MiB, best of three each. Printed before and after a run,
    so that absolute figures of different runs can be read against each other (on this
    project's machines they have varied by 1.6x within an hour)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(10_000_000):
            total += i
        best = min(best, time.perf_counter() - t0)
    # Memory: what the 8k-token path leans on most (bodies, ids, the index's table), and
    # what neighbours on a shared host take first.
    block = bytearray(256 << 20)
    copy = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        bytes(block)
        copy = min(copy, time.perf_counter() - t0)
    return f"10M-addition loop {best:.2f} s, 256 MiB copy {copy * 1e3:.0f} ms"


@dataclass(frozen=True, slots=True)
class PickerProcess:
    port: int
    pid: int
    tls: bool


@dataclass(slots=True)
class StreamSamples:
    decision: list[float] = field(default_factory=list)  # first message written -> decision
    full: list[float] = field(default_factory=list)  # ... -> the re-emitted body read
    cpu_s: float = 0.0  # the picker's CPU seconds over the measured streams

    def cpu_per_stream(self) -> float:
        return self.cpu_s / len(self.decision)


async def one_stream(
    stub: Any, messages: list[pb.ProcessingRequest], body_responses: int
) -> tuple[float, float]:
    """(decision, decision + re-emitted body) seconds of one ext_proc stream."""
    t0 = time.perf_counter()
    call = stub.Process()
    for m in messages:
        await call.write(m)
    first = await call.read()
    t_decision = time.perf_counter()
    assert first.HasField("request_headers"), first
    for _ in range(body_responses):
        await call.read()
    t_body = time.perf_counter()
    await call.done_writing()
    while await call.read() != grpc.aio.EOF:
        pass
    return t_decision - t0, t_body - t0


async def direct(
    pickers: dict[str, PickerProcess],
    cert: bytes,
    messages_of: Callable[[int], list[pb.ProcessingRequest]],
    n: int,
) -> dict[str, StreamSamples]:
    """Streams alternated between the pickers, stream i sending `messages_of(i)`; per picker
    the latencies and its CPU seconds (/proc) over the streams after the warm-up."""
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    channels = {
        name: grpc.aio.secure_channel(f"127.0.0.1:{p.port}", credentials)
        if p.tls
        else grpc.aio.insecure_channel(f"127.0.0.1:{p.port}")
        for name, p in pickers.items()
    }
    stubs = {name: pb_grpc.ExternalProcessorStub(c) for name, c in channels.items()}
    out = {name: StreamSamples() for name in pickers}
    try:
        for i in range(n + WARMUP):
            messages = messages_of(i)
            body = sum(len(m.request_body.body) for m in messages)
            body_responses = -(-body // MAX_CHUNK_BYTES)
            for name, stub in stubs.items():
                pid = pickers[name].pid
                c0 = cpu_seconds(pid)
                decision, full = await one_stream(stub, messages, body_responses)
                if i >= WARMUP:
                    samples = out[name]
                    samples.cpu_s += cpu_seconds(pid) - c0
                    samples.decision.append(decision)
                    samples.full.append(full)
    finally:
        for channel in channels.values():
            await channel.close()
    return out


# The lean client's pickers take turns in blocks: LEAN_BLOCK streams each, of which the
# first LEAN_BLOCK_WARMUP are not counted. Alternating stream by stream, each picker would
# find its caches filled by the others' streams (on these 2-core machines four resident
# pickers then cost each other up to 2x per decision); a picker in service runs alone.
LEAN_BLOCK = 50
LEAN_BLOCK_WARMUP = 5


def direct_lean(
    pickers: dict[str, PickerProcess],
    cert: bytes,
    messages_of: Callable[[int], list[pb.ProcessingRequest]],
    n: int,
) -> dict[str, StreamSamples]:
    """As `direct`, with the lean HTTP/2 client (`benchmarks.h2client`) instead of grpc.aio's:
    `n` counted streams per picker, stream i sending `messages_of(i)`, the pickers taking
    turns in blocks (see LEAN_BLOCK). Blocking: the client is a plain socket, so nothing else
    runs in this process meanwhile."""
    clients = {
        name: ExtProcClient("127.0.0.1", p.port, root_certificates=cert if p.tls else None)
        for name, p in pickers.items()
    }
    out = {name: StreamSamples() for name in pickers}
    counted = LEAN_BLOCK - LEAN_BLOCK_WARMUP
    try:
        i = 0
        while len(out[next(iter(out))].decision) < n:
            for name, client in clients.items():
                pid = pickers[name].pid
                samples = out[name]
                size = LEAN_BLOCK_WARMUP + min(counted, n - len(samples.decision))
                # Prepared before the block, so that the picker's streams follow each other
                # as under load, not after the client's own work of making each request.
                block = [[m.SerializeToString() for m in messages_of(i + j)] for j in range(size)]
                for j, payloads in enumerate(block):
                    c0 = cpu_seconds(pid)
                    result = client.stream(payloads)
                    if j >= LEAN_BLOCK_WARMUP:
                        samples.cpu_s += cpu_seconds(pid) - c0
                        samples.decision.append(result.decision_s)
                        samples.full.append(result.full_s)
            i += LEAN_BLOCK
    finally:
        for client in clients.values():
            client.close()
    return out


@dataclass(slots=True)
class Throughput:
    decisions: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the picker's

    def per_core(self) -> float:
        return self.decisions / self.cpu_s if self.cpu_s else float("inf")


def concurrent(
    pickers: dict[str, PickerProcess],
    cert: bytes,
    messages_of: Callable[[int], list[pb.ProcessingRequest]],
    n: int,
    concurrency: int,
    rounds: int = 4,
) -> dict[str, Throughput]:
    """Throughput: per picker, `n` streams with `concurrency` in flight on one connection
    (as Envoy multiplexes requests onto its ext_proc connection), the lean client sending
    each as soon as a slot frees; the pickers take turns in `rounds` rounds. Decisions per
    core = decisions / the picker's CPU seconds (/proc) over its rounds."""
    out = {name: Throughput() for name in pickers}
    warm = WARMUP * concurrency
    # Stream i of the measured rounds sends messages_of(i); the warm-up its own (i >= n), so
    # that what is measured was never seen before (a repeated turn is wholly cached).
    payloads = [[m.SerializeToString() for m in messages_of(i)] for i in range(n + warm)]
    per_round = max(1, n // rounds)
    for p in pickers.values():  # warm-up, not counted
        with contextlib.closing(
            ExtProcClient("127.0.0.1", p.port, root_certificates=cert if p.tls else None)
        ) as client:
            client.concurrent(lambda i: payloads[n + i], warm, concurrency)
    for r in range(rounds):
        for name, p in pickers.items():
            with contextlib.closing(
                ExtProcClient("127.0.0.1", p.port, root_certificates=cert if p.tls else None)
            ) as client:
                c0 = cpu_seconds(p.pid)
                wall, latencies = client.concurrent(
                    lambda i, r=r: payloads[r * per_round + i], per_round, concurrency
                )
                t = out[name]
                t.cpu_s += cpu_seconds(p.pid) - c0
                t.wall_s += wall
                t.decisions += len(latencies)
    return out


def request_messages(body: bytes) -> list[pb.ProcessingRequest]:
    headers = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions"),
                    base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
                ]
            )
        )
    )
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    return [headers] + [
        pb.ProcessingRequest(request_body=pb.HttpBody(body=c, end_of_stream=i == len(chunks) - 1))
        for i, c in enumerate(chunks)
    ]


async def state_machine(body: bytes, n: int) -> list[float]:
    from epp.extproc import PickerContext, RequestStream
    from epp.metrics import EppMetrics
    from epp.requests import RequestParser

    eps = [Endpoint("10.0.0.1", 8000)]
    ctx = PickerContext(FirstEndpointScheduler(), lambda: eps, RequestParser(), EppMetrics())
    messages = request_messages(body)
    out = []
    for i in range(n + WARMUP):
        t0 = time.perf_counter()
        stream = RequestStream(ctx)
        for m in messages:
            await stream.handle(m)
        stream.close()
        if i >= WARMUP:
            out.append(time.perf_counter() - t0)
    return out


def envoy_alone(rendered: str) -> str:
    """The same Envoy config without the ext_proc filter, every request to `fallback`."""
    doc = yaml.safe_load(rendered)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    config = hcm["typed_config"]
    config["http_filters"] = [
        f for f in config["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
    ]
    routes = config["route_config"]["virtual_hosts"][0]["routes"]
    config["route_config"]["virtual_hosts"][0]["routes"] = [
        r for r in routes if "headers" not in r["match"]
    ]
    return yaml.safe_dump(doc)


async def through_envoy(
    urls: dict[str, str], body_of: Callable[[int], bytes], n: int
) -> dict[str, list[float]]:
    """Requests interleaved over the Envoys (name -> URL), request i sending `body_of(i)`;
    latencies per Envoy after the warm-up."""
    out: dict[str, list[float]] = {name: [] for name in urls}
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for i in range(n + WARMUP):
            body = body_of(i)
            for name, url in urls.items():
                t0 = time.perf_counter()
                async with http.post(f"{url}/v1/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status
                if i >= WARMUP:
                    out[name].append(time.perf_counter() - t0)
    return out


def stop_all(envoys: list[EnvoyProcess], processes: list[subprocess.Popen[bytes]]) -> None:
    for envoy in envoys:
        envoy.stop()
    for process in reversed(processes):
        process.terminate()
        process.wait(10)


def ms(x: float) -> str:
    return f"{x * 1e3:.2f} ms"


async def bench(args: argparse.Namespace) -> None:
    from epp.tls import self_signed_certificate

    workdir = Path(tempfile.mkdtemp(prefix="epp-bench-"))
    cert, key = self_signed_certificate()
    (workdir / "cert.pem").write_bytes(cert)
    (workdir / "key.pem").write_bytes(key)
    upstream, up = spawn("--role", "upstream")
    processes = [upstream]
    pickers: dict[str, PickerProcess] = {}
    for edge in EDGES:
        picker, ports = spawn(
            "--role",
            "picker",
            "--edge",
            edge,
            "--upstream",
            f"127.0.0.1:{up['ports'][0]}",
            "--cert",
            str(workdir / "cert.pem"),
            "--key",
            str(workdir / "key.pem"),
        )
        processes.append(picker)
        pickers[edge] = PickerProcess(ports["grpc"], ports["pid"], tls=True)
    envoys: list[EnvoyProcess] = []
    try:
        print(
            f"direct={args.direct} envoy={args.envoy} per size; chunk {CHUNK} B; "
            f"cores={os.cpu_count()}; machine: {machine_speed()}"
        )
        for label, tokens in SIZES.items():
            p50, p99 = percentiles(await state_machine(chat_body(tokens), args.direct))
            print(f"state machine only {label}: p50 {ms(p50)} p99 {ms(p99)}")
        for label, tokens in SIZES.items():
            body = chat_body(tokens)
            messages = request_messages(body)
            by_client = {
                "grpc.aio": await direct(pickers, cert, lambda _, m=messages: m, args.direct),
                "lean": direct_lean(pickers, cert, lambda _, m=messages: m, args.direct),
            }
            for client, results in by_client.items():
                for edge, samples in results.items():
                    d50, d99 = percentiles(samples.decision)
                    f50, f99 = percentiles(samples.full)
                    print(
                        f"direct gRPC, {client:8s} client, {edge:6s} {label} ({len(body)} B): "
                        f"decision p50 {ms(d50)} p99 {ms(d99)}; decision+body p50 {ms(f50)} "
                        f"p99 {ms(f99)}; picker CPU {ms(samples.cpu_per_stream())}/stream"
                    )
        if not args.envoy:
            return
        fallback = up["ports"][0]
        alone = EnvoyProcess(
            transform=envoy_alone, FALLBACK_PORT=fallback, EPP_PORT=pickers[EDGES[0]].port
        )
        envoys.append(alone.start())
        urls = {"alone": alone.url}
        for edge in EDGES:
            envoy = EnvoyProcess(FALLBACK_PORT=fallback, EPP_PORT=pickers[edge].port)
            envoys.append(envoy.start())
            urls[edge] = envoy.url
        for label, tokens in SIZES.items():
            body = chat_body(tokens)
            latencies = await through_envoy(urls, lambda _, b=body: b, args.envoy)
            a50, a99 = percentiles(latencies["alone"])
            for edge in EDGES:
                b50, b99 = percentiles(latencies[edge])
                print(
                    f"envoy {edge:6s} {label}: alone p50 {ms(a50)} p99 {ms(a99)}; +picker p50 "
                    f"{ms(b50)} p99 {ms(b99)}; added p50 {ms(b50 - a50)} (ratio {b50 / a50:.2f})"
                )
    finally:
        stop_all(envoys, processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--direct", type=int, default=500, help="streams per body size")
    parser.add_argument("--envoy", type=int, default=300, help="requests per variant and size")
    parser.add_argument("--role", choices=("bench", "picker", "upstream"), default="bench")
    parser.add_argument("--upstream", default="")
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--edge", choices=EDGES, default=EDGES[0])
    args = parser.parse_args()
    if args.role == "picker":
        run_picker(args.upstream, args.cert, args.key, args.edge)
    elif args.role == "upstream":
        run_upstream()
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
