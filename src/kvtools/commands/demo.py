"""`kvindex demo`: simulated vLLM engines behind Envoy and the picker, one run per routing
policy on the same multi-tenant shared-prefix chat workload, then a comparison table."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from kvtools.demo.workload import WorkloadConfig


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="local cluster demo: precise routing vs baselines",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    w = WorkloadConfig()
    p.add_argument("--engines", type=int, default=4, help="simulated engines")
    p.add_argument(
        "--policies",
        default="round-robin,approximate,precise",
        help="comma list of round-robin, approximate, precise",
    )
    p.add_argument("--requests", type=int, default=w.requests, help="requests per run")
    p.add_argument("--rate", type=float, default=w.rate, help="arrivals per second")
    p.add_argument("--tenants", type=int, default=w.tenants, help="tenants (shared contexts)")
    p.add_argument(
        "--context-words",
        type=int,
        default=w.system_prompt_words,
        help="words in each tenant's system prompt",
    )
    p.add_argument("--users", type=int, default=w.users_per_tenant, help="users per tenant")
    p.add_argument("--turns", type=int, default=w.turns, help="turns per conversation")
    p.add_argument("--seed", type=int, default=w.seed, help="workload seed")
    p.add_argument("--gpu-blocks", type=int, default=480, help="KV blocks per engine")
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
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="write a chart")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvtools.demo.model import DemoSetupError
    from kvtools.demo.processes import PortInUse
    from kvtools.demo.run import DemoConfig, run_demo, summary_table, to_json

    workload = dataclasses.replace(
        WorkloadConfig(),
        requests=args.requests,
        rate=args.rate,
        tenants=args.tenants,
        system_prompt_words=args.context_words,
        users_per_tenant=args.users,
        turns=args.turns,
        seed=args.seed,
    )
    config = DemoConfig(
        engines=args.engines,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        workload=workload,
        num_gpu_blocks=args.gpu_blocks,
        time_scale=args.time_scale,
        gateway_port=args.gateway_port,
        gateway=args.gateway,
        quiet=args.quiet,
    )
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
