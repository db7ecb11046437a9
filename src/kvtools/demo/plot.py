"""`--plot FILE.png`: hit rate, TTFT and load spread per policy, side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvtools.demo.report import RunSummary


def plot(summaries: Sequence[RunSummary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.policy for s in summaries]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [s.hit_rate * 100 for s in summaries], color="tab:green")
    axes[0].set_title("prefix-cache hit rate (%)")
    width = 0.38
    xs = range(len(names))
    axes[1].bar(
        [x - width / 2 for x in xs],
        [(s.ttft_p50_s or 0) * 1000 for s in summaries],
        width,
        label="p50",
    )
    axes[1].bar(
        [x + width / 2 for x in xs],
        [(s.ttft_p90_s or 0) * 1000 for s in summaries],
        width,
        label="p90",
    )
    axes[1].set_xticks(list(xs), names)
    axes[1].set_title("time to first token (ms)")
    axes[1].legend()
    engines = sorted({e for s in summaries for e in s.per_engine})
    for i, s in enumerate(summaries):
        counts = [s.per_engine.get(e, 0) for e in engines]
        axes[2].bar(
            [j + (i - (len(summaries) - 1) / 2) * 0.25 for j in range(len(engines))],
            counts,
            0.25,
            label=s.policy,
        )
    axes[2].set_xticks(range(len(engines)), engines)
    axes[2].set_title("requests per engine")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
