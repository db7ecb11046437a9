"""Outputs of a simulation analysis: the JSON document (stable schema, docs/analyze.md), CSV
rows, the terminal table and the self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvtools.analyze.model import Trace
from kvtools.analyze.runner import SweepPoint, SweepSpec
from kvtools.analyze.simulation import SimSettings

__all__ = [
    "CSV_COLUMNS",
    "SCHEMA",
    "build_document",
    "print_tables",
    "sweep_summary",
    "write_csv",
    "write_html",
]

SCHEMA = "kvtools.analyze/v1"

CSV_COLUMNS = (
    "point",
    "policy",
    "engines",
    "capacity_blocks",
    "requests",
    "hit_rate_blocks",
    "hit_rate_tokens",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "queue_mean_ms",
    "queue_p99_ms",
    "load_max_over_mean",
    "load_cv",
    "evicted_blocks",
)


def settings_dict(settings: SimSettings, block_tokens: int) -> dict[str, Any]:
    return {
        "engines": settings.engines,
        "capacity_blocks": settings.capacity_for(block_tokens),
        "cost": asdict(settings.cost),
        "event_delay_ms": settings.event_delay_ms,
        "speed": settings.speed,
        "seed": settings.seed,
        "precise_ingest": settings.precise_ingest,
        "picker_config": settings.picker.source,
        "picker_profile": settings.picker.profile,
        # The precise-prefix policy's profile; approximate-prefix's differs only in the
        # prefix scorer's type.
        "weights": settings.picker.scorer_weights("precise"),
    }


def build_document(
    trace: Trace,
    points: Sequence[SweepPoint],
    sweep: SweepSpec | None,
    ceiling: tuple[float, float],
    warnings: Sequence[str],
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "input": {
            "source": trace.source,
            "format": trace.format,
            "requests": len(trace.requests),
            "blocks": trace.blocks,
            "block_tokens": trace.block_tokens,
            "span_s": trace.span_s,
            "bad_lines": trace.bad_lines,
        },
        "reuse_ceiling": {"hit_rate_blocks": ceiling[0], "hit_rate_tokens": ceiling[1]},
        "sweep": None
        if sweep is None
        else {"parameter": sweep.parameter, "weight": sweep.weight, "values": list(sweep.values)},
        "warnings": list(warnings),
        "points": [
            {
                "label": point.label,
                "settings": settings_dict(point.settings, trace.block_tokens),
                "policies": [r.as_dict() for r in point.results],
            }
            for point in points
        ],
    }


def _csv_rows(document: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for point in document["points"]:
        s = point["settings"]
        for p in point["policies"]:
            rows.append(
                [
                    point["label"],
                    p["policy"],
                    s["engines"],
                    s["capacity_blocks"],
                    p["requests"],
                    round(p["hit_rate_blocks"], 6),
                    round(p["hit_rate_tokens"], 6),
                    round(p["ttft_ms"]["p50"], 3),
                    round(p["ttft_ms"]["p90"], 3),
                    round(p["ttft_ms"]["p99"], 3),
                    round(p["queue_ms"]["mean"], 3),
                    round(p["queue_ms"]["p99"], 3),
                    round(p["load"]["max_over_mean"], 6),
                    round(p["load"]["cv"], 6),
                    sum(e["evicted_blocks"] for e in p["load"]["engines"]),
                ]
            )
    return rows


def write_csv(document: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_rows(document))


def _point_table(point: dict[str, Any], ceiling: float) -> Table:
    s = point["settings"]
    title = (
        f"{point['label']}: {s['engines']} engines x {s['capacity_blocks']} blocks, "
        f"reuse ceiling {ceiling:.1%}"
    )
    table = Table(title=title, title_justify="left")
    for column, justify in (
        ("policy", "left"),
        ("hit blocks", "right"),
        ("hit tokens", "right"),
        ("TTFT p50", "right"),
        ("p90", "right"),
        ("p99 (ms)", "right"),
        ("queue mean", "right"),
        ("load max/mean", "right"),
        ("load CV", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for p in point["policies"]:
        table.add_row(*_policy_cells(p))
    return table


def _policy_cells(p: dict[str, Any]) -> list[str]:
    """One policy's row of the results table (terminal and HTML)."""
    return [
        p["policy"],
        f"{p['hit_rate_blocks']:.1%}",
        f"{p['hit_rate_tokens']:.1%}",
        f"{p['ttft_ms']['p50']:.0f}",
        f"{p['ttft_ms']['p90']:.0f}",
        f"{p['ttft_ms']['p99']:.0f}",
        f"{p['queue_ms']['mean']:.0f}",
        f"{p['load']['max_over_mean']:.2f}",
        f"{p['load']['cv']:.3f}",
    ]


