"""From a trained model to frame, protein and localization embeddings (no plotting).

A frame is summarised two ways: its codebook-usage histogram (how many of its
latent positions chose each code, the chapter's "feature spectrum") and the mean
of its quantized vectors. Proteins and localizations are averages of those.
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
import pandas as pd
from flax.training.train_state import TrainState

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.localizations import (
    GRADE_COLUMNS,
    LOCALIZATIONS_OF_INTEREST,
    frame_localizations,
)
from dlfb_localization.inference import iterate_inference_batches, map_frames
from dlfb_localization.model.quantizer import count_codes
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


def frame_protein_ids(dataset_split: Dataset, frame_ids: np.ndarray) -> np.ndarray:
    """The protein id of each frame.

    Args:
      dataset_split: the split the frames belong to.
      frame_ids: `[n]` frame ids of the split, in any order.

    Returns:
      `[n]` int64 protein ids.

    Raises:
      ValueError: a frame id is not in the split.
    """
    protein_ids = dataset_split.labels.lookup["protein_id"].to_numpy(np.int64)
    return protein_ids[frame_rows(dataset_split, frame_ids)]


def frame_rows(dataset_split: Dataset, frame_ids: np.ndarray) -> np.ndarray:
    """Row of each frame id in the split's label table (sorted by frame id).

    Args:
      dataset_split: the split.
      frame_ids: `[n]` frame ids of the split, in any order.

    Returns:
      `[n]` int rows into `dataset_split.labels.lookup` (and into per-frame arrays
      such as `labels.localizations()`).

    Raises:
      ValueError: a frame id is not in the split.
    """
    frame_ids = np.asarray(frame_ids, dtype=np.int64)
    known = dataset_split.labels.frame_ids
    if len(known) == 0:
        raise ValueError("the split has no frames")
    rows = np.searchsorted(known, frame_ids)
    rows = np.minimum(rows, len(known) - 1)
    missing = known[rows] != frame_ids
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} frame id(s) are not in this split, e.g. "
            f"{frame_ids[missing][:5].tolist()}; were the embeddings computed on "
            "another split?"
        )
    return rows


_LABEL_COLUMNS = ("ensg", "name", "loc_grade1", "loc_grade2", "loc_grade3")


def label_tables(
    dataset_split: Dataset, frame_ids: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The labels of some frames, one row per frame and one per protein.

    Args:
      dataset_split: the split the frames belong to.
      frame_ids: `[n]` frame ids of the split, in any order.

    Returns:
      `(frames, proteins)`. `frames`: one row per frame id, in their order,
      with `frame_id`, `protein_id`, `ensg`, `name`, `loc_grade1..3` (text,
      "" where empty), `fov_id` and `predominant_localization` (any
      annotated name, "" if none). `proteins`: one row per protein of those
      frames, ascending by id like `aggregate_by_protein`'s, with the same
      label columns and `n_frames` (how many of the frames are its).
    """
    frame_ids = np.asarray(frame_ids, dtype=np.int64)
    rows = frame_rows(dataset_split, frame_ids)
    lookup = dataset_split.labels.lookup.iloc[rows].reset_index(drop=True)
    predominant = dataset_split.labels.localizations("predominant", restrict=False)
    frame_localization = np.asarray([str(v) for v in predominant[rows]], dtype=str)
    frame_proteins = lookup["protein_id"].to_numpy(np.int64)
    frames = pd.DataFrame(
        {
            "frame_id": frame_ids,
            "protein_id": frame_proteins,
            **{column: lookup[column].astype(str) for column in _LABEL_COLUMNS},
            "fov_id": lookup["fov_id"].to_numpy(np.int64),
            "predominant_localization": frame_localization,
        }
    )
    # Sorted by protein id; labels are per protein, so any frame's will do.
    protein_ids, first, n_frames = np.unique(
        frame_proteins, return_index=True, return_counts=True
    )
    proteins = pd.DataFrame(
        {
            "protein_id": protein_ids,
            **{
                column: frames[column].to_numpy()[first]
                for column in (*_LABEL_COLUMNS, "predominant_localization")
            },
            "n_frames": n_frames.astype(np.int64),
        }
    )
    return frames, proteins


