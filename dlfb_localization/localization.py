"""Localization scores of named per-frame embeddings: protein- and frame-level
k-NN and the multi-label probe, on arrays and a split's labels (no models, no
UMAP). `evaluate` composes them with its cluster score, codebook health and
reconstruction error; `compare` scores every candidate's embeddings with them.
"""

from collections.abc import Mapping

import numpy as np

from dlfb_localization.dataset import Dataset
from dlfb_localization.embeddings import EMBEDDING_KINDS, embedding_metric
from dlfb_localization.probe import probe_targets, score_probe
from dlfb_localization.proteins import (
    aggregate_by_protein,
    frame_protein_ids,
    protein_localization_sets,
    protein_localizations,
)
from dlfb_localization.scoring import knn_accuracy_ceiling, score_knn, score_majority

__all__ = [
    "EMBEDDING_METRICS",
    "LABEL_SETS",
    "finite_or_none",
    "metric_of",
    "score_localization",
]

# Distance used for each embedding, by k-NN and by the cluster score's UMAP:
# the per-frame embeddings' (`embeddings.EMBEDDING_KINDS`: Hellinger for code
# histograms, Euclidean for mean quantized vectors, at every level) and
# Euclidean for the pixels' PCA scores. Measured on the demo's 150 unseen
# proteins (seed 0, three trainings: head weight 0, 0.1 and 1), Hellinger
# raised a trained model's protein-level 5-NN from 0.69-0.71 (cosine of raw
# counts) to 0.74-0.79, and lowered the untrained model's from 0.71 to 0.67:
# the square root stabilizes count variance, so a few busy codes (background,
# the nucleus) no longer outweigh the rarer codes that tell patterns apart.
EMBEDDING_METRICS = {**dict(EMBEDDING_KINDS.values()), "pixels_pca": "euclidean"}


def metric_of(name: str) -> str:
    """The distance k-NN and UMAP use for the embedding `name`."""
    return EMBEDDING_METRICS.get(name) or embedding_metric(name)


# Label sets, as `(Labels.localizations mode, restrict to the chapter's nine)`:
# "all", every protein by its predominant localization; "nine", only proteins
# whose predominant localization is one of the chapter's nine; "single", only
# proteins annotated with exactly one localization (whose label is not a
# judgement between two), as cytoself's clustering score uses them.
LABEL_SETS = {
    "all": ("predominant", False),
    "nine": ("predominant", True),
    "single": ("single", False),
}


def finite_or_none(value: float) -> float | None:
    """`value`, or None where it is NaN or infinite."""
    # JSON has no NaN; None (null) says "undefined" to every reader.
    return value if np.isfinite(value) else None


def score_localization(
    dataset_split: Dataset,
    features: Mapping[str, np.ndarray],
    *,
    k: int = 5,
    random_state: int = 0,
) -> dict:
    """Localization k-NN and the probe of named per-frame embeddings, as
    `evaluate` scores them (without its UMAPs and codebook health).

    Args:
      dataset_split: the frames the features describe.
      features: `{name: [n, d]}` per-frame embeddings in the split's frame-id
        order, named as `embeddings.named_embeddings` names a model's or
        "pixels_pca"; the name picks the distance (`EMBEDDING_METRICS`).
      k: neighbours in k-NN votes.
      random_state: seeds the probe's folds and solver.

    Returns:
      `evaluate`'s `labels` (with `labels["probe"]`), `knn` and `probe`.
    """
    frame_ids = dataset_split.labels.frame_ids
    for name, values in features.items():
        if len(values) != len(frame_ids):
            raise ValueError(
                f"embedding {name!r} has {len(values)} rows but the split has "
                f"{len(frame_ids)} frames"
            )
    protein_ids, protein_features = _protein_means(dataset_split, frame_ids, features)
    knn = _score_localization_knn(
        dataset_split, frame_ids, features, protein_ids, protein_features, k
    )
    probe_labels, probe = _score_localization_probe(
        dataset_split, protein_ids, protein_features, random_state
    )
    return {
        "labels": {**knn["labels"], "probe": probe_labels},
        "knn": knn["knn"],
        "probe": probe,
    }


def _protein_means(
    dataset_split: Dataset, frame_ids: np.ndarray, features: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`(protein_ids, {embedding: [p, d] mean over each protein's frames})`:
    what protein-level k-NN and the probe both score."""
    protein_ids, protein_features = np.zeros(0, np.int64), {}
    for name, values in features.items():
        protein_ids, protein_features[name] = aggregate_by_protein(
            dataset_split, frame_ids, values
        )
    return protein_ids, protein_features


def _score_localization_knn(
    dataset_split: Dataset,
    frame_ids: np.ndarray,
    features: Mapping[str, np.ndarray],
    protein_ids: np.ndarray,
    protein_features: Mapping[str, np.ndarray],
    k: int,
) -> dict[str, dict]:
    """`{"labels": …, "knn": …}` of `evaluate` for frames and proteins."""
    frame_proteins = frame_protein_ids(dataset_split, frame_ids)
    labels_info: dict[str, dict] = {}
    knn: dict[str, dict] = {"frame": {}, "protein": {}}
    for label_set, (mode, restrict) in LABEL_SETS.items():
        frame_labels = dataset_split.labels.localizations(mode, restrict=restrict)
        protein_labels = protein_localizations(
            dataset_split, protein_ids, mode, restrict=restrict
        )
        frame_mask, protein_mask = frame_labels != "", protein_labels != ""
        labels_info[label_set] = {
            "n_classes": len(np.unique(frame_labels[frame_mask])),
            "n_frames": int(frame_mask.sum()),
            "n_proteins": int(protein_mask.sum()),
            "frame_accuracy_ceiling": finite_or_none(
                knn_accuracy_ceiling(
                    frame_labels[frame_mask], frame_proteins[frame_mask]
                )
            ),
            "protein_accuracy_ceiling": finite_or_none(
                knn_accuracy_ceiling(
                    protein_labels[protein_mask], protein_ids[protein_mask]
                )
            ),
        }
        knn["frame"][label_set] = _score_level(
            features, frame_labels, frame_proteins, frame_mask, k
        )
        knn["protein"][label_set] = _score_level(
            protein_features, protein_labels, protein_ids, protein_mask, k
        )
    return {"labels": labels_info, "knn": knn}


def _score_localization_probe(
    dataset_split: Dataset,
    protein_ids: np.ndarray,
    protein_features: Mapping[str, np.ndarray],
    random_state: int,
) -> tuple[dict, dict[str, dict[str, float] | None]]:
    """`labels["probe"]` and `probe` of `evaluate`: the folds and targets are
    made once, so every embedding is scored on the same ones."""
    targets = probe_targets(
        protein_localization_sets(dataset_split, protein_ids),
        random_state=random_state,
    )
    scores = {
        name: score_probe(values, targets, random_state=random_state)
        for name, values in protein_features.items()
    }
    return targets.summary(), scores


def _score_level(
    features: Mapping[str, np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    mask: np.ndarray,
    k: int,
) -> dict[str, dict[str, float] | None]:
    """k-NN scores of every embedding, and chance, on the labelled samples."""
    labels, groups = labels[mask], groups[mask]
    enough = len(np.unique(labels)) >= 2 and len(np.unique(groups)) >= 2
    scores: dict[str, dict[str, float] | None] = {
        name: score_knn(values[mask], labels, groups, k=k, metric=metric_of(name))
        if enough
        else None
        for name, values in features.items()
    }
    scores["majority_class"] = score_majority(labels) if enough else None
    return scores
