"""Feature spectra: which codes proteins use together (numbers, no plotting).

`correlate_codes` correlates codebook entries across proteins and
`cluster_feature_spectrums` orders them into groups of co-used codes, the
chapter's feature spectrum; `inspect.embeddings.feature_spectrum` draws them.
"""

import numpy as np
from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
from scipy.spatial.distance import pdist, squareform

__all__ = ["cluster_feature_spectrums", "correlate_codes"]


def correlate_codes(protein_histograms: np.ndarray) -> np.ndarray:
    """Pearson correlation of codebook entries across proteins.

    A code whose usage is the same for every protein (in practice, a code no
    protein uses) has zero variance, so its correlation is undefined: its row
    and column are NaN rather than the 0 the chapter's `nan_to_num` made of it,
    which read as "uncorrelated" and put those codes among real ones.

    Args:
      protein_histograms: `[p, K]` per-protein spectra.

    Returns:
      `[K, K]` float64 correlations in `[-1, 1]`; NaN rows and columns for
      constant codes.
    """
    histograms = np.asarray(protein_histograms, dtype=np.float64)
    if histograms.ndim != 2 or len(histograms) < 2:
        raise ValueError(
            "protein_histograms must be [n_proteins >= 2, num_embeddings], got "
            f"shape {histograms.shape}"
        )
    # max == min is exact, where a variance threshold would depend on scale.
    defined = np.ptp(histograms, axis=0) > 0
    centred = histograms[:, defined] - histograms[:, defined].mean(axis=0)
    centred /= np.sqrt(np.sum(centred**2, axis=0))
    corr = np.full((histograms.shape[1],) * 2, np.nan)
    corr[np.ix_(defined, defined)] = np.clip(centred.T @ centred, -1.0, 1.0)
    return corr


def cluster_feature_spectrums(
    protein_histograms: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups codebook entries that proteins use together.

    As in the chapter: the Pearson correlation of codes across proteins
    (`correlate_codes`), then average-linkage clustering of the codes' correlation
    profiles (rows, Euclidean distance) with optimal leaf ordering, cut into at
    most `n_clusters` groups (`fcluster`, "maxclust").

    Codes with undefined correlation (constant across proteins, e.g. never used)
    are kept out of the clustering of the others: they form one separate subtree,
    joined to the rest at the top of the tree (above every other merge), and get
    cluster 0. Groups of the other codes are numbered 1, 2, … from left to right
    in the dendrogram's leaf order, so plots can label them I, II, … in reading
    order.

    Args:
      protein_histograms: `[p, K]` per-protein spectra, p >= 2.
      n_clusters: maximum number of groups of defined codes.

    Returns:
      `(corr_idx_idx, tree, encoding_clusters)`: the `[K, K]` correlation (NaN
      for constant codes), the `[K - 1, 4]` scipy linkage over all K codes and
      `[K]` int cluster labels (0 = constant code, else 1..n_clusters).
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    corr = correlate_codes(protein_histograms)
    defined = ~np.isnan(np.diag(corr))
    n_defined = int(defined.sum())
    if n_defined < 2:
        raise ValueError(
            f"only {n_defined} code(s) vary across proteins; clustering needs at "
            "least 2 (use more proteins or a model that uses more codes)"
        )
    profiles = corr[np.ix_(defined, defined)]
    defined_distances = squareform(pdist(profiles, metric="euclidean"))
    # Constant codes are at distance 0 from each other and farther from every
    # defined code than any two defined codes are, so average linkage merges them
    # last, and the defined codes' subtree is the chapter's tree of those codes.
    apart = 2.0 * defined_distances.max() if defined_distances.max() > 0 else 1.0
    distances = np.full(corr.shape, apart)
    distances[np.ix_(defined, defined)] = defined_distances
    distances[np.ix_(~defined, ~defined)] = 0.0
    np.fill_diagonal(distances, 0.0)
    tree = linkage(
        squareform(distances, checks=False), method="average", optimal_ordering=True
    )

    has_constant = n_defined < len(corr)
    raw = fcluster(tree, n_clusters + int(has_constant), criterion="maxclust")
    encoding_clusters = np.zeros(len(corr), dtype=np.int32)
    relabel: dict[int, int] = {}
    for leaf in leaves_list(tree):
        if defined[leaf]:
            relabel.setdefault(int(raw[leaf]), len(relabel) + 1)
            encoding_clusters[leaf] = relabel[int(raw[leaf])]
    return corr, tree, encoding_clusters
