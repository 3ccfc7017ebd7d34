"""The model comparison's figure: every candidate's embeddings, metric by
metric, as the mean over seeds with its spread and each seed's value."""

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_comparison"]


def plot_comparison(result: Mapping, metrics: Mapping[str, str]) -> Figure:
    """One panel per metric, one row per candidate and embedding.

    Each row is a bar at the mean over seeds, an error bar of one standard
    deviation and a dot per seed, in its candidate's colour; a dashed line
    marks chance where the result has it (`result["chance"][metric]`, its
    mean over seeds).

    Args:
      result: `compare.compare`'s result (`compare.json`).
      metrics: `{metric: axis label}` to draw, in order.

    Returns:
      The Figure.
    """
    rows = [
        (f"{result['candidates'][name]['title']}\n{embedding}", values, index)
        for index, (name, embeddings) in enumerate(result["scores"].items())
        for embedding, values in embeddings.items()
    ]
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(3.2 * len(metrics) + 2.5, 0.45 * len(rows) + 1.4),
        sharey=True,
        squeeze=False,
    )
    positions = np.arange(len(rows))[::-1]
    colours = plt.get_cmap("tab10")
    for ax, (metric, label) in zip(axes[0], metrics.items(), strict=True):
        for position, (_, values, candidate) in zip(positions, rows, strict=True):
            summary = values[metric]
            if summary["mean"] is None:
                continue
            colour = colours(candidate % 10)
            ax.barh(position, summary["mean"], color=colour, alpha=0.35, height=0.7)
            if summary["std"] is not None:
                ax.errorbar(
                    summary["mean"],
                    position,
                    xerr=summary["std"],
                    color=colour,
                    capsize=3,
                )
            seeds = [v for v in summary["values"] if v is not None]
            ax.scatter(seeds, [position] * len(seeds), color=colour, s=10, zorder=3)
        chance = result.get("chance", {}).get(metric)
        if chance is not None and chance["mean"] is not None:
            ax.axvline(chance["mean"], color="0.3", linestyle="--", linewidth=1)
            ax.text(
                chance["mean"],
                positions[0] + 0.6,
                " chance",
                fontsize=7,
                color="0.3",
                va="bottom",
            )
        ax.set_xlabel(label)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions, [name for name, _, _ in rows], fontsize=7)
    axes[0][0].set_ylim(-0.7, len(rows) - 0.1)
    n_seeds = len(result["settings"]["seeds"])
    fig.suptitle(
        f"{result['n_proteins']} unseen proteins; bars: mean over {n_seeds} "
        "seed(s), lines: ±1 sd, dots: seeds",
        fontsize=9,
    )
    fig.tight_layout()
    return fig
