"""Grids of frames titled with their protein and localization."""

import math
from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dlfb_localization.dataset.localizations import frame_localizations


def frame_title(name: str, localizations: list[str]) -> str:
    """ "GENE\\nmain (+k)": the gene symbol, main localization and count of others."""
    if not localizations:
        return f"{name}\nunannotated"
    extra = f" (+{len(localizations) - 1})" if len(localizations) > 1 else ""
    return f"{name}\n{localizations[0]}{extra}"


def frame_titles(dataset, frame_ids: np.ndarray) -> list[str]:
    """`frame_title` of each of `frame_ids` of `dataset`, in their order."""
    lookup = dataset.labels.lookup.set_index("frame_id").loc[frame_ids]
    localizations = frame_localizations(lookup)
    return [
        frame_title(name, found)
        for name, found in zip(lookup["name"], localizations, strict=True)
    ]


def frame_panels(
    n: int, panels: int, frames_per_row: int
) -> tuple[Figure, Callable[[int, int], Axes]]:
    """A figure for `n` frames shown as `panels` axes side by side each, up to
    `frames_per_row` frames a row, a gap between frames.

    Returns:
      `(fig, axes)`: `axes(i, j)` adds and returns panel j of frame i.
    """
    per_row = min(n, frames_per_row)
    rows = math.ceil(n / per_row)
    fig = plt.figure(figsize=(1.9 * panels * per_row, 2.3 * rows))
    grid = fig.add_gridspec(
        rows,
        (panels + 1) * per_row - 1,
        width_ratios=(([1.0] * panels + [0.25]) * per_row)[:-1],
        wspace=0.05,
    )

    def axes(i: int, j: int) -> Axes:
        row, column = divmod(i, per_row)
        return fig.add_subplot(grid[row, (panels + 1) * column + j])

    return fig, axes


def plot_frames(
    dataset, frame_ids: np.ndarray, with_labels: bool = True, channel: int = 0
) -> Figure:
    """Plots frames of `dataset` (one channel, gray) in a near-square grid.

    Args:
      dataset: the `Dataset` the frames belong to.
      frame_ids: `[n]` frame ids to show.
      with_labels: title each frame with gene symbol and main localization.
      channel: which channel of the frames to show.

    Returns:
      The Figure (pyplot keeps a reference, so notebooks display it).
    """
    frame_ids = np.asarray(frame_ids)
    n = len(frame_ids)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(2.0 * cols, 2.0 * rows + (0.4 * rows if with_labels else 0)),
        squeeze=False,
    )
    images = dataset.images.frames[np.sort(frame_ids)][..., channel]
    order = np.argsort(np.argsort(frame_ids))  # back to the caller's order
    titles = frame_titles(dataset, frame_ids) if with_labels else []
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(images[order[i]], cmap="gray", interpolation="nearest")
        if with_labels:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig
