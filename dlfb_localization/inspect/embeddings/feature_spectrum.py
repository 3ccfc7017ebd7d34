"""Feature spectra: which codes are used together, and by which compartment."""

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import dendrogram, leaves_list, linkage
from scipy.spatial.distance import pdist

from dlfb_localization.inspect.embeddings.clustering import (
    LOCALIZATION_COLORS,
    OTHER_COLOR,
)

__all__ = [
    "cluster_colors",
    "plot_encoding_corr_heatmap",
    "plot_stacked_histograms",
    "plot_stacked_histrograms",
    "to_roman",
]

# Cluster 0 (codes whose correlation is undefined) is grey; groups 1.. cycle
# through tab10 without its grey, which would read as cluster 0.
_CLUSTER_PALETTE = tuple(
    c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7
)
_CONSTANT_LABEL = "–"


def to_roman(number: int) -> str:
    """1 -> "I", 4 -> "IV", 12 -> "XII" (the chapter labels code groups so)."""
    if number < 1:
        raise ValueError(f"roman numerals start at 1, got {number}")
    numerals = (
        (1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
        (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"),
    )  # fmt: skip
    out = []
    for value, symbol in numerals:
        count, number = divmod(number, value)
        out.append(symbol * count)
    return "".join(out)


def cluster_colors(encoding_clusters: np.ndarray) -> np.ndarray:
    """RGB colour of each code's cluster: `[K, 3]` floats (cluster 0 grey)."""
    encoding_clusters = np.asarray(encoding_clusters)
    colors = [
        to_rgb(OTHER_COLOR)
        if c == 0
        else _CLUSTER_PALETTE[(c - 1) % len(_CLUSTER_PALETTE)]
        for c in encoding_clusters.tolist()
    ]
    return np.array(colors, dtype=float).reshape(len(encoding_clusters), 3)


def _cluster_runs(ordered_clusters: np.ndarray) -> list[tuple[int, int, int]]:
    """`(cluster, start, stop)` of each run of equal labels, left to right."""
    runs = []
    start = 0
    for i in range(1, len(ordered_clusters) + 1):
        if i == len(ordered_clusters) or ordered_clusters[i] != ordered_clusters[start]:
            runs.append((int(ordered_clusters[start]), start, i))
            start = i
    return runs


def _group_label(cluster: int) -> str:
    return _CONSTANT_LABEL if cluster == 0 else to_roman(cluster)


def _check_codes(tree: np.ndarray, encoding_clusters: np.ndarray, n_codes: int):
    if len(tree) != n_codes - 1 or len(encoding_clusters) != n_codes:
        raise ValueError(
            f"tree ({len(tree) + 1} leaves) and encoding_clusters "
            f"({len(encoding_clusters)}) must describe the {n_codes} codes; pass the "
            "outputs of one cluster_feature_spectrums call"
        )


def plot_encoding_corr_heatmap(
    corr_idx_idx: np.ndarray, tree: np.ndarray, encoding_clusters: np.ndarray
) -> Figure:
    """Correlation of codebook entries across proteins, in dendrogram order.

    The dendrogram of `cluster_feature_spectrums` is on top, a bar below it
    colours each code by its group (I, II, … left to right; grey "–" for codes
    whose correlation is undefined because no protein's usage of them differs)
    and the heatmap shows the Pearson correlations, undefined cells in grey.

    Args:
      corr_idx_idx: `[K, K]` correlations (NaN where undefined).
      tree: `[K - 1, 4]` linkage over the K codes.
      encoding_clusters: `[K]` group of each code (0 = undefined).

    Returns:
      The Figure: dendrogram, group bar, heatmap and colour bar axes (4).
    """
    corr_idx_idx = np.asarray(corr_idx_idx)
    encoding_clusters = np.asarray(encoding_clusters)
    n_codes = len(corr_idx_idx)
    _check_codes(tree, encoding_clusters, n_codes)

    fig = plt.figure(figsize=(8.0, 9.0))
    grid = fig.add_gridspec(
        3,
        2,
        height_ratios=(1.4, 0.25, 6.0),
        width_ratios=(1.0, 0.04),
        hspace=0.03,
        wspace=0.03,
    )
    ax_tree = fig.add_subplot(grid[0, 0])
    ax_bar = fig.add_subplot(grid[1, 0])
    ax_heat = fig.add_subplot(grid[2, 0])
    ax_cbar = fig.add_subplot(grid[2, 1])

    order = dendrogram(
        tree,
        ax=ax_tree,
        no_labels=True,
        link_color_func=lambda _: "0.25",
    )["leaves"]
    # dendrogram puts leaf i at x = 10 i + 5: scale its axis to the heatmap's.
    ax_tree.set_xlim(0, 10 * n_codes)
    ax_tree.set_axis_off()
    ax_tree.set_title(
        "Codebook entries clustered by Pearson correlation of usage across proteins"
    )

    ordered_clusters = encoding_clusters[order]
    ax_bar.imshow(
        cluster_colors(ordered_clusters)[None],
        aspect="auto",
        extent=(0, n_codes, 1, 0),
        interpolation="nearest",
    )
    for cluster, start, stop in _cluster_runs(ordered_clusters):
        ax_bar.text(
            (start + stop) / 2,
            0.5,
            _group_label(cluster),
            ha="center",
            va="center",
            fontsize=8,
        )
    ax_bar.set_xlim(0, n_codes)
    ax_bar.set_axis_off()

    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    image = ax_heat.imshow(
        np.ma.masked_invalid(corr_idx_idx[np.ix_(order, order)]),
        cmap=cmap,
        vmin=-1,
        vmax=1,
        aspect="auto",
        extent=(0, n_codes, n_codes, 0),
        interpolation="nearest",
    )
    # Not every code's index fits: label about 16 positions.
    ticks = np.unique(np.linspace(0, n_codes - 1, min(n_codes, 16)).astype(int))
    ax_heat.set_xticks(ticks + 0.5, [str(order[t]) for t in ticks], rotation=90)
    ax_heat.set_yticks(ticks + 0.5, [str(order[t]) for t in ticks])
    ax_heat.tick_params(labelsize=7)
    ax_heat.set_xlabel("VQ index (dendrogram order)")
    ax_heat.set_ylabel("VQ index (dendrogram order)")
    fig.colorbar(image, cax=ax_cbar, label="Pearson correlation")
    return fig


def _order_rows(histograms: np.ndarray) -> np.ndarray:
    """Rows ordered so similar spectra sit together, as in the chapter."""
    if len(histograms) < 3:
        return np.arange(len(histograms))
    tree = linkage(pdist(histograms), method="average", optimal_ordering=True)
    return leaves_list(tree)


def plot_stacked_histograms(
    localizations: Sequence[str],
    localization_histograms: np.ndarray,
    tree: np.ndarray,
    encoding_clusters: np.ndarray,
) -> Figure:
    """Each localization's mean feature spectrum, codes in dendrogram order.

    One row per localization (rows ordered so that similar spectra are
    neighbours), one bar per code in the order of the dendrogram of
    `cluster_feature_spectrums`. Vertical lines separate the code groups, named
    I, II, … above the top row ("–": codes with undefined correlation).

    Args:
      localizations: `[L]` names (from `aggregate_localizations`).
      localization_histograms: `[L, K]` their mean spectra.
      tree: `[K - 1, 4]` linkage over the K codes.
      encoding_clusters: `[K]` group of each code.

    Returns:
      The Figure, one axis per localization.
    """
    localizations = list(localizations)
    histograms = np.asarray(localization_histograms, dtype=float)
    encoding_clusters = np.asarray(encoding_clusters)
    if histograms.ndim != 2 or len(histograms) != len(localizations):
        raise ValueError(
            f"{len(localizations)} localizations but histograms of shape "
            f"{histograms.shape}"
        )
    if not localizations:
        raise ValueError("no localization to plot")
    n_codes = histograms.shape[1]
    _check_codes(tree, encoding_clusters, n_codes)
    order = leaves_list(tree)
    runs = _cluster_runs(encoding_clusters[order])
    rows = _order_rows(histograms)

    fig, axes = plt.subplots(
        len(localizations),
        1,
        figsize=(10.0, 0.9 * len(localizations) + 1.2),
        sharex=True,
        squeeze=False,
    )
    for ax, row in zip(axes[:, 0], rows, strict=True):
        name = localizations[row]
        color = LOCALIZATION_COLORS.get(name, OTHER_COLOR)
        # One filled outline of the K bars, not K rectangles (4 s less to draw
        # for 9 localizations of 512 codes; bars of width 1 look the same).
        ax.stairs(
            histograms[row, order], np.arange(n_codes + 1), fill=True, color=color
        )
        for _, start, _ in runs[1:]:
            ax.axvline(start, color="0.4", lw=0.6, ls="--")
        ax.set_xlim(0, n_codes)
        ax.set_yticks([])
        ax.set_ylabel(
            name, rotation=0, ha="right", va="center", color=color, fontsize=10
        )
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    top = axes[0, 0]
    for cluster, start, stop in runs:
        top.text(
            (start + stop) / 2,
            1.05,
            _group_label(cluster),
            transform=top.get_xaxis_transform(),
            ha="center",
            va="bottom",
            # Cluster 0's light grey would vanish on white: darker text.
            color="0.4" if cluster == 0 else cluster_colors([cluster])[0],
            fontweight="bold",
        )
    axes[-1, 0].set_xticks([])
    axes[-1, 0].set_xlabel("VQ index (dendrogram order)")
    fig.suptitle("Mean feature spectrum per localization (code usage per frame)")
    fig.tight_layout()
    return fig


# The chapter's spelling.
plot_stacked_histrograms = plot_stacked_histograms
