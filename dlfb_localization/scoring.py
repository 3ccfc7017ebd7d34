"""Scores on arrays: localization k-NN, chance, ceiling and the cluster score.

Small named evaluators that know nothing of models: `evaluate` composes them
with the embeddings, the pixel baseline, codebook health and the
reconstruction error.
"""

import numpy as np
from sklearn.metrics import f1_score
from sklearn.neighbors import NearestNeighbors

from dlfb_localization.embeddings import hellinger_features

__all__ = [
    "compute_cluster_score",
    "knn_accuracy_ceiling",
    "nearest_neighbours",
    "predict_knn",
    "score_knn",
    "score_majority",
    "to_metric_space",
]


def predict_knn(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    k: int = 5,
    metric: str = "euclidean",
) -> np.ndarray:
    """Leave-one-group-out k-nearest-neighbour predictions.

    Each sample is classified by majority vote of its `k` nearest samples from
    *other* groups: with `groups` = protein ids, a frame's own protein never
    votes, so the score measures localization rather than protein identity.
    A tie goes to the tied class with the nearest neighbour.

    Args:
      features: `[n, d]` embeddings.
      labels: `[n]` class labels (any sortable type).
      groups: `[n]` group ids; samples of the same group never neighbour each
        other. Pass `np.arange(n)` for plain leave-one-out.
      k: neighbours per vote.
      metric: "hellinger" (for non-negative histograms: Euclidean distance of
        the square roots of each row divided by its sum) or any scikit-learn
        `NearestNeighbors` metric ("cosine", "euclidean", "correlation", …).

    Returns:
      `[n]` predicted labels.

    Raises:
      ValueError: a sample has no neighbour outside its group.
    """
    features = np.asarray(features)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n = len(features)
    if not len(labels) == len(groups) == n:
        raise ValueError(
            f"features, labels and groups must align: {n}, {len(labels)}, {len(groups)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    features, metric = to_metric_space(features, metric)
    _, group_index, group_sizes = np.unique(
        groups, return_inverse=True, return_counts=True
    )
    # Among the k + (largest group) nearest, at least k are from other groups.
    n_neighbors = min(n, k + int(group_sizes.max()))
    search = NearestNeighbors(n_neighbors=n_neighbors, metric=metric, algorithm="brute")
    _, neighbours = search.fit(features).kneighbors(features)
    allowed = group_index[neighbours] != group_index[:, None]
    keep = allowed & (np.cumsum(allowed, axis=1) <= k)
    if not keep.any(axis=1).all():
        raise ValueError("a sample has no neighbour outside its own group")

    classes, codes = np.unique(labels, return_inverse=True)
    neighbour_codes = codes[neighbours]
    rows = np.arange(n)[:, None]
    votes = np.zeros((n, len(classes)), dtype=np.int64)
    np.add.at(
        votes, (np.broadcast_to(rows, keep.shape)[keep], neighbour_codes[keep]), 1
    )
    tied = votes == votes.max(axis=1, keepdims=True)
    # Neighbours are sorted by distance: the first kept one of a tied class wins.
    first = np.argmax(keep & tied[rows, neighbour_codes], axis=1)
    return classes[neighbour_codes[np.arange(n), first]]


def nearest_neighbours(
    features: np.ndarray, *, k: int = 5, metric: str = "euclidean"
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's `k` nearest other samples (exact, brute force).

    Args:
      features: `[n, d]` embeddings, n >= 2.
      k: neighbours per sample (at most n - 1 are returned).
      metric: as `predict_knn`'s ("hellinger" for histograms, or any
        scikit-learn `NearestNeighbors` metric).

    Returns:
      `(rows, distances)`: `[n, min(k, n - 1)]` rows of `features`, nearest
      first, never the sample itself (another sample at distance 0 may come
      first), and their distances in the metric (Hellinger distances lie in
      [0, 1]).
    """
    hellinger = metric == "hellinger"
    features, metric = to_metric_space(np.asarray(features), metric)
    if len(features) < 2:
        raise ValueError("nearest neighbours need at least two samples")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    search = NearestNeighbors(
        n_neighbors=min(k, len(features) - 1), metric=metric, algorithm="brute"
    )
    # Without a query, scikit-learn leaves each fitted sample out of its own list.
    distances, rows = search.fit(features).kneighbors()
    if hellinger:  # Euclidean between square roots is sqrt(2) x Hellinger.
        distances = distances / np.sqrt(2.0)
    return rows.astype(np.int64), distances


def to_metric_space(features: np.ndarray, metric: str) -> tuple[np.ndarray, str]:
    """`(features, metric)` for scikit-learn and UMAP: "hellinger" becomes the
    square roots of the rows' distributions under "euclidean"; any other
    metric is returned as it is."""
    if metric != "hellinger":
        return features, metric
    return hellinger_features(features), "euclidean"


def _score_predictions(labels: np.ndarray, predictions: np.ndarray) -> dict:
    return {
        "accuracy": float(np.mean(predictions == labels)),
        # Over the classes present in `labels`, each counting equally, so rare
        # localizations weigh as much as the cytoplasm.
        "macro_f1": float(
            f1_score(
                labels,
                predictions,
                labels=np.unique(labels),
                average="macro",
                zero_division=0,
            )
        ),
    }


def score_knn(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    k: int = 5,
    metric: str = "euclidean",
) -> dict[str, float]:
    """Accuracy and macro-F1 of `predict_knn` (see there for the arguments).

    Returns:
      `{"accuracy", "macro_f1"}`, both in `[0, 1]`.
    """
    predictions = predict_knn(features, labels, groups, k=k, metric=metric)
    return _score_predictions(np.asarray(labels), predictions)


def score_majority(labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the most frequent class.

    The chance level beside every k-NN score: a model that has learned nothing
    about localization scores about this.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    predictions = np.full(labels.shape, classes[np.argmax(counts)])
    return _score_predictions(labels, predictions)


def knn_accuracy_ceiling(labels: np.ndarray, groups: np.ndarray) -> float:
    """The best accuracy leave-one-group-out k-NN can reach on these labels.

    A sample can be classified correctly only if some other group has its
    label: a localization held by one protein of the split is never predicted
    once that protein's frames are excluded.

    Args:
      labels: `[n]` class labels.
      groups: `[n]` group ids (e.g. protein ids).

    Returns:
      The fraction of samples whose label occurs in another group (NaN if none).
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(labels) == 0:
        return float("nan")
    pairs = np.unique(np.stack([labels.astype(str), groups.astype(str)]), axis=1)
    classes, groups_per_class = np.unique(pairs[0], return_counts=True)
    shared = classes[groups_per_class >= 2]
    return float(np.mean(np.isin(labels.astype(str), shared)))


def compute_cluster_score(coordinates: np.ndarray, labels: np.ndarray) -> float:
    """cytoself's cluster score of labelled points in 2-D (Kobayashi et al. 2022).

    Per class, the centroid is the coordinate-wise median of its points and the
    size is the median Euclidean distance of its points to that centroid. The
    score is the standard deviation of all centroid coordinates pooled together
    (the `[n_classes, 2]` array flattened, ddof 0) divided by the median class
    size: large when classes are compact and far apart. It depends on the
    layout only up to scale, but it is a property of one projection, so compare
    scores of projections made the same way.

    Args:
      coordinates: `[n, 2]` points (e.g. a UMAP).
      labels: `[n]` class of each point; leave out unlabelled points beforehand.

    Returns:
      The score; NaN with fewer than two classes or a median class size of 0.
    """
    coordinates = np.asarray(coordinates, dtype=np.float64)
    labels = np.asarray(labels)
    if len(coordinates) != len(labels):
        raise ValueError(f"{len(coordinates)} points but {len(labels)} labels")
    classes = np.unique(labels)
    if len(classes) < 2:
        return float("nan")
    centroids, sizes = [], []
    for cls in classes:
        points = coordinates[labels == cls]
        centroid = np.median(points, axis=0)
        centroids.append(centroid)
        sizes.append(np.median(np.linalg.norm(points - centroid, axis=1)))
    size = np.median(sizes)
    return float(np.std(np.array(centroids)) / size) if size > 0 else float("nan")
