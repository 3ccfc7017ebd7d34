"""Numbers for a model: localization k-NN, cluster score, codebook health, MSE.

The chapter judges its models by looking at UMAPs and feature spectra. This
module puts numbers beside those pictures, each with a baseline next to it:

- Localization k-NN (accuracy and macro-F1) of frame and protein embeddings,
  for the codebook-usage histograms, the mean quantized vectors and a raw-pixel
  PCA baseline, plus the majority-class rate (chance).
- A multi-label localization probe (macro-F1 and macro average precision of a
  cross-validated linear model) on the same protein embeddings, beside the
  chance average precision.
- cytoself's cluster score (Kobayashi et al. 2022) on a 2-D UMAP of each frame
  embedding.
- Codebook health over the split (perplexity, fraction of codes used, largest
  code's share) and the reconstruction MSE.

The evaluators on arrays (`localization.score_localization`, k-NN and the
probe of named embeddings; `scoring`: `predict_knn`, `score_knn`,
`score_majority`, `knn_accuracy_ceiling`, `compute_cluster_score`;
`probe`: `probe_targets`, `score_probe`; and
`embeddings.compute_codebook_health`) know nothing of models and are
re-exported here; `evaluate` composes them. An untrained model
is evaluated the same way, `evaluate(fresh_state, split)`, which gives the floor
a trained model must beat.
"""

import copy
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Mapping

import numpy as np
import pandas as pd
from flax.training.train_state import TrainState
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from dlfb_localization.dataset import Dataset
from dlfb_localization.embeddings import (
    compute_codebook_health,
    get_frame_embeddings,
    histogram_levels,
    named_features,
)
from dlfb_localization.files import write_json
from dlfb_localization.inference import (
    can_reconstruct,
    map_frames,
    reconstruct,
    squared_errors,
)
from dlfb_localization.localization import (
    EMBEDDING_METRICS,
    LABEL_SETS,
    finite_or_none,
    metric_of,
    score_localization,
)
from dlfb_localization.probe import (
    PROBE_C,
    PROBE_FOLDS,
    probe_targets,
    score_probe,
)
from dlfb_localization.projection import UMAP_MIN_DIST, UMAP_NEIGHBORS, project_2d
from dlfb_localization.scoring import (
    compute_cluster_score,
    knn_accuracy_ceiling,
    predict_knn,
    score_knn,
    score_majority,
    to_metric_space,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_METRICS",
    "LABEL_SETS",
    "compute_cluster_score",
    "compute_codebook_health",
    "compute_pixel_pca",
    "compute_reconstruction_mse",
    "evaluate",
    "knn_accuracy_ceiling",
    "predict_knn",
    "probe_targets",
    "reconstruct",
    "score_knn",
    "score_localization",
    "score_majority",
    "score_probe",
]

PCA_COMPONENTS = 64
# PCA is fitted on at most this many frames of the split (a seeded sample), so
# the baseline's memory stays bounded on the full data set; all frames are
# projected.
PCA_MAX_FIT_FRAMES = 20_000
# Below this many frames a 2-D UMAP means nothing; the cluster score is None.
_UMAP_MIN_FRAMES = 5


def compute_reconstruction_mse(
    state: TrainState, dataset_split: Dataset, batch_size: int = 256
) -> float:
    """Mean squared error over every pixel of every frame of the split.

    Measured on the images' own scale (`reconstruct`), so models with and
    without input standardization compare; for a model without it, this is the
    training `recon_loss` over the whole split instead of one batch.
    """
    errors = map_frames(
        functools.partial(squared_errors, state), dataset_split, batch_size
    )
    # Summed in float64 one device batch at a time, as the frames were
    # computed: the float sums' order, and so the last bits, depend on it.
    batch_size = min(batch_size, len(errors))
    total = 0.0
    for start in range(0, len(errors), batch_size):
        total += float(errors[start : start + batch_size].astype(np.float64).sum())
    return total / (len(errors) * int(np.prod(dataset_split.image_shape)))


# Frames per PCA projection chunk, whatever the caller's batch size.
_PCA_CHUNK = 256


