"""Inference over every frame, in fixed-shape batches and frame-id order.

`map_frames` runs a function (a jitted model call) over all frames of a split
or of an in-memory image array and returns its per-frame results, unpadded and
concatenated on the host. Embeddings (`embeddings`), the reconstruction error
(`evaluate`), the invariance score (`invariance.score`) and the nucleus models'
predictions (`nucleus.evaluate`) all run through it. `reconstruct` is a model's
reconstruction of one batch, for figures and the reconstruction error;
`attention_maps` and `mae_reconstructions` are a ViT's pooling weights and
masked-autoencoder predictions of one batch, for figures.

It imports neither plotting nor evaluation code.
"""

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from dlfb_localization.dataset import Dataset
from dlfb_localization.model.interface import AUGMENT_STREAM, model_of
from dlfb_localization.model.vit.layers import patchify, unpatchify
from dlfb_localization.model.vit.mae import denormalise_patches
from dlfb_localization.model.vq_family import prepare_images, restore_images

__all__ = [
    "MAEReconstruction",
    "attention_maps",
    "can_reconstruct",
    "has_attention_maps",
    "iterate_inference_batches",
    "mae_reconstructions",
    "map_frames",
    "reconstruct",
    "reconstructs_masked_patches",
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


class MAEReconstruction(NamedTuple):
    """A masked autoencoder's view of a batch.

    Attributes:
      reconstructions: `[b, h, w, c]` float32 on the images' scale: the
        images' own pixels at the kept patches, the decoder's predictions at
        the masked ones.
      mask: `[b, h / p, w / p]` bool patch grid, True at masked patches.
    """

    reconstructions: jax.Array
    mask: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _mae_jit(
    apply_fn, patch_size: int, standardize: bool, params, images: jax.Array, rng
) -> MAEReconstruction:
    outputs = apply_fn(
        {"params": params},
        images,
        is_training=False,
        rngs={AUGMENT_STREAM: rng},
        method="compute_outputs",
    )
    # With a contrastive task there are two copies of each crop, masked apart:
    # the first is enough.
    b, h, w = images.shape[:3]
    grid = (h // patch_size, w // patch_size)
    masked = outputs.mask[:b] > 0
    # The decoder predicted each patch of the standardised crop standardised
    # on its own (`normalise_patches`): back to the crop's standardised scale
    # with that patch's moments, then to the images' scale.
    view = prepare_images(images.astype(jnp.float32), standardize)
    predicted = denormalise_patches(outputs.predictions[:b], patchify(view, patch_size))
    predicted = restore_images(
        unpatchify(predicted, patch_size, grid), images, standardize
    )
    hidden = jnp.repeat(
        jnp.repeat(masked.reshape(b, *grid), patch_size, 1), patch_size, 2
    )
    reconstructions = jnp.where(hidden[..., None], predicted, images)
    return MAEReconstruction(reconstructions, masked.reshape(b, *grid))


def reconstructs_masked_patches(state: TrainState) -> bool:
    """Whether the state's model is a masked autoencoder: a ViT whose
    objective reconstructs (`Objective.reconstructs`)."""
    objective = getattr(model_of(state), "objective", None)
    return bool(getattr(objective, "reconstructs", False))


def mae_reconstructions(
    state: TrainState, images: jax.Array, rng: jax.Array | int = 0
) -> MAEReconstruction:
    """A ViT's masked-autoencoder reconstruction of `[b, h, w, c]` images.

    As at evaluation (no augmentation), each image loses a random share of its
    patches, the model's mask ratio, and the decoder predicts them from the
    rest. Its predictions are of per-patch standardised targets, so each is
    put back with the moments of the patch it replaces (MAE's figures); the
    kept patches are the images' own.

    Args:
      state: `TrainState` of a model that reconstructs masked patches
        (`reconstructs_masked_patches`).
      images: `[b, h, w, c]` float32 crops.
      rng: JAX key or int seed of the masks (default 0: the same masks every
        call).

    Returns:
      `MAEReconstruction` (reconstructions and the mask on the patch grid).

    Raises:
      ValueError: the model does not reconstruct masked patches.
    """
    if not reconstructs_masked_patches(state):
        raise ValueError(
            "the model does not reconstruct masked patches (a ViT whose objective "
            "reconstructs, e.g. 'mae' or 'subcell')"
        )
    model = model_of(state)
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    return _mae_jit(
        state.apply_fn,
        model.patch_size,
        model.standardize_inputs,
        state.params,
        jnp.asarray(images, jnp.float32),
        rng,
    )
