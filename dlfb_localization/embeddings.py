"""From a trained model to frame, protein and localization embeddings (no plotting).

A frame is summarised two ways: its codebook-usage histogram (how many of its
latent positions chose each code, the chapter's "feature spectrum") and the mean
of its quantized vectors. Proteins and localizations are averages of those
(`proteins`, re-exported here).
It imports neither matplotlib nor UMAP, so `evaluate` and `export` use it;
`inspect.embeddings.utils` re-exports it under the chapter's import path.
The batching is `inference.map_frames`'s. The codebook's health over a split
(`compute_codebook_health`) is here too, below both `evaluate` and the figure
that reports it (`inspect.codebook`).
"""

import functools
from collections.abc import Mapping

import jax
import numpy as np
from flax.training.train_state import TrainState

from dlfb_localization.dataset import Dataset
from dlfb_localization.inference import iterate_inference_batches, map_frames
from dlfb_localization.model.quantizer import count_codes
from dlfb_localization.proteins import (
    aggregate_by_protein,
    aggregate_localizations,
    aggregate_proteins,
    frame_protein_ids,
    frame_rows,
    label_tables,
    protein_localization_sets,
    protein_localizations,
)
from dlfb_localization.spectra import cluster_feature_spectrums, correlate_codes

__all__ = [
    "EMBEDDING_KINDS",
    "aggregate_by_protein",
    "aggregate_localizations",
    "aggregate_proteins",
    "cluster_feature_spectrums",
    "compute_codebook_health",
    "correlate_codes",
    "count_codes",
    "embedding_metric",
    "frame_protein_ids",
    "frame_rows",
    "get_frame_embeddings",
    "histogram_levels",
    "iterate_inference_batches",  # from `inference`; documented here first
    "label_tables",
    "named_embeddings",
    "named_features",
    "protein_localization_sets",
    "protein_localizations",
]


def _summarise_frames(model, images: jax.Array) -> dict[str, jax.Array]:
    """The model's per-frame embeddings (`summarise_frames`), as a method."""
    return model.summarise_frames(images)


# Jitted over (apply_fn, params) rather than the whole TrainState: the
# optimizer is a static field of the state, so a state carrying another optax
# object (e.g. restored with a new one) would otherwise compile again.
@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(apply_fn, params, images: jax.Array) -> dict[str, jax.Array]:
    return apply_fn({"params": params}, images, method=_summarise_frames)


def hellinger_features(histograms: np.ndarray) -> np.ndarray:
    """Square roots of each row divided by its sum (float64): Euclidean
    distance between these is the Hellinger distance between the rows' code-use
    distributions (up to a factor of sqrt 2). An all-zero row stays zero.

    Raises:
      ValueError: a negative entry (not a histogram).
    """
    histograms = np.asarray(histograms, np.float64)
    if np.any(histograms < 0):
        raise ValueError("the Hellinger distance needs non-negative histograms")
    totals = histograms.sum(axis=-1, keepdims=True)
    return np.sqrt(histograms / np.where(totals > 0, totals, 1.0))


