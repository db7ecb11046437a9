"""`kvindex doctor`: ask a running kvindex service why a prompt does or does not hit the
cache (its ``/v1/debug`` endpoint) and print the report (rich tables, or ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvindex.config import DEFAULT_HTTP_PORT, read_token_file
from kvindex.errors import ConfigError, KVIndexError

__all__ = ["fetch_report", "register", "render_report"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="explain the cache hits of a prompt (asks a running service's /v1/debug)",
        description=__doc__,
    )
    parser.add_argument(
        "--index-url",
        default=f"http://127.0.0.1:{DEFAULT_HTTP_PORT}",
        help="base URL of the kvindex service HTTP API (default %(default)s)",
    )
    parser.add_argument("--model", required=True, help="model (or LoRA adapter) name")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="completion prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    prompt.add_argument("--token-ids", help="comma-separated token ids")
    prompt.add_argument(
        "--messages", help='chat messages as JSON, e.g. \'[{"role":"user","content":"hi"}]\''
    )
    prompt.add_argument("--messages-file", type=Path, help="file holding chat messages JSON")
    parser.add_argument("--lora", help="LoRA adapter (when --model is the base model)")
    parser.add_argument("--cache-salt", help="vLLM cache_salt of the request")
    parser.add_argument(
        "--no-generation-prompt",
        action="store_true",
        help="chat: render without the assistant generation prompt",
    )
    parser.add_argument(
        "--engine-url",
        action="append",
        default=[],
        help="engine base URL (http://ip:port) to cross-check token ids via its /tokenize; "
        "repeatable",
    )
    parser.add_argument(
        "--api-token-file",
        type=Path,
        help="file holding the index's bearer token (when it runs with --api-token-file)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON report")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument(
        "--blocks", type=int, default=40, help="block rows to show (default 40; 0: all)"
    )
    parser.set_defaults(func=run)


class DoctorError(KVIndexError):
    """A failure the CLI reports as one message naming the fix."""


def build_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model}
    try:
        if args.prompt is not None:
            body["prompt"] = args.prompt
        elif args.prompt_file is not None:
            body["prompt"] = args.prompt_file.read_text()
        elif args.token_ids is not None:
            body["token_ids"] = [int(t) for t in args.token_ids.split(",") if t.strip()]
        else:
            raw = args.messages if args.messages is not None else args.messages_file.read_text()
            body["messages"] = json.loads(raw)
    except OSError as exc:
        raise DoctorError(f"cannot read the prompt: {exc}") from exc
    except ValueError as exc:
        raise DoctorError(
            f"bad prompt argument: {exc} (--token-ids takes 1,2,3; --messages takes a JSON "
            "array of {role, content})"
        ) from exc
    if args.lora:
        body["lora"] = args.lora
    if args.cache_salt is not None:
        body["cache_salt"] = args.cache_salt
    if args.no_generation_prompt:
        body["add_generation_prompt"] = False
    if args.engine_url:
        body["engine_url"] = list(args.engine_url)
    return body


def fetch_report(
    index_url: str, body: dict[str, Any], timeout: float, token: str | None = None
) -> dict[str, Any]:
    url = index_url.rstrip("/") + "/v1/debug"
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            detail = f"{error['reason']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            detail = str(exc)
        raise DoctorError(f"the service refused the request ({exc.code}) {detail}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DoctorError(
            f"cannot reach the kvindex service at {url}: {reason}. Start it with "
            "`kvindex serve` or pass --index-url http://HOST:PORT of its HTTP API"
        ) from exc
    except ValueError as exc:
        raise DoctorError(f"{url} did not answer JSON ({exc}); is it a kvindex service?") from exc


def _block_runs(blocks: Sequence[dict[str, Any]]) -> list[tuple[int, int, dict[str, str]]]:
    """Consecutive blocks with the same holders, as (first, last, holders)."""
    runs: list[tuple[int, int, dict[str, str]]] = []
    for block in blocks:
        holders = block["holders"]
        if runs and runs[-1][2] == holders and runs[-1][1] == block["index"] - 1:
            runs[-1] = (runs[-1][0], block["index"], holders)
        else:
            runs.append((block["index"], block["index"], holders))
    return runs


def render_report(report: dict[str, Any], console: Console, max_blocks: int = 40) -> None:
    lora = f" + LoRA {report['lora']}" if report.get("lora") else ""
    salt = f", cache_salt {report['cache_salt']!r}" if report.get("cache_salt") else ""
    console.print(
        f"[bold]{report['model']}{lora}[/]{salt}: {report['prompt_tokens']} tokens, "
        f"{report['total_blocks']} blocks of {report['block_size']}"
    )
    warnings = report.get("warnings", [])
    if warnings:
        table = Table(title="Warnings", title_justify="left")
        for column in ("code", "engine", "problem", "fix"):
            table.add_column(column, overflow="fold")
        for w in warnings:
            table.add_row(w["code"], w.get("engine") or "", w["message"], w["fix"])
        console.print(table)
    else:
        console.print("[green]no warnings[/]")

    table = Table(title="Engines: where each prefix match stops", title_justify="left")
    for column in ("engine", "matched", "score", "stops at block", "held after stop"):
        table.add_column(column)
    for e in report.get("engines", []):
        stops = "-" if e["stops_at"] is None else str(e["stops_at"])
        table.add_row(
            e["engine"],
            f"{e['matched_blocks']}/{report['total_blocks']}",
            f"{e['score']:.3f}",
            stops,
            str(e["holds_later"]),
        )
    console.print(table if report.get("engines") else "no engine holds any block of this prompt")

    runs = _block_runs(report.get("blocks", []))
    table = Table(title="Blocks: holders (tier)", title_justify="left")
    table.add_column("blocks")
    table.add_column("first key")
    table.add_column("holders", overflow="fold")
    keys = {b["index"]: b["key"] for b in report.get("blocks", [])}
    shown = runs if max_blocks <= 0 else runs[:max_blocks]
    for first, last, holders in shown:
        span = str(first) if first == last else f"{first}-{last}"
        names = ", ".join(f"{engine} ({tier})" for engine, tier in holders.items()) or "-"
        table.add_row(span, keys[first], names)
    if len(shown) < len(runs):
        table.add_row("...", "", f"{len(runs) - len(shown)} more runs (--blocks 0 shows all)")
    console.print(table)

    events = report.get("events", [])
    if events:
        table = Table(title="Events seen per engine", title_justify="left")
        for column in (
            "engine",
            "model",
            "sync",
            "block",
            "batches",
            "events",
            "skipped",
            "last seq",
            "last",
        ):
            table.add_column(column, overflow="fold")
        now = time.time()
        for e in events:
            last = e.get("last_batch_time")
            sync = e.get("sync") or {}
            table.add_row(
                e["engine"],
                e.get("model") or "",
                f"{sync['state']} ({sync['reason']})" if sync else "-",
                _block(e),
                str(e["batches"]),
                ", ".join(f"{k} {v}" for k, v in sorted(e["events"].items())) or "-",
                ", ".join(f"{k} {v}" for k, v in sorted(e["skipped"].items())) or "-",
                "-" if e.get("last_seq") is None else str(e["last_seq"]),
                "-" if last is None else f"{max(0.0, now - last):.1f}s ago",
            )
        console.print(table)
    for check in report.get("token_checks", []):
        if check["ok"]:
            console.print(
                f"[green]tokens match[/] {check['engine_url']} ({check['our_tokens']} tokens)"
            )
        elif check.get("error") is None:
            console.print(
                f"[red]tokens differ[/] {check['engine_url']} from position "
                f"{check['first_difference']} ({check['our_tokens']} vs "
                f"{check['engine_tokens']})"
            )


def _block(stats: dict[str, Any]) -> str:
    """The engine's block size; flagged when the index cannot divide it."""
    size = stats.get("block_size")
    if size is None:
        return "-"
    return str(size) if stats.get("block_size_indexable", True) else f"{size} (unindexable)"


def run(args: argparse.Namespace) -> int:
    console = Console()
    try:
        token = (
            None
            if args.api_token_file is None
            else read_token_file(args.api_token_file, "--api-token-file")
        )
        report = fetch_report(args.index_url, build_body(args), args.timeout, token)
    except (DoctorError, ConfigError) as exc:
        print(f"kvindex doctor: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render_report(report, console, args.blocks)
    return 1 if report.get("warnings") else 0
