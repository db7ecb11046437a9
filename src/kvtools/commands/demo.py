"""`kvindex demo`: simulated vLLM engines (or, with `--engine vllm`, real ones) behind Envoy
and the picker, one run per routing policy on the same multi-tenant shared-prefix chat
workload, then a comparison table."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from kvtools.demo.workload import SIM_GPU_BLOCKS, WorkloadConfig

# Real engines on 2 CPU cores: two engines, six tenants whose contexts fit in one engine's
# cache only when split between the engines (144 blocks of 32 tokens; vLLM refuses fewer than
# 129, one 4k-token request and its null block), at a rate the CPUs keep up with.
REAL_VLLM_GPU_BLOCKS = 144
REAL_VLLM_WORKLOAD = WorkloadConfig(
    tenants=6,
    system_prompt_words=500,
    users_per_tenant=2,
    turns=3,
    user_words=30,
    output_tokens=8,
    requests=48,
    rate=2.0,
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="local cluster demo: precise routing vs baselines",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    w = WorkloadConfig()
    p.add_argument(
        "--engine",
        choices=("sim", "vllm"),
        default="sim",
        help="sim: simulated engines (kvindex-sim); vllm: real vLLM engines on the CPU "
        "(`make vllm-env` installs them; defaults become 2 engines and a shorter workload)",
    )
    p.add_argument("--engines", type=int, default=None, help="engines (default: 4 sim, 2 vllm)")
    p.add_argument(
        "--policies",
        default="round-robin,approximate,precise",
        help="comma list of round-robin, approximate, precise",
    )
    v = REAL_VLLM_WORKLOAD

    def both(sim: object, vllm: object) -> str:
        return f"(default: {sim}; --engine vllm: {vllm})"

    p.add_argument("--requests", type=int, help=f"requests per run {both(w.requests, v.requests)}")
    p.add_argument("--rate", type=float, help=f"arrivals per second {both(w.rate, v.rate)}")
    p.add_argument(
        "--tenants", type=int, help=f"tenants (shared contexts) {both(w.tenants, v.tenants)}"
    )
    p.add_argument(
        "--context-words",
        type=int,
        help="words in each tenant's system prompt "
        + both(w.system_prompt_words, v.system_prompt_words),
    )
    p.add_argument(
        "--users",
        type=int,
        help=f"users per tenant {both(w.users_per_tenant, v.users_per_tenant)}",
    )
    p.add_argument("--turns", type=int, help=f"turns per conversation {both(w.turns, v.turns)}")
    p.add_argument("--seed", type=int, default=w.seed, help="workload seed")
    p.add_argument(
        "--gpu-blocks",
        type=int,
        help="KV blocks per engine (vllm: of 32 tokens; at least 129, one 4k-token request) "
        + both(SIM_GPU_BLOCKS, REAL_VLLM_GPU_BLOCKS),
    )
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="engine time factor (0.5: twice as fast)"
    )
    p.add_argument(
        "--gateway",
        choices=("auto", "envoy", "direct"),
        default="auto",
        help="what stands in front of the engines: envoy (a real Envoy, else an error), "
        "direct (the demo's in-process gateway talking ext_proc to the picker), auto (Envoy, "
        "falling back to direct when it cannot start; $KVINDEX_DEMO_ENVOY overrides the "
        "envoy binary)",
    )
    p.add_argument("--gateway-port", type=int, default=0, help="gateway listener (0: free port)")
    p.add_argument(
        "--objects-file",
        type=Path,
        metavar="FILE.yaml",
        help="InferenceObjective / InferenceModelRewrite objects for the pickers (`epp serve "
        "--objects-file`; the CRDs' YAML shapes, no Kubernetes needed)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="write a chart")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvtools.demo.model import DemoSetupError
    from kvtools.demo.processes import PortInUse
    from kvtools.demo.run import DemoConfig, run_demo, summary_table, to_json

    real = args.engine == "vllm"
    base = REAL_VLLM_WORKLOAD if real else WorkloadConfig()
    given = {
        "requests": args.requests,
        "rate": args.rate,
        "tenants": args.tenants,
        "system_prompt_words": args.context_words,
        "users_per_tenant": args.users,
        "turns": args.turns,
        "seed": args.seed,
    }
    workload = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    default_blocks = REAL_VLLM_GPU_BLOCKS if real else SIM_GPU_BLOCKS
    config = DemoConfig(
        engine=args.engine,
        engines=args.engines if args.engines is not None else (2 if real else 4),
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        workload=workload,
        num_gpu_blocks=args.gpu_blocks if args.gpu_blocks is not None else default_blocks,
        time_scale=args.time_scale,
        gateway_port=args.gateway_port,
        gateway=args.gateway,
        quiet=args.quiet,
        objects_file=args.objects_file,
    )
    if args.objects_file is not None and not args.objects_file.is_file():
        print(f"kvindex demo: --objects-file {args.objects_file}: no such file", file=sys.stderr)
        return 2
    console = Console(stderr=True, quiet=args.quiet)
    try:
        summaries = run_demo(config, console)
    except (DemoSetupError, PortInUse) as exc:
        print(f"kvindex demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvindex demo: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    Console(stderr=True).print(summary_table(summaries))
    if args.plot:
        from kvtools.demo.plot import plot

        plot(summaries, args.plot)
        print(f"chart written to {args.plot}", file=sys.stderr)
    if args.json:
        print(to_json(summaries, config))
    return 0
