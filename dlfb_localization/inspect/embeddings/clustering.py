"""Plots of UMAP projections of frame embeddings, aligned across models.

The projections are computed in `dlfb_localization.projection`; this module
re-exports `calculate_projection`, `Projection` and `frame_id_relations`
under the chapter's import path and only draws.
"""

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.localizations import LOCALIZATIONS_OF_INTEREST
from dlfb_localization.embeddings import frame_rows
from dlfb_localization.projection import (
    Projection,
    calculate_projection,
    frame_id_relations,
)

__all__ = [
    "LOCALIZATION_COLORS",
    "OTHER_COLOR",
    "Projection",
    "calculate_projection",
    "frame_id_relations",
    "plot_projection",
]

# One fixed colour per localization of interest, so every figure of the chapter
# (projections, spectra) colours a compartment the same way.
LOCALIZATION_COLORS = {
    "mitochondria": "#d62728",
    "cytoplasmic": "#ff7f0e",
    "er": "#bcbd22",
    "golgi": "#9467bd",
    "vesicles": "#e377c2",
    "nucleoplasm": "#1f77b4",
    "nuclear_membrane": "#17becf",
    "chromatin": "#8c564b",
    "nucleolus_gc": "#2ca02c",
}
OTHER_COLOR = "#c7c7c7"


def _highlighted_frames(
    frame_ids: np.ndarray, labels: np.ndarray, fraction: float, random_state: int
) -> set[int]:
    """About `fraction` of each class's frames (at least one), chosen by seed."""
    generator = np.random.default_rng(random_state)
    chosen: set[int] = set()
    for localization in LOCALIZATIONS_OF_INTEREST:
        members = frame_ids[labels == localization]
        if len(members):
            size = max(1, round(fraction * len(members)))
            chosen.update(generator.choice(members, size=size, replace=False).tolist())
    return chosen


def plot_projection(
    projection: Projection | Mapping[str, Projection],
    dataset_split: Dataset,
    titles: Sequence[str] | None = None,
    subset_mode: str = "predominant",
    *,
    highlight_fraction: float = 0.01,
    random_state: int = 0,
    point_size: float | None = None,
) -> Figure:
    """Projected frames coloured by localization, one panel per model.

    Frames whose localization (see `subset_mode`) is one of the nine of interest
    take that localization's colour; all others are grey, drawn underneath. About
    `highlight_fraction` of each class's frames are drawn larger with a dark
    edge, to mark where each class lies; the same frames are highlighted in
    every panel, so aligned panels can be compared point by point.

    Args:
      projection: from `calculate_projection` (one, or name -> one).
      dataset_split: the split the frames belong to (for their labels).
      titles: one title per panel (default: the names, or "UMAP").
      subset_mode: "predominant" (each protein's main localization) or "single"
        (only proteins with exactly one localization are coloured).
      highlight_fraction: share of each class's frames drawn larger.
      random_state: seed choosing the highlighted frames.
      point_size: marker area of ordinary points (default: larger for fewer
        points, from 20 down to 1).

    Returns:
      The Figure, one axis per panel.
    """
    if isinstance(projection, Projection):
        panels = {"UMAP": projection}
    else:
        panels = dict(projection)
    if titles is None:
        titles = list(panels)
    if len(titles) != len(panels):
        raise ValueError(f"{len(titles)} titles for {len(panels)} panels")
    frame_labels = dataset_split.labels.localizations(subset_mode)
    highlighted = _highlighted_frames(
        dataset_split.labels.frame_ids, frame_labels, highlight_fraction, random_state
    )

    if point_size is None:
        largest = max(len(panel.frame_ids) for panel in panels.values())
        point_size = float(np.clip(2000.0 / largest, 1.0, 20.0))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.0 * len(panels), 5.0), squeeze=False
    )
    present: set[str] = set()
    for ax, title, panel in zip(axes[0], titles, panels.values(), strict=True):
        labels = frame_labels[frame_rows(dataset_split, panel.frame_ids)]
        xy = panel.coordinates
        other = labels == ""
        ax.scatter(*xy[other].T, s=point_size, c=OTHER_COLOR, linewidths=0)
        for localization, color in LOCALIZATION_COLORS.items():
            members = labels == localization
            if members.any():
                present.add(localization)
                ax.scatter(*xy[members].T, s=point_size, c=color, linewidths=0)
        big = np.isin(panel.frame_ids, list(highlighted)) & ~other
        ax.scatter(
            *xy[big].T,
            s=max(30.0, 4 * point_size),
            c=[LOCALIZATION_COLORS[loc] for loc in labels[big]],
            edgecolors="black",
            linewidths=0.6,
        )
        ax.set_title(f"{title}\n({len(panel.frame_ids)} frames)")
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.set_xticks([])
        ax.set_yticks([])

    handles = [
        Line2D([], [], marker="o", ls="", color=LOCALIZATION_COLORS[loc], label=loc)
        for loc in LOCALIZATIONS_OF_INTEREST
        if loc in present
    ]
    handles.append(
        Line2D([], [], marker="o", ls="", color=OTHER_COLOR, label="other / none")
    )
    fig.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
        title=f"{subset_mode} localization",
    )
    fig.tight_layout()
    return fig
