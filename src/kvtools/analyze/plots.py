"""PNG charts with matplotlib's Agg backend (no display): hit rate over time per policy, TTFT
CDF per policy, requests per engine. matplotlib is an optional dependency (the ``demo``
extra); :func:`render_charts` says how to install it when missing."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvtools.analyze.metrics import PolicyResult

__all__ = ["PlotError", "render_charts", "render_sweep_chart", "write_charts"]


class PlotError(RuntimeError):
    pass


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise PlotError("charts need matplotlib: pip install 'kvindex[demo]'") from e
    return plt


def png_of(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def render_charts(
    results: Sequence[PolicyResult], label: str = "", max_cdf_points: int = 2000
) -> list[tuple[str, str, bytes]]:
    """(file stem, title, PNG bytes) for one settings point."""
    plt = pyplot()
    suffix = f" ({label})" if label and label != "base" else ""
    stem = "" if not suffix else "-" + label.replace("=", "-").replace(":", "-")
    charts: list[tuple[str, str, bytes]] = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        xs = [(i + 0.5) * r.window_s for i, v in enumerate(r.timeline_hit_rate) if v is not None]
        ys = [v for v in r.timeline_hit_rate if v is not None]
        ax.plot(xs, ys, label=r.policy)
    ax.set_xlabel("arrival time (s, simulated)")
    ax.set_ylabel("prefix-cache hit rate (blocks)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_title("Hit rate over time" + suffix)
    charts.append((f"hit-rate-over-time{stem}", "Hit rate over time" + suffix, png_of(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        samples = r.ttft_samples
        if not samples:
            continue
        step = max(1, len(samples) // max_cdf_points)
        xs = samples[::step]
        ys = [(i * step + 1) / len(samples) for i in range(len(xs))]
        ax.plot(xs, ys, label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_title("TTFT CDF" + suffix)
    charts.append((f"ttft-cdf{stem}", "TTFT CDF" + suffix, png_of(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    n_policies = max(1, len(results))
    width = 0.8 / n_policies
    for k, r in enumerate(results):
        xs = [i + k * width for i in range(len(r.engines))]
        ax.bar(xs, [e.requests for e in r.engines], width=width, label=r.policy)
    ax.set_xlabel("engine")
    ax.set_ylabel("requests routed")
    ax.legend(fontsize="small")
    ax.set_title("Per-engine load" + suffix)
    charts.append((f"engine-load{stem}", "Per-engine load" + suffix, png_of(fig)))
    plt.close(fig)
    return charts


def render_sweep_chart(
    labels: Sequence[str],
    values: Sequence[float],
    parameter: str,
    results: Sequence[Sequence[PolicyResult]],
) -> tuple[str, str, bytes]:
    """Hit rate per policy against the swept value (one line per policy)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    policies = [r.policy for r in results[0]]
    for k, policy in enumerate(policies):
        ax.plot(values, [point[k].hit_rate_blocks for point in results], marker="o", label=policy)
    ax.set_xticks(list(values), list(labels), fontsize="small")
    ax.set_xlabel(parameter)
    ax.set_ylabel("prefix-cache hit rate (blocks)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    title = f"Hit rate by {parameter}"
    ax.set_title(title)
    png = png_of(fig)
    plt.close(fig)
    return ("sweep-hit-rate", title, png)


def write_charts(charts: Sequence[tuple[str, str, bytes]], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, _, png in charts:
        path = directory / f"{stem}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths
