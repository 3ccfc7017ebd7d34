"""Where a ViT's attention pooling looks: crops with each head's weights."""

import numpy as np
from flax.training.train_state import TrainState
from matplotlib.figure import Figure

from dlfb_localization.dataset import Dataset
from dlfb_localization.inference import attention_maps
from dlfb_localization.inspect.frames import frame_panels, frame_titles

__all__ = ["show_attention"]

_FRAMES_PER_ROW = 4


def show_attention(
    dataset_split: Dataset,
    state: TrainState,
    n: int,
    rng,
    *,
    channel: int = 0,
) -> Figure:
    """Random frames, each beside one panel per pooling head: the crop in grey
    under that head's weights on the patch grid (red; the same colour scale
    for all heads of a frame, so a head that spreads its weight looks faint).

    The weights are those the embedding is pooled with (`attention_maps`), so
    a head that looks at the nucleus, or at the protein's bright structures,
    shows it here.

    Args:
      dataset_split: the split to draw frames from.
      state: `TrainState` of a model with `attention_maps` (a `ViTModel`).
      n: number of frames.
      rng: JAX key or int seed choosing the frames.
      channel: which channel to show under the weights.

    Returns:
      The Figure: rows of up to four frames, `1 + heads` axes per frame.
    """
    frame_ids = dataset_split.sample_frame_ids(n, rng)
    images = np.asarray(dataset_split.images.frames[frame_ids], dtype=np.float32)
    weights = np.asarray(attention_maps(state, images))
    heads = weights.shape[-1]
    titles = frame_titles(dataset_split, frame_ids)

    fig, axes = frame_panels(n, 1 + heads, _FRAMES_PER_ROW)
    height, side = images.shape[1:3]
    for i in range(n):
        image = images[i, ..., channel]
        ax = axes(i, 0)
        ax.imshow(image, cmap="gray", interpolation="nearest")
        ax.set_title(titles[i], fontsize=8)
        ax.set_axis_off()
        top = float(weights[i].max())
        for head in range(heads):
            ax = axes(i, 1 + head)
            ax.imshow(image, cmap="gray", interpolation="nearest")
            ax.imshow(
                weights[i, ..., head],
                cmap="Reds",
                vmin=0.0,
                vmax=top,
                alpha=0.6,
                extent=(-0.5, side - 0.5, height - 0.5, -0.5),
                interpolation="nearest",
            )
            ax.set_title(f"head {head + 1}", fontsize=8)
            ax.set_axis_off()
    return fig
