"""A grid of test frames: nucleus | real protein | U-Net | GAN."""

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax.training.train_state import TrainState
from matplotlib.figure import Figure

from dlfb_localization.dataset import Dataset
from dlfb_localization.nucleus.evaluate import predict_images
from dlfb_localization.nucleus.train import split_channels

__all__ = ["plot_predictions"]


def plot_predictions(
    dataset_split: Dataset,
    unet: TrainState,
    *,
    image_size: int,
    gan: TrainState | None = None,
    n_frames: int = 4,
    rng: jax.Array | int = 0,
) -> Figure:
    """Random frames with their nucleus, real protein image and predictions.

    Columns: nucleus | real | U-Net | GAN (the last only when `gan` is given);
    one row per frame, labelled with the gene symbol and its predominant
    localization. The real and predicted protein images of a row share one
    colour scale (the real image's range), so a faint prediction looks faint.

    Args:
      dataset_split: frames with channels (0, 1), e.g. the test split.
      unet: `TrainState` of the U-Net.
      image_size: the side the models were trained at.
      gan: the GAN's generator `TrainState`, if any.
      n_frames: rows.
      rng: key or seed choosing the frames.

    Returns:
      The Figure, with `n_frames` x (3 or 4) axes.
    """
    frame_ids = dataset_split.sample_frame_ids(n_frames, rng)
    rows = np.searchsorted(dataset_split.labels.frame_ids, frame_ids)
    codes = dataset_split.labels.codes[rows]
    names = dataset_split.labels.lookup["name"].to_numpy()[rows]
    localizations = dataset_split.labels.localizations("predominant", restrict=False)
    images = np.asarray(dataset_split.images.frames[frame_ids], np.float32)
    nucleus, real = (np.asarray(x[..., 0]) for x in split_channels(images, image_size))
    columns = {"nucleus": nucleus, "real": real}
    columns["U-Net"] = predict_images(unet, images, codes, image_size)
    if gan is not None:
        columns["GAN"] = predict_images(gan, images, codes, image_size)

    fig, axes = plt.subplots(
        n_frames,
        len(columns),
        figsize=(2.0 * len(columns), 2.0 * n_frames),
        squeeze=False,
    )
    for row in range(n_frames):
        protein_range = (float(real[row].min()), float(real[row].max()))
        for col, (title, values) in enumerate(columns.items()):
            ax = axes[row, col]
            vmin, vmax = (None, None) if title == "nucleus" else protein_range
            ax.imshow(values[row], cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
        axes[row, 0].set_ylabel(
            f"{names[row]}\n{localizations[rows[row]] or 'unannotated'}", fontsize=8
        )
    fig.tight_layout()
    return fig
