"""Inference over every frame, in fixed-shape batches and frame-id order.

`map_frames` runs a function (a jitted model call) over all frames of a split
or of an in-memory image array and returns its per-frame results, unpadded and
concatenated on the host. Embeddings (`embeddings`), the reconstruction error
(`evaluate`), the invariance score (`invariance.score`) and the nucleus models'
predictions (`nucleus.evaluate`) all run through it. `reconstruct` is a model's
reconstruction of one batch, for figures and the reconstruction error.

It imports neither plotting nor evaluation code.
"""

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from dlfb_localization.dataset import Dataset
from dlfb_localization.model.interface import model_of

__all__ = [
    "can_reconstruct",
    "iterate_inference_batches",
    "map_frames",
    "reconstruct",
    "squared_errors",
]


def _pad(values: np.ndarray, size: int) -> np.ndarray:
    """`values` with rows of zeros appended up to `size` rows."""
    if len(values) == size:
        return values
    pad = np.zeros((size - len(values), *values.shape[1:]), values.dtype)
    return np.concatenate([values, pad])


def iterate_inference_batches(
    dataset_split: Dataset, batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Every frame once, in frame-id order, in batches of one fixed shape.

    The last partial batch is padded with zero frames up to the batch size, so a
    jitted function sees one shape and compiles once; callers keep the first `n`
    results. A split smaller than `batch_size` uses its own size instead, so a
    small split is not padded to a large batch.

    Args:
      dataset_split: the frames.
      batch_size: frames per batch.

    Yields:
      `(batch, n)`: the `get_batches` dict with `images` padded to `[b, h, w, c]`
      (`frame_ids` and `labels` are not padded) and the number `n` of real frames.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(dataset_split) == 0:
        raise ValueError("the split has no frames")
    batch_size = min(batch_size, len(dataset_split))
    for batch in dataset_split.get_batches(
        None, batch_size, shuffle=False, drop_remainder=False
    ):
        n = len(batch["images"])
        yield {**batch, "images": _pad(batch["images"], batch_size)}, n


def _image_batches(
    images: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, int]]:
    """`iterate_inference_batches` for an `[n, h, w, c]` array: `(padded float32
    batch, n real)`, read one batch at a time (a memory map stays on disk)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(images) == 0:
        raise ValueError("there are no images")
    batch_size = min(batch_size, len(images))
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32)
        yield _pad(batch, batch_size), len(batch)


def _fetch(outputs: Any, n: int) -> Any:
    """The first `n` rows of every leaf, on the host."""
    return jax.tree.map(lambda values: np.asarray(values)[:n], jax.device_get(outputs))


def map_frames(
    fn: Callable[..., Any],
    frames: Dataset | np.ndarray,
    batch_size: int,
    *per_frame: np.ndarray,
) -> Any:
    """`fn` applied to every frame, in batches of one shape; results in frame order.

    Batches have `b = min(batch_size, n)` frames; the last one is padded with
    zero frames (and `per_frame` with zeros), so a jitted `fn` compiles once per
    batch shape. Each batch is dispatched before the previous one's results are
    fetched, so the device computes while the host copies and reads frames.
    Padded rows are dropped. `fn` must treat frames independently (a model in
    inference mode does), so results do not depend on `batch_size`'s padding.

    Args:
      fn: `fn(images, *per_frame_batches)` -> a pytree of arrays (device or
        host) whose leaves have the batch's frames on their first axis. It
        receives `[b, h, w, c]` float32 images.
      frames: a `Dataset` (its frames in frame-id order, `labels.frame_ids`) or
        an `[n, h, w, c]` array or memory map (in its own order).
      batch_size: frames per call of `fn`.
      *per_frame: `[n, ...]` arrays aligned with the frames (e.g. class codes),
        passed to `fn` batch by batch after the images.

    Returns:
      `fn`'s pytree, each leaf the `[n, ...]` NumPy concatenation of its rows
      for the real frames. As for any JAX pytree, dicts come back with their
      keys sorted.
    """
    n_frames = len(frames)
    for values in per_frame:
        if len(values) != n_frames:
            raise ValueError(
                f"{len(values)} per-frame values for {n_frames} frames; they must align"
            )
    if hasattr(frames, "get_batches"):  # a Dataset (or a wrapper of one)
        batches = (
            (batch["images"], n)
            for batch, n in iterate_inference_batches(frames, batch_size)
        )
    else:
        batches = _image_batches(frames, batch_size)
    parts, pending, start = [], None, 0
    for images, n in batches:
        extras = [
            _pad(np.asarray(values[start : start + n]), len(images))
            for values in per_frame
        ]
        outputs = fn(images, *extras)
        if pending is not None:
            parts.append(_fetch(*pending))
        pending, start = (outputs, n), start + n
    parts.append(_fetch(*pending))
    return jax.tree.map(lambda *rows: np.concatenate(rows), *parts)


def _reconstruct(model, images: jax.Array) -> jax.Array:
    """The model's `reconstruct`, as a method for `apply`."""
    return model.reconstruct(images)


# Jitted over (apply_fn, params), not the TrainState, so that the optimizer (a
# static field of the state) plays no part in compilation.
@functools.partial(jax.jit, static_argnums=0)
def _reconstruct_jit(apply_fn, params, images: jax.Array) -> jax.Array:
    return apply_fn({"params": params}, images, method=_reconstruct)


@functools.partial(jax.jit, static_argnums=0)
def _squared_errors(apply_fn, params, images: jax.Array) -> jax.Array:
    decoded = apply_fn({"params": params}, images, method=_reconstruct)
    return jnp.sum(jnp.square(decoded - images), axis=tuple(range(1, images.ndim)))


def can_reconstruct(state: TrainState) -> bool:
    """Whether the state's model reconstructs images (has `reconstruct`): the
    VQ-VAEs do; a ViT does not (its MAE decoder predicts masked patches only)."""
    return hasattr(model_of(state), "reconstruct")


def reconstruct(state: TrainState, images: jax.Array) -> jax.Array:
    """The model's reconstruction of `[b, h, w, c]` images, on their scale."""
    return _reconstruct_jit(state.apply_fn, state.params, images)


def squared_errors(state: TrainState, images: jax.Array) -> jax.Array:
    """`[b]` sum over each image's pixels of its squared reconstruction error
    (`reconstruct`, on the images' scale)."""
    return _squared_errors(state.apply_fn, state.params, images)


def _attention_maps(model, images: jax.Array) -> jax.Array:
    return model.attention_maps(images)


@functools.partial(jax.jit, static_argnums=0)
def _attention_jit(apply_fn, params, images: jax.Array) -> jax.Array:
    return apply_fn({"params": params}, images, method=_attention_maps)


def has_attention_maps(state: TrainState) -> bool:
    """Whether the state's model shows where it looks (`attention_maps`): a
    ViT's attention pooling does; the VQ-VAEs have no such weights."""
    return hasattr(model_of(state), "attention_maps")


def attention_maps(state: TrainState, images: jax.Array) -> jax.Array:
    """`[b, rows, cols, heads]` pooling weights on each image's patch grid
    (each head's sum to one), from the model's `attention_maps`."""
    return _attention_jit(state.apply_fn, state.params, images)