def aggregate_by_protein(
    dataset_split: Dataset, frame_ids: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of per-frame values over each protein's frames.

    Args:
      dataset_split: the split the frames belong to.
      frame_ids: `[n]` frame ids.
      values: `[n, ...]` per-frame values aligned with `frame_ids`.

    Returns:
      `(protein_ids, means)`: `[p]` int64 ascending protein ids and `[p, ...]`
      float32 means.
    """
    values = np.asarray(values)
    if len(values) != len(frame_ids):
        raise ValueError(
            f"{len(values)} values for {len(frame_ids)} frame ids; they must align"
        )
    protein_of_frame = frame_protein_ids(dataset_split, frame_ids)
    protein_ids, group = np.unique(protein_of_frame, return_inverse=True)
    sums = np.zeros((len(protein_ids), *values.shape[1:]), dtype=np.float64)
    np.add.at(sums, group, values)
    counts = np.bincount(group, minlength=len(protein_ids))
    counts = counts.reshape(-1, *([1] * (values.ndim - 1)))
    return protein_ids.astype(np.int64), (sums / counts).astype(np.float32)


def aggregate_proteins(
    dataset_split: Dataset,
    frame_ids: np.ndarray,
    frame_histograms: np.ndarray,
    frame_vectors: np.ndarray | None = None,
    **other_embeddings: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Each protein's feature spectrum: the mean histogram of its frames.

    Histograms are averaged, not summed: proteins have different numbers of
    frames, and a sum would make a protein with many frames look like a heavy
    user of every code, so correlations across proteins would mostly measure
    frame counts. The mean is the expected usage per frame, comparable across
    proteins, and still sums to `h * w`.

    Args:
      dataset_split: the split the frames belong to.
      frame_ids: `[n]` frame ids.
      frame_histograms: `[n, K]` per-frame code counts.
      frame_vectors: ignored; accepted so that `**get_frame_embeddings(...)` can
        be passed as in the chapter. `aggregate_by_protein` averages vectors.
      **other_embeddings: ignored, for the same reason: a `CytoselfModel`'s
        global level (`frame_histograms_global`, …). For that level's spectra
        pass `frame_histograms=embeddings["frame_histograms_global"]`.

    Returns:
      `(protein_ids, protein_histograms)`: `[p]` int64 ascending and `[p, K]`
      float32.
    """
    del frame_vectors, other_embeddings  # see Args
    return aggregate_by_protein(dataset_split, frame_ids, frame_histograms)


def protein_localizations(
    dataset_split: Dataset,
    protein_ids: np.ndarray,
    mode: str = "predominant",
    *,
    restrict: bool = True,
) -> np.ndarray:
    """One localization per protein, "" where there is none (see `Labels`).

    Args:
      dataset_split: the split the proteins belong to.
      protein_ids: `[p]` protein ids.
      mode: "predominant" (the first name of the highest annotated grade) or
        "single" (only proteins annotated with exactly one localization).
      restrict: keep only the nine localizations the chapter colours.

    Returns:
      `[p]` string array.
    """
    per_frame = dataset_split.labels.localizations(mode, restrict=restrict)
    rows = _protein_rows(dataset_split, protein_ids)
    return np.array([per_frame[row] for row in rows], dtype=str).reshape(len(rows))


def protein_localization_sets(
    dataset_split: Dataset,
    protein_ids: np.ndarray,
    columns: tuple[str, ...] = GRADE_COLUMNS[:2],
) -> list[list[str]]:
    """Every localization of each protein in the given grades, without repeats.

    The multi-label counterpart of `protein_localizations`: a protein annotated
    "er" in grade 1 and "golgi;vesicles" in grade 2 has all three.

    Args:
      dataset_split: the split the proteins belong to.
      protein_ids: `[p]` protein ids.
      columns: the grade columns read (default grades 1 and 2).

    Returns:
      `p` lists of names, grade 1's first; `[]` for an unannotated protein.
    """
    rows = _protein_rows(dataset_split, protein_ids)
    lookup = dataset_split.labels.lookup.iloc[rows]
    return frame_localizations(lookup, columns)


def _protein_rows(dataset_split: Dataset, protein_ids: np.ndarray) -> list[int]:
    """Row of each protein's first frame in the split's label table (a
    protein's annotations are the same on all its frames)."""
    lookup = dataset_split.labels.lookup
    first_row = dict(
        zip(*np.unique(lookup["protein_id"].to_numpy(), return_index=True), strict=True)
    )
    protein_ids = np.asarray(protein_ids)
    missing = [int(p) for p in protein_ids if p not in first_row]
    if missing:
        raise ValueError(f"protein id(s) {missing[:5]} are not in this split")
    return [first_row[p] for p in protein_ids.tolist()]


def aggregate_localizations(
    dataset_split: Dataset,
    protein_ids: np.ndarray,
    protein_histograms: np.ndarray,
    *,
    mode: str = "single",
) -> tuple[list[str], np.ndarray]:
    """Mean feature spectrum of the proteins of each localization of interest.

    As in the chapter, a protein counts for a localization only if that is its
    one annotated localization (`mode="single"`), so mixed proteins do not blur
    the spectra; `mode="predominant"` uses each protein's main localization.

    Args:
      dataset_split: the split the proteins belong to.
      protein_ids: `[p]` protein ids (from `aggregate_proteins`).
      protein_histograms: `[p, K]` their spectra.
      mode: "single" or "predominant".

    Returns:
      `(localizations, localization_histograms)`: the names among the nine that
      have at least one protein, in `LOCALIZATIONS_OF_INTEREST` order, and their
      `[len(localizations), K]` float32 mean spectra.
    """
    protein_histograms = np.asarray(protein_histograms)
    if len(protein_histograms) != len(protein_ids):
        raise ValueError(
            f"{len(protein_histograms)} histograms for {len(protein_ids)} proteins"
        )
    names = protein_localizations(dataset_split, protein_ids, mode)
    localizations = [loc for loc in LOCALIZATIONS_OF_INTEREST if (names == loc).any()]
    if not localizations:
        raise ValueError(
            f"no protein of this split has a {mode!r} localization among "
            f"{LOCALIZATIONS_OF_INTEREST}"
        )
    histograms = np.stack(
        [protein_histograms[names == loc].mean(axis=0) for loc in localizations]
    )
    return localizations, histograms.astype(np.float32)
