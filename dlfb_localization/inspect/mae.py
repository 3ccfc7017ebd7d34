"""What a ViT's masked autoencoder fills in: masked crop, reconstruction and
original, side by side (as MAE's figures, He et al. 2022)."""

import matplotlib.pyplot as plt
import numpy as np
from flax.training.train_state import TrainState
from matplotlib.figure import Figure

from dlfb_localization.dataset import Dataset
from dlfb_localization.inference import mae_reconstructions
from dlfb_localization.inspect.frames import frame_panels, frame_titles

__all__ = ["show_mae_reconstructions"]

_FRAMES_PER_ROW = 3
# Masked patches: a flat colour that no grey of the crops takes.
_MASK_COLOUR = "#4f7cac"


def show_mae_reconstructions(
    dataset_split: Dataset,
    state: TrainState,
    n: int,
    rng,
    *,
    channel: int = 0,
    mask_rng=0,
) -> Figure:
    """Random frames, each as three panels: the crop with its masked patches
    blanked out (what the encoder sees), the reconstruction (the decoder's
    predictions pasted into the kept patches) and the original.

    The three panels of a frame share one grey scale, the original's. The
    model predicts each masked patch standardised on its own, so its
    brightness and contrast are the original patch's (as in MAE's figures):
    what the reconstruction shows of the model is the pattern inside each
    masked patch.

    Args:
      dataset_split: the split to draw frames from.
      state: `TrainState` of a ViT whose objective reconstructs
        (`inference.reconstructs_masked_patches`).
      n: number of frames.
      rng: JAX key or int seed choosing the frames.
      channel: which channel to show.
      mask_rng: JAX key or int seed of the masks (`mae_reconstructions`).

    Returns:
      The Figure: rows of up to three frames, three axes per frame.
    """
    frame_ids = dataset_split.sample_frame_ids(n, rng)
    images = np.asarray(dataset_split.images.frames[frame_ids], dtype=np.float32)
    result = mae_reconstructions(state, images, mask_rng)
    reconstructions = np.asarray(result.reconstructions)
    mask = np.asarray(result.mask)
    titles = frame_titles(dataset_split, frame_ids)
    patch = images.shape[1] // mask.shape[1]
    cmap = plt.get_cmap("gray").with_extremes(bad=_MASK_COLOUR)

    fig, axes = frame_panels(n, 3, _FRAMES_PER_ROW)
    for i in range(n):
        original = images[i, ..., channel]
        hidden = np.kron(mask[i], np.ones((patch, patch), dtype=bool)).astype(bool)
        panels = (
            (np.ma.masked_array(original, hidden), f"{titles[i]}\nmasked"),
            (reconstructions[i, ..., channel], "reconstruction"),
            (original, "original"),
        )
        low, high = float(original.min()), float(original.max())
        for j, (image, title) in enumerate(panels):
            ax = axes(i, j)
            ax.imshow(image, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    return fig
