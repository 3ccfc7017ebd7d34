"""How much a model's frame embeddings move when a crop is turned or flipped.

`invariance_score` compares, for the per-frame embeddings the evaluation uses
(`dlfb_localization.embeddings`: the codebook-usage histogram and the mean
quantized vector), the distance between a crop and its turned copies with the
distance between two different crops: 0 means the embedding ignores the
orientation, about 1 that turning a crop moves it as far as swapping it for a
random other crop. `orbit_pooled_embeddings` removes the orientation after the
fact, by averaging a frame's embeddings over its 8 D4 transforms.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from dlfb_localization.dataset import Dataset
from dlfb_localization.embeddings import EMBEDDING_KINDS, hellinger_features
from dlfb_localization.inference import map_frames
from dlfb_localization.orientation import D4_ORDER, d4_orbit, rotate

__all__ = [
    "DEFAULT_ANGLES",
    "EMBEDDING_METRICS",
    "invariance_score",
    "orbit_pooled_embeddings",
]

# The distance each embedding is compared with, as in the k-NN: the VQ-VAE's
# two, in the order `_summarise` returns them.
EMBEDDING_METRICS = dict(
    EMBEDDING_KINDS[key] for key in ("frame_histograms", "frame_vectors")
)
# Angles that no pixel permutation reaches.
DEFAULT_ANGLES = (15.0, 30.0, 45.0, 60.0)


def _summarise(model, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A model method: what `get_frame_embeddings` computes, the code
    histograms `[b, K]` and mean quantized vectors `[b, D]` (a `CytoselfModel`'s
    local level)."""
    summary = model.summarise_frames(images)
    return summary["frame_histograms"].astype(jnp.float32), summary["frame_vectors"]


# Jitted over (apply_fn, params), as in `embeddings`: a state with another
# optimizer object does not compile again.
@functools.partial(jax.jit, static_argnums=0)
def _embed_orbit(apply_fn, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embeddings of the 8 D4 transforms: `[b, 8, K]` and `[b, 8, D]` (frames
    first, for `map_frames`; entry 0 of the second axis is the frame itself).

    `lax.map` runs the transforms one after another, so memory holds one
    batch's activations, not eight."""
    orbit = jax.lax.map(
        lambda x: apply_fn({"params": params}, x, method=_summarise),
        d4_orbit(images),
    )
    return jax.tree.map(lambda values: jnp.moveaxis(values, 0, 1), orbit)


@functools.partial(jax.jit, static_argnums=0)
def _embed_rotated(
    apply_fn, params, images: jax.Array, angle: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Embeddings of the batch turned by `angle` degrees (see `rotate`)."""
    return apply_fn({"params": params}, rotate(images, angle), method=_summarise)


def _paired_distances(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise distances between `[n, d]` arrays (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if metric == "hellinger":
        a, b, metric = hellinger_features(a), hellinger_features(b), "euclidean"
    if metric == "euclidean":
        return np.linalg.norm(a - b, axis=-1)
    if metric == "cosine":
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        return 1.0 - np.sum(a * b, axis=-1) / np.maximum(norms, 1e-300)
    raise ValueError(f"unknown metric {metric!r}")


def invariance_score(
    state: TrainState,
    images: np.ndarray,
    *,
    angles: Sequence[float] = DEFAULT_ANGLES,
    num_pairs: int = 2000,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, dict]:
    """Orientation sensitivity of a model's frame embeddings, relative to the
    spread between crops.

    For each embedding (codebook histogram, cosine distance; mean quantized
    vector, Euclidean distance: the distances of the protein-level k-NN), the
    mean distance between a crop's embedding and that of its transformed copy,
    over crops, divided by the mean distance between the embeddings of random
    pairs of different crops. D4 copies (the 7 non-identity elements of
    `d4_transform`) are exact pixel permutations; copies turned by `angles`
    are interpolated (`rotate`: bilinear, mirrored corners), so even a
    perfectly invariant model does not score 0 on them.

    Args:
      state: `TrainState` of a `LocalizationModel`.
      images: `[n, h, h, c]` square crops, n >= 2 (a few hundred suffice).
      angles: arbitrary angles in degrees, each scored separately.
      num_pairs: random pairs `(i, j)`, `i != j`, for the denominator.
      seed: seeds the pairs (a NumPy generator).
      batch_size: crops per device call.

    Returns:
      `{embedding: {"d4": float, "d4_elements": {"1": float, ..., "7": float},
      "angles": {"15": float, ...}, "pair_distance": float}}` for embeddings
      "codebook_histogram" and "mean_quantized"; "d4" is the mean over the 7
      elements, and every score is a mean distance divided by
      "pair_distance", the mean distance between random pairs.
    """
    images = np.asarray(images)
    n = len(images)
    if n < 2:
        raise ValueError(f"need at least 2 crops to form pairs, got {n}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    # ([n, 8, K], [n, 8, D]) and, per angle, ([n, K], [n, D]).
    orbit = map_frames(
        functools.partial(_embed_orbit, state.apply_fn, state.params),
        images,
        batch_size,
    )
    turned = {
        angle: map_frames(
            lambda batch, angle=angle: _embed_rotated(
                state.apply_fn, state.params, batch, angle
            ),
            images,
            batch_size,
        )
        for angle in map(float, angles)
    }

    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, num_pairs)
    second = (first + rng.integers(1, n, num_pairs)) % n  # never equal to first
    report = {}
    for position, (name, metric) in enumerate(EMBEDDING_METRICS.items()):
        # [n, 8, d]: entry 0 is the crop itself.
        embeddings = orbit[position]
        original = embeddings[:, 0]
        pair_distance = float(
            np.mean(_paired_distances(original[first], original[second], metric))
        )

        def relative(
            moved: np.ndarray, metric=metric, original=original, scale=pair_distance
        ) -> float:
            distance = np.mean(_paired_distances(original, moved, metric))
            return float(distance / scale)

        elements = {str(k): relative(embeddings[:, k]) for k in range(1, D4_ORDER)}
        report[name] = {
            "d4": float(np.mean(list(elements.values()))),
            "d4_elements": elements,
            "angles": {
                f"{angle:g}": relative(values[position])
                for angle, values in turned.items()
            },
            "pair_distance": pair_distance,
        }
    return report


def orbit_pooled_embeddings(
    state: TrainState, dataset_split: Dataset, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """`get_frame_embeddings`, averaged over each frame's 8 D4 transforms.

    The mean over the orbit is the same for a crop and for any of its quarter
    turns or mirror images (they have the same orbit), so these embeddings
    are exactly invariant to D4 whatever the model; the 8 transforms run in
    one jitted call per batch.

    Args:
      state: `TrainState` of a `LocalizationModel`.
      dataset_split: the frames (square crops).
      batch_size: frames per device call (8 transforms each, run in turn).

    Returns:
      `{"frame_ids": [n] int64, "frame_histograms": [n, K] float32,
      "frame_vectors": [n, D] float32}` in frame-id order, as
      `get_frame_embeddings`; the histograms are means of 8 counts, so no longer
      integers (rows still sum to the latent grid's `h * w`).
    """
    histograms, vectors = map_frames(
        functools.partial(_embed_orbit, state.apply_fn, state.params),
        dataset_split,
        batch_size,
    )
    return {
        "frame_ids": dataset_split.labels.frame_ids.astype(np.int64),
        "frame_histograms": histograms.mean(axis=1).astype(np.float32),
        "frame_vectors": vectors.mean(axis=1).astype(np.float32),
    }
