"""Outputs of a capture analysis: terminal tables, timeline CSV, charts, HTML."""

from __future__ import annotations

import csv
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvtools.analyze.report import write_html_with_charts

__all__ = [
    "CAPTURE_CSV_COLUMNS",
    "print_capture_tables",
    "render_capture_charts",
    "write_capture_csv",
    "write_capture_html",
]

CAPTURE_CSV_COLUMNS = (
    "t_s",
    "engine",
    "stored",
    "removed",
    "reused",
    "index_keys",
    "duplicated_keys",
)
_ENGINE_COLUMNS = (
    "stored",
    "removed",
    "reused",
    "held_blocks",
    "cleared",
    "batches",
    "gaps",
    "duplicates",
    "resets",
)


def _engine_rows(document: dict[str, Any]) -> list[list[str]]:
    return [
        [
            name,
            *(str(counters[c]) for c in _ENGINE_COLUMNS),
            ", ".join(f"{k}={v}" for k, v in sorted(counters["skipped"].items())) or "-",
        ]
        for name, counters in document["engines"].items()
    ]


def print_capture_tables(document: dict[str, Any], console: Console) -> None:
    index = document["index"]
    console.print(
        f"{document['frames']} frames over {document['span_s']:.1f} s; index: {index['keys']} "
        f"keys, {index['entries']} entries, {index['engines']} engines"
        + (f"; bad frames {document['bad_frames']}" if document["bad_frames"] else "")
    )
    table = Table(title="per engine", title_justify="left")
    for column in ("engine", *_ENGINE_COLUMNS, "skipped"):
        table.add_column(column, justify="left" if column in ("engine", "skipped") else "right")
    for row in _engine_rows(document):
        table.add_row(*row)
    console.print(table)
    dup = document["duplicated"]
    console.print(f"keys held by more than one engine: {dup['keys_on_multiple_engines']}")
    if dup["by_engine_pair"]:
        pairs = Table(title="duplicated prefixes by engine pair", title_justify="left")
        pairs.add_column("engines")
        pairs.add_column("shared keys", justify="right")
        for item in dup["by_engine_pair"][:20]:
            pairs.add_row(" + ".join(item["engines"]), str(item["keys"]))
        console.print(pairs)


def write_capture_csv(document: dict[str, Any], path: Path) -> None:
    """One row per (window, engine) of the timeline."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CAPTURE_CSV_COLUMNS)
        for window in document["timeline"]:
            for engine, c in window["engines"].items():
                writer.writerow(
                    [
                        window["t_s"],
                        engine,
                        c["stored"],
                        c["removed"],
                        c["reused"],
                        window["index_keys"],
                        window["duplicated_keys"],
                    ]
                )


def render_capture_charts(document: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    """Index size and duplicated keys over time; blocks stored / removed per engine over
    time."""
    from kvtools.analyze.plots import png_of, pyplot

    plt = pyplot()
    timeline = document["timeline"]
    xs = [w["t_s"] for w in timeline]
    charts: list[tuple[str, str, bytes]] = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, [w["index_keys"] for w in timeline], marker=".", label="index keys")
    ax.plot(
        xs,
        [w["duplicated_keys"] for w in timeline],
        marker=".",
        label="keys on more than one engine",
    )
    ax.set_xlabel("time (s from first frame)")
    ax.set_ylabel("keys")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_title("Index size over time")
    charts.append(("capture-index-size", "Index size over time", png_of(fig)))
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for engine in document["engines"]:
        top.plot(
            xs,
            [w["engines"].get(engine, {}).get("stored", 0) for w in timeline],
            marker=".",
            label=engine,
        )
        bottom.plot(
            xs,
            [w["engines"].get(engine, {}).get("removed", 0) for w in timeline],
            marker=".",
            label=engine,
        )
    top.set_ylabel("blocks stored")
    bottom.set_ylabel("blocks removed")
    bottom.set_xlabel(f"time (s from first frame, {document['window_s']:g} s windows)")
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    top.set_title("Per-engine KV events over time")
    charts.append(("capture-engine-events", "Per-engine KV events over time", png_of(fig)))
    plt.close(fig)
    return charts


def write_capture_html(
    document: dict[str, Any], charts: Sequence[tuple[str, bytes]], path: Path
) -> None:
    esc = html.escape
    index = document["index"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>kvindex analyze: capture</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}"
        "</style></head><body><h1>kvindex analyze: KV-event capture</h1>",
        f"<p>{document['frames']} frames over {document['span_s']:.1f} s; index "
        f"{index['keys']} keys, {index['entries']} entries, {index['engines']} engines; "
        f"{document['duplicated']['keys_on_multiple_engines']} keys on more than one engine."
        "</p><table><tr>"
        + "".join(f"<th>{esc(c)}</th>" for c in ("engine", *_ENGINE_COLUMNS, "skipped"))
        + "</tr>",
    ]
    for row in _engine_rows(document):
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    write_html_with_charts(parts, charts, path)
