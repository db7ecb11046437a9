"""The picker's cost per request and while idle, before/after side by side (issue 16's goals:
CPU per request <= 2 ms, added latency at concurrency 1 <= 1 ms over Envoy alone, idle CPU
<= 1% of a core for 4 endpoints and <= 10% for 64 endpoints serving vLLM-sized pages).

1. Per request: the precise-profile picker of `benchmarks.picker` (64 endpoints, index
   filled, TLS, h2 edge) behind the real Envoy. Requests at concurrency 1, interleaved over:
   Envoy alone; Envoy + the baseline picker (`--baseline-src`, Envoy's response body mode
   FULL_DUPLEX_STREAMED as it was, or `--baseline-response-body-mode NONE` for a like-for-like
   comparison of two trees); Envoy + this tree's picker with the deployed default
   (response bodies NONE) and with STREAMED (what a latency plugin needs). The model server
   streams `--chunks` SSE token events (`--gap-ms` apart, so Envoy sees each), then the
   usage and `[DONE]`; a second run sends non-streamed requests. CPU per request: the picker
   process's utime + stime (/proc) summed over its own requests' windows, divided by their
   number (the pickers do nothing else: engine scraping is off in them).
2. Idle: a picker with `epp serve`'s default profile and default scrape interval over 4 and
   64 endpoints, each serving a vLLM-sized `/metrics` page (`benchmarks.picker_vllm_page`)
   from a lean keep-alive server; CPU share of one core over `--idle-seconds`.

Run: python -m benchmarks.picker_cost [--requests N] [--chunks N] [--gap-ms MS]
     [--idle-seconds S] [--baseline-src DIR] [--baseline-response-body-mode MODE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from benchmarks.extproc import WARMUP, cpu_seconds, envoy_alone, machine_speed, ms, stop_all
from benchmarks.picker import ENGINES, chat_body
from benchmarks.picker_vllm_page import vllm_metrics_page
from kvtools.demo.envoy import EnvoyProcess

HERE = Path(__file__).resolve().parent.parent


def spawn(module: str, *args: str, src: str | None = None) -> tuple[subprocess.Popen[bytes], Any]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, env=env, cwd=HERE
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"{module} {args[:2]} exited {process.wait()}")
    return process, json.loads(line)


# -- roles -----------------------------------------------------------------------------------


def run_stream_upstream(ports: int, chunks: int, gap_s: float) -> None:
    """Model servers: SSE token events, then the usage and [DONE]; JSON when not streamed."""
    page = vllm_metrics_page().encode()
    token = json.dumps({"choices": [{"index": 0, "delta": {"content": " word"}}]})
    usage = {"prompt_tokens": 1100, "completion_tokens": chunks, "total_tokens": 1100 + chunks}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if not body.get("stream"):
            return web.json_response({"choices": [], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(chunks):
            await response.write(f"data: {token}\n\n".encode())
            await asyncio.sleep(gap_s)
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/plain")

    async def main() -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        bound = []
        for _ in range(ports):
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            bound.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        print(json.dumps({"ports": bound}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class _PageServer(asyncio.Protocol):
    """Answers every request on a keep-alive connection with the same metrics page."""

    reply = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4 :]
            self.transport.write(self.reply)


def run_metrics_upstream(ports: int) -> None:
    page = vllm_metrics_page().encode()
    _PageServer.reply = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        + f"Content-Length: {len(page)}\r\n\r\n".encode()
        + page
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bound = []
        for _ in range(ports):
            server = await loop.create_server(_PageServer, "127.0.0.1", 0)
            bound.append(server.sockets[0].getsockname()[1])
        print(json.dumps({"ports": bound, "page_bytes": len(page)}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def run_idle_picker(endpoints: str, idle_interval: float) -> None:
    """`epp serve`'s default profile and scrape interval over `endpoints`, no traffic."""
    import logging

    from epp.commands.serve import framework_scheduler
    from epp.endpoints import Datastore
    from epp.metrics import EppMetrics
    from epp.requests import ModelRegistry
    from epp.server import PickerDeps, PickerServer, ServeConfig

    logging.basicConfig(level=logging.ERROR)

    async def main() -> None:
        deps = PickerDeps(Datastore(), EppMetrics(), ModelRegistry({}))
        scheduler = framework_scheduler(None, deps)
        # a `before` tree may predate the idle interval
        extra = (
            {"metrics_idle_interval_s": idle_interval}
            if idle_interval >= 0 and "metrics_idle_interval_s" in ServeConfig.__dataclass_fields__
            else {}
        )
        config = ServeConfig(
            host="127.0.0.1",
            grpc_port=0,
            health_port=0,
            metrics_port=0,
            endpoints=endpoints,
            **extra,  # type: ignore[arg-type]
        )
        server = PickerServer(
            config,
            scheduler,
            datastore=deps.datastore,
            metrics=deps.metrics,
            registry=deps.registry,
        )
        await server.start()
        idle = getattr(config, "metrics_idle_interval_s", config.metrics_interval_s)
        info = {"pid": os.getpid(), "interval_s": config.metrics_interval_s, "idle_s": idle}
        print(json.dumps(info), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- measurements ----------------------------------------------------------------------------


def stream_body(i: int, stream: bool) -> bytes:
    body = json.loads(chat_body("1k", 5_000_000 + i))
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def per_request(
    urls: dict[str, str], pids: dict[str, int], n: int, stream: bool, background: dict[int, float]
) -> dict[str, tuple[list[float], float]]:
    """Requests interleaved over the Envoys (name -> URL), one at a time; per name: the
    latencies after warm-up and the picker's CPU seconds per request (0 for Envoy alone),
    less the picker's background CPU (`background`: share of a core by pid, measured
    without traffic) over the request's window."""
    lat: dict[str, list[float]] = {name: [] for name in urls}
    cpu: dict[str, float] = dict.fromkeys(urls, 0.0)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for i in range(n + WARMUP):
            body = stream_body(i, stream)
            for name, url in urls.items():
                pid = pids.get(name)
                c0 = cpu_seconds(pid) if pid else 0.0
                t0 = time.perf_counter()
                async with http.post(f"{url}/v1/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status
                elapsed = time.perf_counter() - t0
                await asyncio.sleep(0.002)  # the picker's end-of-response work, in its window
                if i >= WARMUP:
                    lat[name].append(elapsed)
                    if pid:
                        window = time.perf_counter() - t0
                        cpu[name] += cpu_seconds(pid) - c0 - background[pid] * window
    return {name: (lat[name], cpu[name] / n) for name in urls}


def idle_share(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


async def bench(args: argparse.Namespace) -> None:
    from benchmarks.picker import spawn as spawn_picker
    from epp.tls import self_signed_certificate
    from kvtools.demo.processes import PortReservation

    print(f"machine: {machine_speed()}; uptime: {os.getloadavg()}")
    processes: list[subprocess.Popen[bytes]] = []
    envoys: list[EnvoyProcess] = []
    reserved = PortReservation()
    trees = {"after": None, **({"before": args.baseline_src} if args.baseline_src else {})}
    try:
        # -- idle ------------------------------------------------------------------------
        if args.idle_seconds:
            metrics_up, up = spawn(
                "benchmarks.picker_cost", "--role", "metrics-upstream", "--ports", "64"
            )
            processes.append(metrics_up)
            print(f"metrics page: {up['page_bytes']} bytes")
            idle_variants: list[tuple[str, str | None, float]] = [
                (tree, src, -1.0) for tree, src in trees.items()
            ]
            # this tree with the idle backoff off: the scrape's own cost at 50 ms
            idle_variants.append(("after, no idle backoff", None, 0.0))
            for count in (4, 64):
                endpoints = ",".join(f"127.0.0.1:{p}" for p in up["ports"][:count])
                for tree, src, idle_interval in idle_variants:
                    picker, info = spawn(
                        "benchmarks.picker_cost", "--role", "idle-picker", "--upstream", endpoints,
                        "--idle-interval", str(idle_interval), src=src,
                    )  # fmt: skip
                    time.sleep(args.idle_warmup)
                    share = idle_share(info["pid"], args.idle_seconds)
                    picker.terminate()
                    picker.wait(10)
                    interval = info["interval_s"]
                    idle = info["idle_s"]
                    ticks = f"{interval * 1e3:.0f} ms" + (
                        f", {idle * 1e3:.0f} ms without traffic" if idle > interval else ""
                    )
                    print(
                        f"idle, {count} endpoints, {tree}: {share * 100:.2f}% of a core "
                        f"(scrape interval {ticks}; {args.idle_seconds:.0f} s)"
                    )
            metrics_up.terminate()
            metrics_up.wait(10)
            processes.remove(metrics_up)
        if not args.requests:
            return
        # -- per request -----------------------------------------------------------------
        workdir = Path(tempfile.mkdtemp(prefix="epp-cost-"))
        cert, key = self_signed_certificate()
        (workdir / "cert.pem").write_bytes(cert)
        (workdir / "key.pem").write_bytes(key)
        upstream, up = spawn(
            "benchmarks.picker_cost", "--role", "stream-upstream", "--ports", str(ENGINES),
            "--chunks", str(args.chunks), "--gap-ms", str(args.gap_ms),
        )  # fmt: skip
        processes.append(upstream)
        endpoints = ",".join(f"127.0.0.1:{p}" for p in up["ports"])
        pickers: dict[str, dict[str, Any]] = {}
        for tree, src in trees.items():
            process, ports = spawn_picker(
                "--role", "picker", "--upstream", endpoints,
                "--events", f"tcp://127.0.0.1:{reserved.port()}",
                "--cert", str(workdir / "cert.pem"), "--key", str(workdir / "key.pem"),
                src=src,
            )  # fmt: skip
            processes.append(process)
            pickers[tree] = ports
        fallback = up["ports"][0]
        variants: dict[str, tuple[str | None, str]] = {"Envoy alone": (None, "")}
        if "before" in pickers:
            before_mode = args.baseline_response_body_mode
            variants[f"before: + picker, response bodies {before_mode}"] = ("before", before_mode)
        variants["after: + picker, response bodies NONE (default)"] = ("after", "NONE")
        variants["after: + picker, response bodies STREAMED"] = ("after", "STREAMED")
        urls: dict[str, str] = {}
        pids: dict[str, int] = {}
        for name, (tree, mode) in variants.items():
            if tree is None:
                envoy = EnvoyProcess(
                    transform=envoy_alone, FALLBACK_PORT=fallback, EPP_PORT=pickers["after"]["grpc"]
                )
            else:
                envoy = EnvoyProcess(
                    FALLBACK_PORT=fallback, EPP_PORT=pickers[tree]["grpc"], RESPONSE_BODY_MODE=mode
                )
            envoys.append(envoy.start())
            urls[name] = envoy.url
            if tree is not None:
                pids[name] = pickers[tree]["pid"]
        # What the pickers burn without traffic (the index's threads, timers), subtracted
        # from each request's window below.
        background = {pid: idle_share(pid, args.quiet_seconds) for pid in set(pids.values())}
        for tree, info in pickers.items():
            print(f"picker {tree}: {background[info['pid']] * 100:.2f}% of a core without traffic")
        for stream in (True, False):
            results = await per_request(urls, pids, args.requests, stream, background)
            alone = statistics.median(results["Envoy alone"][0])
            kind = f"streamed ({args.chunks} chunks)" if stream else "not streamed"
            for name, (samples, cpu) in results.items():
                p50 = statistics.median(samples)
                extra = "" if name == "Envoy alone" else (
                    f", added {ms(p50 - alone)}, picker CPU {ms(cpu)}/request"
                )  # fmt: skip
                print(f"{kind}, {name}: p50 {ms(p50)}{extra}")
        print(f"machine at the end: {machine_speed()}; uptime: {os.getloadavg()}")
    finally:
        stop_all(envoys, processes)
        reserved.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="per variant and kind")
    parser.add_argument("--chunks", type=int, default=32, help="SSE token events per response")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="between token events")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--idle-warmup", type=float, default=3.0)
    parser.add_argument(
        "--quiet-seconds", type=float, default=5.0, help="background CPU of the request pickers"
    )
    parser.add_argument("--baseline-src", default="", help="a `before` tree's src directory")
    parser.add_argument(
        "--baseline-response-body-mode",
        default="FULL_DUPLEX_STREAMED",
        choices=("NONE", "STREAMED", "FULL_DUPLEX_STREAMED"),
        help="Envoy's response body mode for the `before` picker (NONE: the same as `after`'s "
        "default, for a like-for-like comparison of two trees)",
    )
    parser.add_argument(
        "--role",
        choices=("bench", "stream-upstream", "metrics-upstream", "idle-picker"),
        default="bench",
    )
    parser.add_argument("--ports", type=int, default=1)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--idle-interval", type=float, default=-1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "stream-upstream":
        run_stream_upstream(args.ports, args.chunks, args.gap_ms / 1e3)
    elif args.role == "metrics-upstream":
        run_metrics_upstream(args.ports)
    elif args.role == "idle-picker":
        run_idle_picker(args.upstream, args.idle_interval)
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
