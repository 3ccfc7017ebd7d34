"""UMAP projections of frame embeddings, aligned across models, and their plots."""

import itertools
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.localizations import LOCALIZATIONS_OF_INTEREST
from dlfb_localization.embeddings import frame_rows

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


class Projection(NamedTuple):
    """A 2-D projection of frames.

    Attributes:
      frame_ids: `[n]` int64 frame ids, in the order of the embeddings.
      coordinates: `[n, 2]` float32 positions.
    """

    frame_ids: np.ndarray
    coordinates: np.ndarray


def frame_id_relations(
    frame_ids_a: np.ndarray, frame_ids_b: np.ndarray
) -> dict[int, int]:
    """AlignedUMAP relations between two embedding sets: row in a -> row in b.

    Rows are matched by frame id, not by position, so two sets in different
    orders (or with different frames) are still aligned frame by frame.

    Args:
      frame_ids_a: `[n_a]` frame ids of the first set (unique).
      frame_ids_b: `[n_b]` frame ids of the second set (unique).

    Returns:
      `{row_a: row_b}` for every frame id the two sets share.
    """
    frame_ids_a, frame_ids_b = np.asarray(frame_ids_a), np.asarray(frame_ids_b)
    for ids in (frame_ids_a, frame_ids_b):
        if len(np.unique(ids)) != len(ids):
            raise ValueError("frame ids within one embedding set must be unique")
    _, rows_a, rows_b = np.intersect1d(
        frame_ids_a, frame_ids_b, assume_unique=True, return_indices=True
    )
    return dict(zip(rows_a.tolist(), rows_b.tolist(), strict=True))


def _is_single(frame_embeddings: Mapping) -> bool:
    return "frame_ids" in frame_embeddings


def calculate_projection(
    frame_embeddings: Mapping,
    *,
    random_state: int = 42,
    feature: str = "frame_histograms",
    metric: str = "euclidean",
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> Projection | dict[str, Projection]:
    """UMAP of one embedding set, or AlignedUMAP of several.

    For one set (the dict `get_frame_embeddings` returns) this is a plain UMAP.
    For a dict of name -> set (e.g. models with and without the classification
    head, as in the chapter), an AlignedUMAP keeps frames that the sets share
    at similar positions in every panel, so the panels can be compared; frames
    are matched by frame id (`frame_id_relations`), so the sets need not be in
    the same order.

    UMAP runs single-threaded with `random_state`, so results are reproducible.
    The first call in a process compiles UMAP's numba code (tens of seconds).

    Args:
      frame_embeddings: one `get_frame_embeddings` dict, or name -> such dicts.
      random_state: seed of UMAP.
      feature: which per-frame array to project ("frame_histograms", the
        chapter's, or "frame_vectors").
      metric: UMAP's distance ("euclidean" as in the chapter; `evaluate` scores
        histograms with "cosine").
      n_neighbors: UMAP's neighbourhood size (capped below the set size).
      min_dist: UMAP's minimum distance between embedded points.

    Returns:
      A `Projection` for one set; name -> `Projection` (same order) for several.
    """
    import umap  # numba compiles on first use; keep it off the import path

    if _is_single(frame_embeddings):
        features = np.asarray(frame_embeddings[feature], dtype=np.float32)
        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=max(2, min(n_neighbors, len(features) - 1)),
            min_dist=min_dist,
            metric=metric,
            random_state=random_state,
            n_jobs=1,
        )
        return Projection(
            frame_ids=np.asarray(frame_embeddings["frame_ids"], dtype=np.int64),
            coordinates=reducer.fit_transform(features).astype(np.float32),
        )

    names = list(frame_embeddings)
    if len(names) < 2:
        raise ValueError(
            "pass one get_frame_embeddings dict, or a dict of at least two of them "
            f"to align; got the name(s) {names}"
        )
    sets = [frame_embeddings[name] for name in names]
    relations = [
        frame_id_relations(a["frame_ids"], b["frame_ids"])
        for a, b in itertools.pairwise(sets)
    ]
    for (name_a, name_b), relation in zip(
        itertools.pairwise(names), relations, strict=True
    ):
        if not relation:
            raise ValueError(
                f"{name_a!r} and {name_b!r} share no frame id, so there is nothing "
                "to align them by; embed the same split with both models"
            )
    smallest = min(len(s["frame_ids"]) for s in sets)
    reducer = umap.AlignedUMAP(
        n_components=2,
        n_neighbors=max(2, min(n_neighbors, smallest - 1)),
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
    )
    with warnings.catch_warnings():
        # AlignedUMAP builds UMAPs with n_jobs=-1 and a seed, so umap warns that
        # it runs single-threaded: that is the reproducibility asked for.
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        reducer.fit(
            [np.asarray(s[feature], dtype=np.float32) for s in sets],
            relations=relations,
        )
    return {
        name: Projection(
            frame_ids=np.asarray(s["frame_ids"], dtype=np.int64),
            coordinates=np.asarray(coordinates, dtype=np.float32),
        )
        for name, s, coordinates in zip(names, sets, reducer.embeddings_, strict=True)
    }


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
