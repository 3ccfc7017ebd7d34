"""Scoring predicted protein images on held-out fields of view.

A prediction is compared with the real protein image of the same frame by the
Pearson correlation of their pixels (is the pattern in the right place, whatever
its brightness?) and by the mean squared error. Both are computed per frame and
then averaged, over all frames and per predominant localization, beside a
baseline that knows the protein but not the nucleus: the protein's mean
training image.
"""

import functools
import os
from collections.abc import Mapping

import jax
import numpy as np
from flax.training.train_state import TrainState

from dlfb_localization.dataset import Dataset
from dlfb_localization.files import write_json
from dlfb_localization.inference import iterate_inference_batches, map_frames
from dlfb_localization.nucleus.train import (
    check_split,
    count_embedded_proteins,
    split_channels,
)

__all__ = [
    "BASELINE",
    "compute_mean_images",
    "compute_pixel_correlation",
    "evaluate_predictions",
    "predict_images",
]

BASELINE = "mean_image"


def compute_pixel_correlation(predicted: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Pearson correlation between the pixels of each pair of images.

    Args:
      predicted, real: `[n, ...]` images of the same shape.

    Returns:
      `[n]` float64. An image with no variation has no pattern to correlate:
      its correlation is 0.
    """
    if predicted.shape != real.shape:
        raise ValueError(
            f"predicted {predicted.shape} and real {real.shape} images differ in shape"
        )
    a = predicted.reshape(len(predicted), -1).astype(np.float64)
    b = real.reshape(len(real), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norm = np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))
    return np.where(norm > 0, np.sum(a * b, axis=1) / np.where(norm > 0, norm, 1), 0)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _predict(apply_fn, params, images, protein_ids, image_size):
    nucleus, _ = split_channels(images, image_size)
    return apply_fn({"params": params}, nucleus, protein_ids)[..., 0]


def predict_images(
    state: TrainState, images: np.ndarray, protein_ids: np.ndarray, image_size: int
) -> np.ndarray:
    """A model's protein images for a batch of frames.

    Args:
      state: `TrainState` of a `ConditionalUNet` (for a GAN, its generator).
      images: `[b, h, w, c]` frames with channel 0 the protein and 1 the nucleus.
      protein_ids: `[b]` protein codes.
      image_size: the side the model was trained at.

    Returns:
      `[b, image_size, image_size]` float32, to compare with `split_channels`'
      protein image.
    """
    return np.asarray(
        _predict(
            state.apply_fn,
            state.params,
            np.asarray(images, np.float32),
            np.asarray(protein_ids, np.int32),
            image_size,
        )
    )


def compute_mean_images(
    train_split: Dataset, num_proteins: int, image_size: int, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Each protein's mean image over its training frames: the baseline.

    OpenCell crops (and the library's synthetic ones) are centred on a nucleus,
    so averaging a protein's crops aligns them on the nucleus centre: the mean
    is the protein's typical pattern around a nucleus, what can be predicted
    from the protein's identity alone without looking at the nucleus image.

    Args:
      train_split: the frames to average (only these are read).
      num_proteins: rows of the result; codes index them.
      image_size: side the crops are resized to, as for the models.
      batch_size: frames read at a time.

    Returns:
      `(mean_images, counts)`: `[num_proteins, image_size, image_size]` float32
      and `[num_proteins]` int64; a protein without training frames has a zero
      image and count 0.
    """
    check_split(train_split, num_proteins)
    sums = np.zeros((num_proteins, image_size, image_size), np.float64)
    counts = np.zeros(num_proteins, np.int64)
    for batch, n in iterate_inference_batches(train_split, batch_size):
        protein = np.asarray(split_channels(batch["images"], image_size)[1])
        np.add.at(sums, batch["labels"], protein[:n, ..., 0].astype(np.float64))
        np.add.at(counts, batch["labels"], 1)
    means = sums / np.maximum(counts, 1)[:, None, None]
    return means.astype(np.float32), counts


def _summarise(
    scores: Mapping[str, Mapping[str, np.ndarray]], mask: np.ndarray
) -> dict[str, dict[str, float]]:
    return {
        name: {metric: float(values[mask].mean()) for metric, values in by.items()}
        for name, by in scores.items()
    }


def evaluate_predictions(
    models: Mapping[str, TrainState],
    train_split: Dataset,
    test_split: Dataset,
    *,
    image_size: int,
    batch_size: int = 64,
    out_path: str | os.PathLike | None = None,
) -> dict:
    """Pixel correlation and MSE of each model and of the mean-image baseline.

    Every test frame is predicted from its nucleus and protein code. Per frame,
    `compute_pixel_correlation` and the mean squared error (over pixels, at
    `image_size`) are computed against the real protein image; both are then
    averaged over all frames ("overall") and over the frames of each
    predominant localization (the first name of the protein's highest annotated
    grade, all localizations, not only the chapter's nine). The baseline
    predicts `compute_mean_images` of `train_split`. Test frames whose protein
    has no training frame are left out: there is no mean image for them, and
    their embedding was never trained.

    Args:
      models: name -> `TrainState` of a `ConditionalUNet` (e.g. {"unet": ...,
        "gan": gan_state.generator}).
      train_split: the frames the models were trained on (for the baseline).
      test_split: held-out frames (e.g. unseen fields of view).
      image_size: the side the models were trained at.
      batch_size: frames per device call.
      out_path: if given, the result is also written there as JSON.

    Returns:
      A JSON-ready dict: `n_frames` (scored), `n_frames_left_out`,
      `n_proteins`, `image_size`, `settings`, `overall[name]` and
      `per_localization[localization]` (with its `n_frames`), where each
      `[name]` is `{"correlation", "mse"}` for every model and `BASELINE`.
    """
    if BASELINE in models:
        raise ValueError(f"{BASELINE!r} names the baseline; name the models otherwise")
    num_proteins = 1 + int(
        max(train_split.labels.codes.max(), test_split.labels.codes.max())
    )
    for state in models.values():
        check_split(test_split, count_embedded_proteins(state))
    mean_images, counts = compute_mean_images(train_split, num_proteins, image_size)
    known = counts[test_split.labels.codes] > 0
    if not known.any():
        raise ValueError(
            "no test frame's protein has training frames; split by field of view "
            '(exclusive_by="fov_id"), not by protein'
        )

    def score(images: np.ndarray, codes: np.ndarray) -> dict[str, dict]:
        """Per-frame scores of every model and the baseline, for one batch
        (padded frames score too; `map_frames` drops them)."""
        real = np.asarray(split_channels(images, image_size)[1])[..., 0]
        predictions = {
            name: predict_images(state, images, codes, image_size)
            for name, state in models.items()
        }
        predictions[BASELINE] = mean_images[codes]
        return {
            name: {
                "correlation": compute_pixel_correlation(predicted, real),
                "mse": np.mean(
                    np.square(predicted - real), axis=(1, 2), dtype=np.float64
                ),
            }
            for name, predicted in predictions.items()
        }

    # In frame-id order, as the split's labels (and `known`) are. Scored batch
    # by batch: a split's predicted images need not fit in memory at once.
    scores = map_frames(
        score, test_split, batch_size, test_split.labels.codes.astype(np.int32)
    )
    scores = {name: scores[name] for name in (*models, BASELINE)}  # models first
    localizations = test_split.labels.localizations("predominant", restrict=False)
    result = {
        "n_frames": int(known.sum()),
        "n_frames_left_out": int((~known).sum()),
        "n_proteins": int(np.unique(test_split.labels.codes[known]).size),
        "image_size": image_size,
        "settings": {
            "correlation": "Pearson over the pixels of each frame, then averaged",
            "mse": "mean squared error over the pixels of each frame, averaged",
            "localizations": "predominant (first name of the highest grade)",
            BASELINE: "the protein's mean training image (crops are centred on "
            "a nucleus)",
        },
        "overall": _summarise(scores, known),
        "per_localization": {
            localization: {
                "n_frames": int((known & (localizations == localization)).sum()),
                **_summarise(scores, known & (localizations == localization)),
            }
            for localization in sorted(set(localizations[known]) - {""})
        },
    }
    if out_path is not None:
        write_json(result, out_path)
    return result
