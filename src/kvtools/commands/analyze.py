"""``kvindex analyze``: offline cache-hit analysis of a workload trace under several routing
policies (discrete-event cluster simulation), or of a recorded KV-event capture."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from kvindex.keys import DEFAULT_BLOCK_SIZE
from kvtools.analyze.capture import analyze_capture, default_capture_reader
from kvtools.analyze.capture_report import (
    print_capture_tables,
    render_capture_charts,
    write_capture_csv,
    write_capture_html,
)
from kvtools.analyze.config import ConfigError, PickerSetup
from kvtools.analyze.metrics import reuse_ceiling
from kvtools.analyze.model import Trace
from kvtools.analyze.policies import POLICY_NAMES
from kvtools.analyze.readers import (
    MOONCAKE_BLOCK_TOKENS,
    TraceError,
    detect_format,
    read_mooncake,
    read_request_log,
)
from kvtools.analyze.report import build_document, print_tables, write_csv, write_html
from kvtools.analyze.runner import SweepError, parse_sweep, run_sweep
from kvtools.analyze.simulation import CostModel, SimSettings
from kvtools.analyze.tokenizer import load_tokenizer
from kvtools.analyze.traces import SHIPPED_TRACES, resolve_trace

__all__ = ["register", "run"]

EXIT_INPUT = 2
PICKER_SCHEDULER = "picker"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="offline cache-hit analysis of a trace or a KV-event capture",
        description=(
            "Replay a workload trace through a simulated cluster under several routing "
            "policies and report prefix-cache hit rate, TTFT, queueing and load balance; or "
            "summarise a KV-event capture. Shipped traces: " + ", ".join(SHIPPED_TRACES)
        ),
    )
    src = p.add_argument_group("input")
    src.add_argument("--trace", required=True, help="a shipped trace name or a file path")
    src.add_argument(
        "--format", choices=("auto", "mooncake", "requests", "capture"), default="auto"
    )
    src.add_argument(
        "--block-tokens",
        type=int,
        default=None,
        help=f"tokens per block (Mooncake {MOONCAKE_BLOCK_TOKENS}, request logs "
        f"{DEFAULT_BLOCK_SIZE})",
    )
    src.add_argument("--limit", type=int, default=None, help="first N requests only")
    src.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip and count malformed lines instead of stopping",
    )
    src.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer spec for prompt/messages request logs (a tokenizer.json, a model "
        "directory, a Hugging Face cache id)",
    )
    src.add_argument("--model", default="", help="model of request-log lines that name none")
    sim = p.add_argument_group("cluster simulation")
    sim.add_argument(
        "--policies",
        default=",".join(POLICY_NAMES),
        help="comma-separated, from: " + ", ".join(POLICY_NAMES),
    )
    sim.add_argument("--engines", type=int, default=8)
    sim.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="KV capacity per engine in blocks (default: 491520 tokens' worth)",
    )
    defaults = CostModel()
    sim.add_argument("--max-running", type=int, default=defaults.max_running)
    sim.add_argument("--prefill-ms-per-token", type=float, default=defaults.prefill_ms_per_token)
    sim.add_argument("--prefill-overhead-ms", type=float, default=defaults.prefill_overhead_ms)
    sim.add_argument("--decode-ms-per-token", type=float, default=defaults.decode_ms_per_token)
    sim.add_argument("--decode-ms-per-running", type=float, default=defaults.decode_ms_per_running)
    sim.add_argument(
        "--event-delay",
        type=float,
        default=50.0,
        help="ms for engines' store/evict events to reach the precise index",
    )
    sim.add_argument("--speed", type=float, default=1.0, help=">1 compresses arrival times")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--precise-ingest",
        choices=("wire", "ops"),
        default="wire",
        help="precise index fed by vLLM-encoded events through EventApplier "
        "(wire) or by Store/Remove ops directly (ops, faster)",
    )
    sim.add_argument(
        "--config",
        type=Path,
        default=None,
        help="EndpointPickerConfig YAML the prefix policies schedule with, through the "
        "picker's own framework (default: the picker's defaults)",
    )
    sim.add_argument(
        "--profile", default=None, help="scheduling profile --weights change (default: all)"
    )
    sim.add_argument(
        "--scheduler",
        default=PICKER_SCHEDULER,
        choices=(PICKER_SCHEDULER,),
        help="who chooses for the prefix policies: the picker's scheduling framework (the "
        "only scheduler; kept for scripts that name it)",
    )
    sim.add_argument(
        "--weights",
        default=None,
        help="override scorer weights in the config, e.g. prefix=3,queue=2,kv_utilization=2 "
        "(0 removes a scorer)",
    )
    sim.add_argument(
        "--sweep", default=None, help="engines=4,8,16 | capacity=N,... | weights=prefix:1,3,5"
    )
    sim.add_argument("--jobs", type=int, default=1, help="parallel processes (0: all cores)")
    sim.add_argument("--windows", type=int, default=60, help="buckets of the time series")
    out = p.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="FILE", help="JSON report ('-': stdout)")
    out.add_argument("--csv", type=Path, default=None, metavar="FILE")
    out.add_argument("--plot", type=Path, default=None, metavar="DIR", help="PNG charts")
    out.add_argument(
        "--html", type=Path, default=None, metavar="FILE", help="self-contained HTML report"
    )
    out.add_argument(
        "--window",
        type=float,
        default=10.0,
        help="capture analysis: seconds per time-series window",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    p.set_defaults(func=run)


def _fail(console: Console, message: str) -> int:
    console.print(f"[red]kvindex analyze:[/red] {message}", highlight=False)
    return EXIT_INPUT


def _picker_setup(args: argparse.Namespace) -> PickerSetup:
    if args.config is not None:
        setup = PickerSetup.from_file(args.config, args.profile)
    else:
        setup = PickerSetup(profile=args.profile)
    if args.weights:
        for item in args.weights.split(","):
            name, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--weights {item!r}: expected NAME=WEIGHT")
            try:
                number = float(value)
            except ValueError as e:
                raise ConfigError(f"--weights {item!r}: weight must be a number") from e
            setup = setup.with_weight(name.strip(), number)
    setup.validate()
    return setup


def _picker_warnings(picker: PickerSetup, policies: list[str]) -> list[str]:
    if not {"approximate-prefix", "precise-prefix"} & set(policies):
        return []
    if picker.scorer_weights("precise")["prefix"] == 0:
        return [
            f"{picker.source}: the profile has no prefix scorer: approximate-prefix and "
            "precise-prefix route by the other scorers alone"
        ]
    return []


def _read_trace(args: argparse.Namespace, path: Path, fmt: str) -> Trace:
    if fmt == "mooncake":
        return read_mooncake(
            path,
            block_tokens=args.block_tokens or MOONCAKE_BLOCK_TOKENS,
            limit=args.limit,
            skip_bad_lines=args.skip_bad_lines,
            source=args.trace,
        )
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    return read_request_log(
        path,
        tokenizer=tokenizer,
        block_tokens=args.block_tokens or DEFAULT_BLOCK_SIZE,
        limit=args.limit,
        skip_bad_lines=args.skip_bad_lines,
        default_model=args.model,
    )


def _write_json(document: dict[str, Any], target: str) -> None:
    text = json.dumps(document, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n")


def _run_capture(args: argparse.Namespace, path: Path, console: Console) -> int:
    reader = default_capture_reader()
    analysis = analyze_capture(
        reader(path),
        window_s=args.window,
        block_size=args.block_tokens or DEFAULT_BLOCK_SIZE,
        default_model=args.model,
    )
    document = analysis.document()
    if args.json:
        _write_json(document, args.json)
    if args.csv:
        write_capture_csv(document, args.csv)
    if args.plot or args.html:
        from kvtools.analyze.plots import PlotError, write_charts

        try:
            charts = render_capture_charts(document)
        except PlotError as e:
            return _fail(console, str(e))
        if args.plot:
            write_charts(charts, args.plot)
        if args.html:
            write_capture_html(document, [(title, png) for _, title, png in charts], args.html)
    if not args.quiet and args.json != "-":
        print_capture_tables(document, console)
    return 0


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=args.json == "-")
    if not console.is_terminal:
        # Logs and pipes: wide enough for the table's columns, no wrapping.
        console = Console(stderr=args.json == "-", width=max(console.width, 130))
    try:
        path = resolve_trace(args.trace)
        fmt = detect_format(path) if args.format == "auto" else args.format
        if fmt == "capture":
            return _run_capture(args, path, console)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        unknown = [p for p in policies if p not in POLICY_NAMES]
        if unknown or not policies:
            return _fail(
                console, f"--policies: unknown {unknown} (one of {', '.join(POLICY_NAMES)})"
            )
        if args.engines < 1 or (args.capacity is not None and args.capacity < 1):
            return _fail(console, "--engines and --capacity must be at least 1")
        if args.speed <= 0:
            return _fail(console, "--speed must be > 0")
        picker = _picker_setup(args)
        sweep = parse_sweep(args.sweep) if args.sweep else None
        trace = _read_trace(args, path, fmt)
    except (
        TraceError,
        ConfigError,
        SweepError,
        FileNotFoundError,
        RuntimeError,
    ) as e:
        return _fail(console, str(e))
    if not trace.requests:
        return _fail(console, f"{args.trace}: no requests to analyse")
    cost = CostModel(
        prefill_ms_per_token=args.prefill_ms_per_token,
        prefill_overhead_ms=args.prefill_overhead_ms,
        decode_ms_per_token=args.decode_ms_per_token,
        decode_ms_per_running=args.decode_ms_per_running,
        max_running=args.max_running,
    )
    settings = SimSettings(
        engines=args.engines,
        capacity_blocks=args.capacity,
        cost=cost,
        event_delay_ms=args.event_delay,
        speed=args.speed,
        seed=args.seed,
        picker=picker,
        windows=args.windows,
        precise_ingest=args.precise_ingest,
    )
    n_points = 1 if sweep is None else len(sweep.values)
    jobs = args.jobs if args.jobs > 0 else (os.cpu_count() or 1)
    show_progress = not args.quiet and console.is_terminal
    with Progress(console=console, disable=not show_progress, transient=True) as progress:
        total = n_points * len(policies) * len(trace.requests)
        task = progress.add_task("simulating", total=total)
        points = run_sweep(
            trace, policies, settings, sweep, jobs, lambda n: progress.advance(task, n)
        )
    warnings = _picker_warnings(picker, policies)
    document = build_document(trace, points, sweep, reuse_ceiling(trace), warnings)
    if args.json:
        _write_json(document, args.json)
    if args.csv:
        write_csv(document, args.csv)
    if args.plot or args.html:
        from kvtools.analyze.plots import (
            PlotError,
            render_charts,
            render_sweep_chart,
            write_charts,
        )

        try:
            charts = [c for point in points for c in render_charts(point.results, point.label)]
            if sweep is not None and len(points) > 1:
                name = sweep.weight if sweep.parameter == "weights" else sweep.parameter
                charts.insert(
                    0,
                    render_sweep_chart(
                        [p.label for p in points],
                        list(sweep.values),
                        str(name),
                        [p.results for p in points],
                    ),
                )
        except PlotError as e:
            return _fail(console, str(e))
        if args.plot:
            write_charts(charts, args.plot)
        if args.html:
            write_html(document, [(title, png) for _, title, png in charts], args.html)
    if not args.quiet and args.json != "-":
        print_tables(document, console)
    return 0