def compute_codebook_health(code_counts: np.ndarray) -> dict[str, float]:
    """Perplexity, used fraction and largest share of codebook usage.

    The definitions of `model.compute_code_usage`, applied to counts summed over
    a whole split rather than one batch (so the split's perplexity is at least
    any batch's). That one is traced in the training step, in float32 and with
    an epsilon in the logarithm; this one is exact, in float64, on the host.

    Args:
      code_counts: `[K]` how often each code was chosen (e.g. the column sums of
        `frame_histograms`).

    Returns:
      `{"perplexity"` (exp of the usage entropy, in `[1, K]`), `"used_fraction"`
      (codes chosen at least once), `"max_share"` (share of the busiest code),
      `"num_embeddings"}`.
    """
    counts = np.asarray(code_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.sum() <= 0:
        raise ValueError("code_counts must be a [K] vector with a positive sum")
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    return {
        "perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero)))),
        "used_fraction": float(np.mean(counts > 0)),
        "max_share": float(probs.max()),
        "num_embeddings": len(counts),
    }


# What each per-frame embedding a model's `summarise_frames` returns is called
# in evaluations, and the distance it is compared with. Histograms: Hellinger,
# the Euclidean distance between the square roots of the code-use
# distributions (`hellinger_features`); mean quantized vectors are continuous
# features whose magnitudes mean something: Euclidean, as for a ViT's
# attention-pooled tokens. A level's embeddings carry its suffix
# (`frame_histograms_global`); the finest level's carry none.
EMBEDDING_KINDS = {
    "frame_histograms": ("codebook_histogram", "hellinger"),
    "frame_vectors": ("mean_quantized", "euclidean"),
    "frame_pooled": ("attention_pooled", "euclidean"),
}


def named_embeddings(keys) -> dict[str, str]:
    """`{evaluation name: embedding key}` of the per-frame embeddings among
    `keys`, finest level first: `frame_histograms` is "codebook_histogram",
    `frame_vectors_global` is "global_mean_quantized"."""
    found = {}
    for key in keys:
        for position, (base, (kind, _)) in enumerate(EMBEDDING_KINDS.items()):
            if key == base or key.startswith(base + "_"):
                level = key[len(base) + 1 :]
                name = f"{level}_{kind}" if level else kind
                found[(level != "", level, position)] = (name, key)
    return dict(found[order] for order in sorted(found))


def named_features(embeddings: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`{evaluation name: [n, d] float32}` of the per-frame embeddings of
    `get_frame_embeddings`'s result, named as `named_embeddings` names them:
    what `evaluate.score_localization` takes."""
    return {
        name: np.asarray(embeddings[key], dtype=np.float32)
        for name, key in named_embeddings(embeddings).items()
    }


def histogram_levels(keys) -> dict[str, str]:
    """`{level suffix: key}` of the code-use histograms among `keys`, finest
    level first: `{"": "frame_histograms", "_global": "frame_histograms_global"}`
    for a `CytoselfModel`'s embeddings."""
    base = "frame_histograms"
    return {
        key.removeprefix(base): key
        for key in named_embeddings(keys).values()
        if key.startswith(base)
    }


def embedding_metric(name: str) -> str:
    """The distance an evaluation name (`named_embeddings`) is compared with."""
    for kind, metric in EMBEDDING_KINDS.values():
        if name == kind or name.endswith("_" + kind):
            return metric
    raise KeyError(f"{name!r} is not a per-frame embedding's name")


def get_frame_embeddings(
    state: TrainState, dataset_split: Dataset, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Codebook-usage histogram and mean quantized vector of every frame.

    Every frame of the split comes back exactly once, in frame-id order (the
    batches are neither shuffled nor truncated). The counting and averaging run
    on the device in the same jitted call as the encoder.

    Args:
      state: `TrainState` of a `LocalizationModel` or `CytoselfModel` (trained
        or fresh).
      dataset_split: the frames to embed.
      batch_size: frames per device call (memory, not results, depends on it).

    Returns:
      `{"frame_ids": [n] int64, "frame_histograms": [n, K] int32,
      "frame_vectors": [n, D] float32}`. Histogram rows sum to the latent grid's
      `h * w` (625 for 100x100 crops). For a `CytoselfModel` these are the
      local level's, and `frame_histograms_global` and `frame_vectors_global`
      hold the global level's (rows sum to `4 * 4 * 9` positions).
    """
    outputs = map_frames(
        functools.partial(_embed_batch, state.apply_fn, state.params),
        dataset_split,
        batch_size,
    )
    embeddings = {"frame_ids": dataset_split.labels.frame_ids.astype(np.int64)}
    for name, values in sorted(outputs.items()):
        dtype = np.int32 if name.startswith("frame_histograms") else np.float32
        embeddings[name] = values.astype(dtype)
    return embeddings
