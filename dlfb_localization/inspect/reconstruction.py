"""Input frames beside the model's reconstructions."""

import math

import matplotlib.pyplot as plt
import numpy as np
from flax.training.train_state import TrainState
from matplotlib.figure import Figure

from dlfb_localization.dataset import Dataset
from dlfb_localization.inference import reconstruct
from dlfb_localization.inspect.frames import frame_titles

__all__ = ["show_reconstruction"]

_PAIRS_PER_ROW = 4


def show_reconstruction(
    dataset_split: Dataset,
    state: TrainState,
    n: int,
    rng,
    *,
    channel: int = 0,
) -> Figure:
    """Random frames (left) and their reconstructions (right), pair by pair.

    Each input is titled with its protein's gene symbol and main localization
    (+k other localizations). Input and reconstruction share one grey scale,
    the input's range, so a dim or washed-out reconstruction looks it.

    Args:
      dataset_split: the split to draw frames from (e.g. "valid").
      state: `TrainState` of a `LocalizationModel`.
      n: number of frames.
      rng: JAX key or int seed choosing the frames.
      channel: which channel to show.

    Returns:
      The Figure: rows of up to four (input, reconstruction) pairs, `2 * n`
      axes.
    """
    frame_ids = dataset_split.sample_frame_ids(n, rng)
    images = np.asarray(dataset_split.images.frames[frame_ids], dtype=np.float32)
    decoded = np.asarray(reconstruct(state, images))
    titles = frame_titles(dataset_split, frame_ids)

    pairs_per_row = min(n, _PAIRS_PER_ROW)
    rows = math.ceil(n / pairs_per_row)
    fig = plt.figure(figsize=(3.8 * pairs_per_row, 2.3 * rows))
    # A narrow empty column after each pair keeps pairs apart from each other.
    grid = fig.add_gridspec(
        rows,
        3 * pairs_per_row - 1,
        width_ratios=([1.0, 1.0, 0.25] * pairs_per_row)[:-1],
        wspace=0.05,
    )
    for i in range(n):
        row, column = divmod(i, pairs_per_row)
        ax_in = fig.add_subplot(grid[row, 3 * column])
        ax_out = fig.add_subplot(grid[row, 3 * column + 1])
        image = images[i, ..., channel]
        vmin, vmax = float(image.min()), float(image.max())
        ax_in.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax_out.imshow(
            decoded[i, ..., channel],
            cmap="gray",
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        ax_in.set_title(titles[i], fontsize=8)
        ax_out.set_title("reconstruction", fontsize=8)
        ax_in.set_axis_off()
        ax_out.set_axis_off()
    return fig