def compute_pixel_pca(
    dataset_split: Dataset,
    *,
    n_components: int = PCA_COMPONENTS,
    random_state: int = 0,
    max_fit_frames: int = PCA_MAX_FIT_FRAMES,
) -> dict[str, np.ndarray]:
    """The raw-pixel baseline: PCA scores of the flattened frames.

    Frames are projected in chunks of a fixed size (`_PCA_CHUNK`): a BLAS
    matrix product's float order depends on its shape, so chunks that followed
    the caller's batch size would change the scores' last bits with it, and the
    UMAP of the scores (which amplifies any difference) with them.

    Args:
      dataset_split: the frames; PCA is fitted on them (at most `max_fit_frames`
        of them, sampled with `random_state`) and projects all of them.
      n_components: at most this many components (fewer if the data has fewer).
      random_state: seeds the fitting sample and scikit-learn's solver.
      max_fit_frames: cap on the frames held in memory for fitting.

    Returns:
      `{"frame_ids": [n] int64, "features": [n, n_components] float32}` in
      frame-id order.
    """
    frame_ids = dataset_split.labels.frame_ids
    n = len(frame_ids)
    generator = np.random.default_rng(random_state)
    fit_ids = np.sort(
        generator.choice(frame_ids, size=min(n, max_fit_frames), replace=False)
    )
    fit_images = dataset_split.images.frames[fit_ids].reshape(len(fit_ids), -1)
    n_components = min(n_components, *fit_images.shape)
    pca = PCA(n_components=n_components, random_state=random_state)
    pca.fit(fit_images.astype(np.float32))
    frames = dataset_split.images.frames
    features = [
        pca.transform(np.asarray(frames[ids], np.float32).reshape(len(ids), -1))
        for ids in np.array_split(frame_ids, max(1, -(-n // _PCA_CHUNK)))
    ]
    return {
        "frame_ids": frame_ids.astype(np.int64),
        "features": np.concatenate(features).astype(np.float32),
    }


def evaluate(
    state: TrainState,
    dataset_split: Dataset,
    *,
    k: int = 5,
    random_state: int = 0,
    batch_size: int = 256,
    out_path: str | os.PathLike | None = None,
    progress: bool = False,
    frame_embeddings: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Localization k-NN, cluster score, codebook health and MSE of one split.

    Labels. A frame's label is its protein's predominant localization (the first
    name of its highest annotated grade, `loc_grade1` whenever it is filled);
    frames of unannotated proteins are left out. Three label sets are scored
    (`LABEL_SETS`): "all" (every annotated localization is a class), "nine"
    (only the chapter's nine localizations of interest, other frames left out)
    and "single" (only proteins annotated with exactly one localization: for a
    protein with two, its "predominant" one is a judgement between them that
    no embedding can be expected to make).

    k-NN. Frame level: leave-one-protein-out, i.e. a frame's neighbours come
    only from other proteins (frames of the same protein, even from other fields
    of view, share its identity, and would make the score measure protein
    identity). Protein level: each protein's mean embedding, leave-one-out (a
    protein never neighbours itself). Distances are `EMBEDDING_METRICS`.
    Embeddings: "codebook_histogram" (the chapter's), "mean_quantized", and
    "pixels_pca" (PCA of the raw frames, the baseline); "majority_class" is
    chance. For a `CytoselfModel` the first two are the local level's, and
    "global_codebook_histogram" and "global_mean_quantized" the global level's.
    A class held by a single protein of the split cannot be predicted
    without that protein, so `labels[label_set]` gives each level's
    `accuracy_ceiling` (`knn_accuracy_ceiling`); on small splits it is far
    below 1.

    Probe. On the same protein embeddings (each protein's mean over its
    frames), a multi-label probe (`probe_targets`, `score_probe`): the targets
    are all of a protein's grade-1 and grade-2 localizations, one binary target
    each, whether or not among the nine; unannotated proteins are left out, and
    so is a localization whose proteins (or all the others) fall within one
    cross-validation fold. Standardized features, one L2 logistic regression
    per localization (balanced class weights, `PROBE_C`), 5-fold
    cross-validation over proteins (fewer folds on fewer than 10 annotated
    proteins); macro-F1 and macro average precision of the out-of-fold
    predictions, beside chance average precision (the localizations' mean
    prevalence).

    Cluster score: `compute_cluster_score` on a seeded 2-D UMAP of all frames of
    the split for each embedding (same distance as its k-NN), over the frames
    whose predominant ("predominant") or only ("single") localization is one of
    the nine.

    Everything is deterministic given `random_state`. On a CPU, a split of tens
    of thousands of frames takes minutes, mostly the three UMAPs. The raw-pixel
    baseline does not depend on the model: a process evaluating several models
    on one split computes it for the first and reuses it for the others.

    Args:
      state: `TrainState` of a `LocalizationModel` or `CytoselfModel`; a
        fresh one gives the untrained floor.
      dataset_split: the frames to evaluate (e.g. "valid").
      k: neighbours in k-NN votes.
      random_state: seeds PCA's fitting sample and solver, UMAP and the
        probe's folds.
      batch_size: frames per device call.
      out_path: if given, the result is also written there as JSON (through a
        temporary file that is renamed into place).
      progress: show a progress bar over the stages (embeddings, PCA, k-NN,
        probe, one UMAP per embedding, reconstructions).
      frame_embeddings: `get_frame_embeddings(state, dataset_split)`, if the
        caller already has it (it is computed otherwise).

    Returns:
      A JSON-ready dict: `n_frames`, `n_proteins`, `settings`,
      `labels[label_set]` (class and sample counts, accuracy ceilings),
      `knn[level][label_set][embedding]` = `{"accuracy", "macro_f1"}` (None if
      fewer than two classes) with level "frame" or "protein",
      `labels["probe"]` (`ProbeTargets.summary`: proteins, folds, the
      localizations scored and excluded, chance average precision and
      macro-F1, and the `reason` when nothing can be scored),
      `probe[embedding]` = `{"macro_f1", "macro_average_precision"}` (None
      with that reason) for every embedding k-NN scores, including
      "pixels_pca",
      `cluster_score[subset][embedding]` (None where undefined), `codebook`
      (`compute_codebook_health`; `codebook_global` too for a `CytoselfModel`)
      and `reconstruction_mse` (None for a model that does not reconstruct
      images, `inference.can_reconstruct`). Only the embeddings the model
      gives are scored: a ViT's `frame_pooled`, without codebook health.
    """
    bar = tqdm(desc="evaluating", total=4, unit="stage", disable=not progress)
    bar.set_postfix_str("embeddings")
    embeddings = frame_embeddings
    if embeddings is None:
        embeddings = get_frame_embeddings(state, dataset_split, batch_size)
    bar.update()
    frame_ids = embeddings["frame_ids"]
    # The per-frame labels below are in the split's frame-id order; so are these.
    assert np.array_equal(frame_ids, dataset_split.labels.frame_ids)
    features = named_features(embeddings)
    key = _baseline_key(dataset_split, k, random_state)
    bar.total = bar.n + (key not in _PIXEL_BASELINES) * 3 + 2 + len(features)
    baseline = _pixel_baseline(dataset_split, key, k, random_state, bar)
    bar.set_postfix_str("k-NN and probe")
    localization = score_localization(
        dataset_split, features, k=k, random_state=random_state
    )
    bar.update()
    clusters = _score_clusters(dataset_split, features, random_state, bar)
    # Each embedding is scored on its own, so the baseline's scores join the
    # model's as if scored beside them, in the same order (chance last).
    for level, label_sets in localization["knn"].items():
        for label_set, scores in label_sets.items():
            scores.pop("majority_class")
            scores.update(baseline["knn"][level][label_set])
    localization["probe"].update(baseline["probe"])
    for subset, scores in clusters.items():
        scores.update(baseline["cluster_score"][subset])
    bar.set_postfix_str("reconstructions")
    mse = None  # a model that does not reconstruct images (a ViT) has none
    if can_reconstruct(state):
        mse = compute_reconstruction_mse(state, dataset_split, batch_size)
    bar.update()
    bar.close()
    result: dict = {
        "n_frames": len(frame_ids),
        "n_proteins": dataset_split.labels.get_n_proteins(),
        "settings": {
            "k": k,
            "random_state": random_state,
            "frame_neighbours": "leave-one-protein-out",
            "protein_neighbours": "leave-one-out",
            "labels": "predominant localization (first name of loc_grade1)",
            "probe": {
                "targets": "every localization in loc_grade1 and loc_grade2",
                "model": "StandardScaler, one-vs-rest L2 logistic regression, "
                "balanced class weights",
                "C": PROBE_C,
                "folds": PROBE_FOLDS,
                "threshold": 0.5,
            },
            "metrics": {name: metric_of(name) for name in [*features, "pixels_pca"]},
            "pca_components": baseline["pca_components"],
            "umap": {"n_neighbors": UMAP_NEIGHBORS, "min_dist": UMAP_MIN_DIST},
        },
        **localization,
        "cluster_score": clusters,
        **{
            f"codebook{suffix}": compute_codebook_health(embeddings[key].sum(axis=0))
            for suffix, key in histogram_levels(embeddings).items()
        },
        "reconstruction_mse": mse,
    }
    if out_path is not None:
        write_json(result, out_path)
    return result


# The raw-pixel baseline's scores by split fingerprint and settings: the
# same for every model evaluated on a split (the demo evaluates three), so
# they are computed once per process. The newest few are kept.
_PIXEL_BASELINES: dict[tuple, dict] = {}
# Evaluations in threads at the same time (the demo's) compute it once: the
# others wait for it.
_BASELINES_LOCK = threading.Lock()
_KEPT_BASELINES = 4


def _baseline_key(dataset_split: Dataset, k: int, random_state: int) -> tuple:
    """What the pixel baseline's scores depend on. The split's fingerprint
    covers its frames and their proteins, not the proteins' localizations,
    which the scores read too."""
    annotations = pd.util.hash_pandas_object(dataset_split.labels.lookup, index=False)
    return (
        dataset_split.fingerprint,
        hashlib.sha256(annotations.to_numpy().tobytes()).hexdigest(),
        k,
        random_state,
        _UMAP_MIN_FRAMES,
    )


def _pixel_baseline(
    dataset_split: Dataset, key: tuple, k: int, random_state: int, bar: tqdm
) -> dict:
    """The "pixels_pca" entries of `evaluate`'s `knn` (with "majority_class"),
    `probe` and `cluster_score`, and `pca_components`: a copy of the ones
    computed before under `key` (`_baseline_key`), else computed (the PCA,
    k-NN and probe, and a UMAP: `bar` advances by three)."""
    with _BASELINES_LOCK:
        if key not in _PIXEL_BASELINES:
            _PIXEL_BASELINES[key] = _compute_pixel_baseline(
                dataset_split, k, random_state, bar
            )
        while len(_PIXEL_BASELINES) > _KEPT_BASELINES:
            del _PIXEL_BASELINES[next(iter(_PIXEL_BASELINES))]
        return copy.deepcopy(_PIXEL_BASELINES[key])


def _compute_pixel_baseline(
    dataset_split: Dataset, k: int, random_state: int, bar: tqdm
) -> dict:
    bar.set_postfix_str("pixel PCA")
    pca = compute_pixel_pca(dataset_split, random_state=random_state)
    assert np.array_equal(pca["frame_ids"], dataset_split.labels.frame_ids)
    bar.update()
    features = {"pixels_pca": pca["features"]}
    bar.set_postfix_str("pixels: k-NN and probe")
    scores = score_localization(dataset_split, features, k=k, random_state=random_state)
    bar.update()
    return {
        "knn": scores["knn"],
        "probe": scores["probe"],
        "cluster_score": _score_clusters(dataset_split, features, random_state, bar),
        "pca_components": int(pca["features"].shape[1]),
    }


def _score_clusters(
    dataset_split: Dataset,
    features: Mapping[str, np.ndarray],
    random_state: int,
    bar: tqdm,
) -> dict[str, dict[str, float | None]]:
    """`cluster_score[subset][embedding]` of `evaluate`; `bar` advances by one
    per embedding."""
    subsets = {
        mode: dataset_split.labels.localizations(mode)
        for mode in ("predominant", "single")
    }
    scores: dict[str, dict[str, float | None]] = {mode: {} for mode in subsets}
    for name, values in features.items():
        bar.set_postfix_str(f"UMAP of {name}")
        coordinates = None
        if len(values) >= _UMAP_MIN_FRAMES:
            points, metric = to_metric_space(values, metric_of(name))
            coordinates = project_2d(points, metric=metric, random_state=random_state)
        for mode, labels in subsets.items():
            mask = labels != ""
            scores[mode][name] = (
                None
                if coordinates is None
                else finite_or_none(
                    compute_cluster_score(coordinates[mask], labels[mask])
                )
            )
        bar.update()
    return scores