def print_tables(document: dict[str, Any], console: Console) -> None:
    inp = document["input"]
    console.print(
        f"{inp['source']}: {inp['requests']} requests, {inp['blocks']} blocks of "
        f"{inp['block_tokens']} tokens over {inp['span_s']:.0f} s"
        + (f", {inp['bad_lines']} bad lines skipped" if inp["bad_lines"] else "")
    )
    for warning in document["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    ceiling = document["reuse_ceiling"]["hit_rate_blocks"]
    for point in document["points"]:
        console.print(_point_table(point, ceiling))
    summary = sweep_summary(document)
    if summary is not None:
        header, rows = summary
        table = Table(title="sweep: hit rate (blocks) / TTFT p90 ms", title_justify="left")
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def sweep_summary(document: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """One row per sweep point, one column per policy: where the knee is, at a glance."""
    points = document["points"]
    if document["sweep"] is None or len(points) < 2:
        return None
    policies = [p["policy"] for p in points[0]["policies"]]
    rows = [
        [point["label"]]
        + [f"{p['hit_rate_blocks']:.1%} / {p['ttft_ms']['p90']:.0f}" for p in point["policies"]]
        for point in points
    ]
    return ["point", *policies], rows


def write_html(document: dict[str, Any], charts: Sequence[tuple[str, bytes]], path: Path) -> None:
    """One self-contained file: tables, then the charts as base64 PNGs."""
    esc = html.escape
    inp = document["input"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>kvindex analyze</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
        "</head><body>",
        "<h1>kvindex analyze</h1>",
        f"<p>{esc(str(inp['source']))}: {inp['requests']} requests, {inp['blocks']} blocks of "
        f"{inp['block_tokens']} tokens over {inp['span_s']:.0f} s. Reuse ceiling "
        f"{document['reuse_ceiling']['hit_rate_blocks']:.1%} of blocks.</p>",
    ]
    for warning in document["warnings"]:
        parts.append(f"<p><b>warning:</b> {esc(warning)}</p>")
    header = [
        "policy",
        "hit blocks",
        "hit tokens",
        "TTFT p50 ms",
        "TTFT p90 ms",
        "TTFT p99 ms",
        "queue mean ms",
        "load max/mean",
        "load CV",
    ]
    for point in document["points"]:
        s = point["settings"]
        parts.append(
            f"<h2>{esc(point['label'])}: {s['engines']} engines x {s['capacity_blocks']} "
            "blocks</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"
        )
        for p in point["policies"]:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _policy_cells(p)) + "</tr>")
        parts.append("</table>")
    summary = sweep_summary(document)
    if summary is not None:
        header, rows = summary
        parts.append("<h2>Sweep: hit rate (blocks) / TTFT p90 ms</h2><table><tr>")
        parts.append("".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    write_html_with_charts(parts, charts, path)


def write_html_with_charts(
    parts: list[str], charts: Sequence[tuple[str, bytes]], path: Path
) -> None:
    """Close an HTML report: each chart as a heading and an embedded base64 PNG."""
    for title, png in charts:
        data = base64.b64encode(png).decode()
        title_html = html.escape(title)
        parts.append(
            f'<h2>{title_html}</h2><img alt="{title_html}" src="data:image/png;base64,{data}">'
        )
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def csv_text(document: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(_csv_rows(document))
    return buf.getvalue()
