"""Frame and protein embeddings, feature-spectrum clustering and projections."""

import threading
import time
import warnings

import jax
import numpy as np
import optax
import pytest
import tiny
from conftest import encoding_indices
from scipy.cluster.hierarchy import linkage
from sklearn.metrics import adjusted_rand_score

from dlfb_localization import projection
from dlfb_localization.dataset import Dataset, Labels
from dlfb_localization.inspect.embeddings import clustering
from dlfb_localization.inspect.embeddings.clustering import (
    Projection,
    calculate_projection,
    frame_id_relations,
)
from dlfb_localization.inspect.embeddings.utils import (
    aggregate_localizations,
    aggregate_proteins,
    cluster_feature_spectrums,
    count_codes,
    get_frame_embeddings,
)
from dlfb_localization.model import LocalizationModel
from dlfb_localization.projection import compile_umap, project_2d, umap_module

NUM_EMBEDDINGS = 16
MODEL = LocalizationModel(**{**tiny.CHAPTER, "num_embeddings": NUM_EMBEDDINGS})
TX = optax.adam(1e-3)
LOCS = np.array(["er", "golgi", "er;golgi", "", "membrane"])


def make_dataset(n: int = 37, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    proteins = np.arange(n) % 5
    return Dataset.from_arrays(
        rng.random((n, 16, 16, 1), dtype=np.float32),
        proteins,
        localizations=LOCS[proteins],
        fov_ids=np.arange(n) // 4,
    )


def subset(dataset: Dataset, keep: np.ndarray) -> Dataset:
    """A split holding only the frames where `keep` is true (same image array)."""
    return Dataset(dataset.images, Labels(dataset.labels.lookup[keep]))


def make_state(dataset: Dataset, seed: int = 0):
    return MODEL.create_train_state(jax.random.key(seed), dataset.get_dummy_input(), TX)


def test_count_codes_equals_numpy_bincount_per_frame():
    indices = np.random.default_rng(0).integers(0, 7, size=(5, 3, 4))
    counts = np.asarray(count_codes(indices, 7))
    expected = np.stack([np.bincount(i.ravel(), minlength=7) for i in indices])
    np.testing.assert_array_equal(counts, expected)
    assert counts.dtype == np.int32


def test_every_frame_once_in_order_and_histograms_recount_the_indices():
    full = make_dataset()
    # Every third frame missing: frame ids are not 0..n-1, and 25 frames are not a
    # multiple of the batch size.
    split = subset(full, np.arange(len(full)) % 3 != 1)
    state = make_state(full)

    embeddings = get_frame_embeddings(state, split, batch_size=8)

    np.testing.assert_array_equal(embeddings["frame_ids"], split.labels.frame_ids)
    assert embeddings["frame_ids"].dtype == np.int64
    images = full.images.frames[split.labels.frame_ids]
    indices = encoding_indices(state, images)
    assert indices.shape == (len(split), 4, 4)
    recount = np.stack(
        [np.bincount(i.ravel(), minlength=NUM_EMBEDDINGS) for i in indices]
    )
    np.testing.assert_array_equal(embeddings["frame_histograms"], recount)
    assert embeddings["frame_histograms"].dtype == np.int32
    np.testing.assert_array_equal(embeddings["frame_histograms"].sum(axis=1), 16)
    # The mean quantized vector is the mean of the chosen codes (unit vectors:
    # the model's default cosine lookup).
    codebook = np.asarray(state.params["vector_quantizer"]["codebook"])
    codebook = codebook / np.linalg.norm(codebook, axis=0, keepdims=True)
    expected = codebook.T[indices].mean(axis=(1, 2))
    np.testing.assert_allclose(embeddings["frame_vectors"], expected, atol=1e-6)
    assert embeddings["frame_vectors"].dtype == np.float32


def test_embeddings_do_not_depend_on_the_batch_size():
    split = make_dataset(n=21)
    state = make_state(split)
    small = get_frame_embeddings(state, split, batch_size=4)
    large = get_frame_embeddings(state, split, batch_size=256)
    np.testing.assert_array_equal(small["frame_ids"], large["frame_ids"])
    np.testing.assert_array_equal(small["frame_histograms"], large["frame_histograms"])
    np.testing.assert_allclose(
        small["frame_vectors"], large["frame_vectors"], atol=1e-6
    )


def test_aggregate_proteins_averages_each_proteins_frames():
    split = make_dataset(n=12)
    rng = np.random.default_rng(1)
    frame_ids = split.labels.frame_ids[::-1]  # any order
    histograms = rng.integers(0, 9, size=(12, 6))
    vectors = rng.random((12, 3))

    protein_ids, protein_histograms = aggregate_proteins(
        split,
        frame_ids=frame_ids,
        frame_histograms=histograms,
        frame_vectors=vectors,
    )

    np.testing.assert_array_equal(protein_ids, [0, 1, 2, 3, 4])
    proteins_of_frames = frame_ids % 5  # from_arrays: protein id = frame id % 5
    for row, protein in enumerate(protein_ids):
        expected = histograms[proteins_of_frames == protein].mean(axis=0)
        np.testing.assert_allclose(protein_histograms[row], expected, rtol=1e-6)


def test_aggregate_proteins_rejects_frames_of_another_split():
    split = subset(make_dataset(n=10), np.arange(10) < 5)
    with pytest.raises(ValueError, match="not in this split"):
        aggregate_proteins(split, np.array([0, 7]), np.zeros((2, 3)))


def planted_histograms(seed: int = 0):
    """Protein spectra whose codes form 3 planted groups, plus 3 unused codes."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.array([0] * 5 + [1] * 4 + [2] * 6 + [-1] * 3))
    activity = rng.gamma(2.0, 1.0, size=(40, 3))
    noise = rng.uniform(0.9, 1.1, size=(40, len(groups)))
    histograms = np.where(groups >= 0, activity[:, np.maximum(groups, 0)] * noise, 0)
    return histograms, groups


def test_cluster_feature_spectrums_recovers_planted_groups_and_sets_unused_apart():
    histograms, groups = planted_histograms()

    corr, tree, clusters = cluster_feature_spectrums(histograms, n_clusters=3)

    used = groups >= 0
    assert adjusted_rand_score(groups[used], clusters[used]) == 1.0
    np.testing.assert_array_equal(clusters[~used], 0)
    assert set(clusters[used]) == {1, 2, 3}
    assert corr.shape == (18, 18) and tree.shape == (17, 4)
    assert np.isnan(corr[~used]).all() and np.isnan(corr[:, ~used]).all()
    np.testing.assert_allclose(np.diag(corr)[used], 1.0)
    # The unused codes join the rest only at the very top of the tree.
    assert tree[-1, 2] > tree[:-1, 2].max()


def test_cluster_feature_spectrums_is_the_chapters_clustering_when_all_codes_vary():
    histograms, groups = planted_histograms(seed=3)
    histograms = histograms[:, groups >= 0]

    corr, tree, _ = cluster_feature_spectrums(histograms, n_clusters=3)

    np.testing.assert_allclose(corr, np.corrcoef(histograms.T), atol=1e-12)
    chapter_tree = linkage(
        corr, method="average", metric="euclidean", optimal_ordering=True
    )
    np.testing.assert_allclose(tree, chapter_tree, atol=1e-9)


def test_cluster_numbers_follow_the_dendrogram_from_left_to_right():
    from scipy.cluster.hierarchy import leaves_list

    histograms, _ = planted_histograms(seed=5)
    _, tree, clusters = cluster_feature_spectrums(histograms, n_clusters=3)
    ordered = clusters[leaves_list(tree)]
    ordered = ordered[ordered > 0]
    first_seen = list(dict.fromkeys(ordered.tolist()))
    assert first_seen == [1, 2, 3]


def test_aggregate_localizations_averages_single_localization_proteins():
    split = make_dataset(n=20)  # proteins 0..4: er, golgi, er;golgi, "", membrane
    protein_ids = np.array([0, 1, 2, 3, 4])
    histograms = np.arange(20, dtype=float).reshape(5, 4)

    names, spectra = aggregate_localizations(split, protein_ids, histograms)
    # "single": the er;golgi protein is left out; membrane is not among the nine.
    assert names == ["er", "golgi"]
    np.testing.assert_allclose(spectra, histograms[[0, 1]])

    names, spectra = aggregate_localizations(
        split, protein_ids, histograms, mode="predominant"
    )
    assert names == ["er", "golgi"]
    np.testing.assert_allclose(spectra[0], histograms[[0, 2]].mean(axis=0))


def test_relations_match_frames_by_id_not_by_position():
    ids = np.array([10, 11, 12, 13, 14])
    permuted = ids[[3, 0, 4, 1, 2]]
    relations = frame_id_relations(ids, permuted)
    assert {ids[a]: permuted[b] for a, b in relations.items()} == {i: i for i in ids}
    # Frames only in one set have no relation.
    assert frame_id_relations(ids, np.array([14, 99, 10])) == {4: 0, 0: 2}


def embedding_set(frame_ids: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "frame_ids": frame_ids,
        "frame_histograms": rng.integers(0, 5, size=(len(frame_ids), 6)),
        "frame_vectors": rng.random((len(frame_ids), 3)).astype(np.float32),
    }


def test_aligned_projection_passes_frame_id_relations(monkeypatch):
    class RecordingAlignedUMAP:
        """Stands in for umap.AlignedUMAP: records the fit, projects trivially."""

        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs

        def fit(self, datasets, relations):
            seen["datasets"], seen["relations"] = datasets, relations
            self.embeddings_ = [np.asarray(d)[:, :2] for d in datasets]
            return self

    import umap

    seen = {}
    monkeypatch.setattr(umap, "AlignedUMAP", RecordingAlignedUMAP)
    ids = np.arange(20, 32)
    order = np.random.default_rng(0).permutation(len(ids))
    first, second = embedding_set(ids, 0), embedding_set(ids[order], 1)

    projected = calculate_projection(
        {"a": first, "b": second}, feature="frame_vectors", random_state=3
    )

    (relation,) = seen["relations"]
    assert all(ids[a] == ids[order][b] for a, b in relation.items())
    assert len(relation) == len(ids)
    assert list(projected) == ["a", "b"]
    np.testing.assert_array_equal(projected["b"].frame_ids, ids[order])
    # Sets this small go in as their distances, in their order (`_umap_inputs`).
    assert seen["kwargs"]["metric"] == "precomputed"
    vectors = second["frame_vectors"].astype(np.float32)
    np.testing.assert_allclose(
        seen["datasets"][1],
        np.linalg.norm(vectors[:, None] - vectors[None], axis=-1),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        projected["b"].coordinates, seen["datasets"][1][:, :2]
    )


def test_projection_of_sets_without_shared_frames_is_refused():
    with pytest.raises(ValueError, match="share no frame id"):
        calculate_projection(
            {
                "a": embedding_set(np.arange(5), 0),
                "b": embedding_set(np.arange(5, 9), 1),
            }
        )


@pytest.mark.slow  # numba compiles AlignedUMAP: ~20-30 s on a 2-core CPU
def test_real_aligned_umap_is_reproducible_and_keeps_each_sets_frames():
    ids = np.arange(40)
    order = np.random.default_rng(2).permutation(40)[:30]
    sets = {"a": embedding_set(ids, 0), "b": embedding_set(ids[order], 1)}

    first = calculate_projection(sets, random_state=7, n_neighbors=5)
    again = calculate_projection(sets, random_state=7, n_neighbors=5)

    assert isinstance(first["b"], Projection)
    np.testing.assert_array_equal(first["b"].frame_ids, ids[order])
    assert first["a"].coordinates.shape == (40, 2)
    assert first["b"].coordinates.shape == (30, 2)
    assert np.isfinite(first["b"].coordinates).all()
    for name in sets:
        np.testing.assert_array_equal(first[name].coordinates, again[name].coordinates)
    # The second one reused the layout's compiled epoch: umap asks numba for it
    # at every call, and gets the one dispatcher kept for those options.
    layouts = umap_module().layouts
    epoch = layouts._optimize_layout_aligned_euclidean_single_epoch
    kept = layouts.numba._dispatchers
    (options,) = [options for function, options in kept if function is epoch]
    assert layouts.numba.njit(epoch, **dict(options)) is kept[epoch, options]


@pytest.mark.slow  # compiles UMAP's numba code where nothing cached it yet
def test_compile_umap_leaves_nothing_for_later_projections_to_compile():
    from numba.core import event

    compile_umap()
    compiled = []

    class Compiled(event.Listener):
        def on_start(self, ev):
            compiled.append(ev.data["dispatcher"].py_func.__qualname__)

        def on_end(self, ev):
            pass

    rng = np.random.default_rng(3)
    ids = np.arange(60)
    with event.install_listener("numba:compile", Compiled()):
        # Other sizes and dtypes than compile_umap's: UMAP takes float32.
        coordinates = project_2d(rng.normal(size=(60, 5)), metric="euclidean")
        projected = calculate_projection(
            {"a": embedding_set(ids, 0), "b": embedding_set(ids, 1)}, n_neighbors=5
        )
    assert coordinates.shape == (60, 2) and projected["b"].coordinates.shape == (60, 2)
    assert compiled == []


def test_umap_of_a_small_set_is_umaps_own_to_the_bit():
    """A set that UMAP compares all pairs of gets its distances from numba
    (`projection._umap_inputs`), not from scikit-learn's loop over the pairs
    in Python, as UMAP's own path does: they are the same float32 distances,
    so the layout is UMAP's own. (Both paths call umap's one numba function
    for the metric.)"""
    from sklearn.metrics import pairwise_distances

    umap = umap_module()
    # float64, as `evaluate`'s Hellinger features are; UMAP takes float32.
    points = np.random.default_rng(5).random(size=(150, 6))
    (distances,), metric = projection._umap_inputs([points], "euclidean")
    assert metric == "precomputed" and distances.dtype == np.float32
    by_pairs = pairwise_distances(
        points.astype(np.float32), metric=umap.distances.euclidean
    )
    np.testing.assert_array_equal(distances, by_pairs)
    own = umap.UMAP(
        n_components=2,
        n_neighbors=projection.UMAP_NEIGHBORS,
        min_dist=projection.UMAP_MIN_DIST,
        metric="euclidean",
        random_state=0,
        n_jobs=1,
    ).fit_transform(points)
    np.testing.assert_array_equal(project_2d(points), own)
    # A set UMAP searches approximately, or another metric (for cosine UMAP
    # also cuts long edges), is given as it is.
    large = [np.zeros((4096, 2), np.float32)]
    inputs, metric = projection._umap_inputs(large, "euclidean")
    assert inputs is large and metric == "euclidean"
    inputs, metric = projection._umap_inputs([points], "cosine")
    assert inputs[0] is points and metric == "cosine"


def test_umaps_notices_are_dropped_in_its_fits_whatever_other_threads_do(
    monkeypatch,
):
    """umap warns of what `projection` asks of it on purpose ("precomputed"
    distances, a seed with n_jobs). The demo fits UMAPs while other threads
    run scikit-learn, which enters `warnings.catch_warnings`: that swaps the
    process's one list of filters and puts back the list it found on exit, so
    a filter set around a fit is lost if another thread exits while the fit
    runs. The notices are dropped in the fit's own thread instead, and
    nowhere else: umap called outside a fit still warns."""
    umap = umap_module()

    class SlowUMAP:
        """Stands in for umap.UMAP: gives umap's notices, and stays a while."""

        def __init__(self, **kwargs):
            pass

        def fit_transform(self, data):
            umap.umap_.warn("using precomputed metric; inverse_transform ...")
            time.sleep(0.1)  # while the other thread leaves its filters
            umap.umap_.warn("n_jobs value 1 overridden to 1 by setting random_state.")
            return np.zeros((len(data), 2), np.float32)

    def swap_filters():  # what scikit-learn's checks do
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            time.sleep(0.05)

    monkeypatch.setattr(umap, "UMAP", SlowUMAP)
    points = np.random.default_rng(0).random((12, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = threading.Thread(
            target=project_2d, args=(points,), kwargs={"metric": "cosine"}
        )
        other = threading.Thread(target=swap_filters)
        other.start()
        fit.start()
        fit.join()
        other.join()
        assert [str(w.message) for w in caught] == []
        umap.umap_.warn("using precomputed metric; outside a fit")
    assert [str(w.message) for w in caught] == [
        "using precomputed metric; outside a fit"
    ]
    assert caught[0].filename == __file__  # attributed to the caller, as before


def test_palette_covers_exactly_the_nine_localizations():
    from dlfb_localization.dataset.localizations import LOCALIZATIONS_OF_INTEREST

    assert tuple(clustering.LOCALIZATION_COLORS) == LOCALIZATIONS_OF_INTEREST
    assert len(set(clustering.LOCALIZATION_COLORS.values())) == 9
    assert clustering.OTHER_COLOR not in clustering.LOCALIZATION_COLORS.values()
