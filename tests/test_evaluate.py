"""The evaluation numbers: k-NN, cluster score, codebook health, and `evaluate`
(the probe's own tests are in test_probe.py)."""

import json

import jax
import numpy as np
import optax
import pytest
import tiny
from conftest import encoding_indices

from dlfb_localization import evaluate as evaluate_module
from dlfb_localization.dataset import Dataset
from dlfb_localization.embeddings import aggregate_by_protein, protein_localization_sets
from dlfb_localization.evaluate import (
    compute_cluster_score,
    compute_codebook_health,
    compute_pixel_pca,
    evaluate,
    knn_accuracy_ceiling,
    predict_knn,
    probe_targets,
    reconstruct,
    score_knn,
    score_majority,
    score_probe,
)
from dlfb_localization.model import LocalizationModel
from dlfb_localization.scoring import nearest_neighbours

MODEL = LocalizationModel(**tiny.CHAPTER)


def blobs(n_per_class: int, n_classes: int, seed: int, spread: float = 0.1):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, 5)) * 10
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), 5))
    return features, labels


def test_knn_on_separable_embeddings_is_perfect():
    features, labels = blobs(n_per_class=12, n_classes=4, seed=0)
    groups = np.arange(len(labels)) // 3  # 3 frames per "protein", 4 per class
    for metric in ("euclidean", "cosine"):
        scores = score_knn(features, labels, groups, k=5, metric=metric)
        assert scores == {"accuracy": 1.0, "macro_f1": 1.0}


def test_knn_on_shuffled_labels_is_near_chance():
    features, labels = blobs(n_per_class=100, n_classes=4, seed=1)
    shuffled = np.random.default_rng(2).permutation(labels)
    scores = score_knn(features, shuffled, np.arange(len(labels)), k=5)
    assert abs(scores["accuracy"] - 0.25) < 0.08
    assert abs(scores["macro_f1"] - 0.25) < 0.08


def test_neighbours_from_the_samples_own_group_never_vote():
    # Each group is a tight pair far from the rest, and its nearest other group
    # has the other label: plain k-NN would be perfect, leave-one-group-out wrong.
    features = np.array(
        [[0.0], [0.01], [1.0], [1.01], [10.0], [10.01], [11.0], [11.01]]
    )
    labels = np.array(["a", "a", "b", "b", "a", "a", "b", "b"])
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    predictions = predict_knn(features, labels, groups, k=1)
    np.testing.assert_array_equal(predictions, ["b", "b", "a", "a", "b", "b", "a", "a"])
    plain = predict_knn(features, labels, np.arange(8), k=1)
    np.testing.assert_array_equal(plain, labels)


def test_nearest_neighbours_never_list_the_sample_itself():
    # Rows 0 and 1 are twins (distance 0), so a search that returned each row's
    # first hit and dropped it blindly could drop the twin and keep the row.
    features = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    rows, distances = nearest_neighbours(features, k=2)
    assert rows[:2].tolist() == [[1, 2], [0, 2]]
    assert [sorted(r) for r in rows[2:].tolist()] == [[0, 1], [0, 1]]  # tied twins
    np.testing.assert_allclose(distances, [[0, 3], [0, 3], [3, 3], [4, 4]])
    # k is capped at the other samples; Hellinger is the distance of the
    # square roots of the rows' distributions over sqrt 2: 1 for disjoint ones.
    histograms = np.array([[4, 0], [1, 1], [0, 9]])
    rows, distances = nearest_neighbours(histograms, k=5, metric="hellinger")
    assert rows.shape == (3, 2)
    roots = np.sqrt(histograms / histograms.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(
        distances[:, 0],
        np.linalg.norm(roots - roots[rows[:, 0]], axis=1) / np.sqrt(2),
    )
    np.testing.assert_allclose(distances[[0, 2], 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least two"):
        nearest_neighbours(features[:1])


def test_hellinger_compares_the_square_roots_of_code_use_distributions():
    rng = np.random.default_rng(4)
    # A busy code shared by every frame (background), and rarer codes that
    # tell two classes apart.
    labels = np.repeat(["a", "b"], 20)
    histograms = np.zeros((40, 6))
    histograms[:, 0] = 600
    histograms[:20, 1:3] = rng.poisson(12, (20, 2))
    histograms[20:, 3:5] = rng.poisson(12, (20, 2))
    histograms[:, 5] = rng.poisson(4, 40)
    groups = np.arange(40)
    hellinger = predict_knn(histograms, labels, groups, k=3, metric="hellinger")
    by_hand = np.sqrt(histograms / histograms.sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(
        hellinger, predict_knn(by_hand, labels, groups, k=3, metric="euclidean")
    )
    np.testing.assert_array_equal(hellinger, labels)
    # A distribution, not counts: scaling a frame's histogram changes nothing.
    scaled = histograms * rng.integers(1, 5, (40, 1))
    np.testing.assert_array_equal(
        predict_knn(scaled, labels, groups, k=3, metric="hellinger"), hellinger
    )
    with pytest.raises(ValueError, match="non-negative"):
        predict_knn(-histograms, labels, groups, k=3, metric="hellinger")


def test_a_tied_vote_goes_to_the_nearest_neighbours_class():
    features = np.array([[0.0], [1.0], [-1.5], [5.0]])
    labels = np.array(["q", "near", "far", "x"])
    predictions = predict_knn(features, labels, np.arange(4), k=2)
    assert predictions[0] == "near"


def test_accuracy_ceiling_counts_classes_held_by_one_group_as_unreachable():
    labels = np.array(["er", "er", "er", "golgi", "golgi", "mito"])
    groups = np.array([1, 1, 2, 3, 3, 4])
    # "er" has two proteins; golgi and mito one each.
    assert knn_accuracy_ceiling(labels, groups) == pytest.approx(3 / 6)


def test_majority_class_is_the_chance_line():
    scores = score_majority(np.array(["a", "a", "a", "b"]))
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((2 * 0.75 / 1.75 + 0) / 2)


def test_cluster_score_matches_a_hand_computation():
    coordinates = np.array(
        [[0, 0], [1, 0], [-1, 0], [10, 0], [10, 2], [10, -2]], dtype=float
    )
    labels = np.array(["a", "a", "a", "b", "b", "b"])
    # Centroids (medians) (0, 0) and (10, 0); sizes (median distances) 1 and 2.
    pooled = np.array([0, 0, 10, 0])
    expected = np.sqrt(np.mean((pooled - pooled.mean()) ** 2)) / 1.5
    assert compute_cluster_score(coordinates, labels) == pytest.approx(expected)
    # Tighter blobs at the same centres score higher.
    tighter = coordinates.copy()
    tighter[:, 1] /= 2
    tighter[1:3, 0] /= 2
    assert compute_cluster_score(tighter, labels) > expected


def test_cluster_score_of_synthetic_blobs_matches_the_definition():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [8.0, 1.0], [3.0, 9.0]])
    labels = np.repeat(["x", "y", "z"], 50)
    coordinates = centres[np.repeat([0, 1, 2], 50)] + rng.normal(size=(150, 2))
    medians, sizes = [], []
    for name in ["x", "y", "z"]:
        points = coordinates[labels == name]
        median = np.median(points, axis=0)
        medians.extend(median)
        sizes.append(np.median(np.hypot(*(points - median).T)))
    assert compute_cluster_score(coordinates, labels) == pytest.approx(
        np.std(medians) / np.median(sizes)
    )
    assert np.isnan(compute_cluster_score(coordinates[:50], labels[:50]))


def test_codebook_health_of_uniform_single_and_partial_use():
    uniform = compute_codebook_health(np.full(8, 5))
    assert uniform["perplexity"] == pytest.approx(8.0)
    assert uniform["used_fraction"] == 1.0 and uniform["max_share"] == 0.125
    single = compute_codebook_health(np.array([0, 9, 0, 0]))
    assert single["perplexity"] == pytest.approx(1.0)
    assert single["used_fraction"] == 0.25 and single["max_share"] == 1.0


def planted_split(swapped: bool = False) -> Dataset:
    """8 proteins, two localizations that differ visibly in their pixels (with
    `swapped`, the same frames, each protein annotated with the other one)."""
    rng = np.random.default_rng(0)
    proteins = np.repeat(np.arange(8), 5)
    localizations = np.where((proteins < 4) != swapped, "er", "nucleoplasm")
    images = 0.1 * rng.random((len(proteins), 16, 16, 1), dtype=np.float32)
    images[proteins < 4, :8] += 1.0  # "er": bright top half
    images[proteins >= 4, 8:] += 1.0  # "nucleoplasm": bright bottom half
    return Dataset.from_arrays(
        images, proteins, localizations=localizations, fov_ids=np.arange(40) // 5
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    split = planted_split()
    state = MODEL.create_train_state(
        jax.random.key(0), split.get_dummy_input(), optax.adam(1e-3)
    )
    path = tmp_path_factory.mktemp("eval") / "result.json"
    result = evaluate(state, split, k=3, random_state=0, batch_size=16, out_path=path)
    return split, state, result, path


def test_evaluate_is_deterministic_and_writes_the_same_json(evaluated):
    split, state, result, path = evaluated
    assert json.loads(path.read_text()) == result
    # The pixel baseline is computed again too, not taken from the first.
    evaluate_module._PIXEL_BASELINES.clear()
    assert evaluate(state, split, k=3, random_state=0, batch_size=16) == result
    # Another batch size only changes the order of the MSE's float sums.
    evaluate_module._PIXEL_BASELINES.clear()
    other = evaluate(state, split, k=3, random_state=0, batch_size=7)
    assert other.pop("reconstruction_mse") == pytest.approx(
        result["reconstruction_mse"], rel=1e-6
    )
    assert other == {k: v for k, v in result.items() if k != "reconstruction_mse"}


def test_evaluate_puts_the_pixel_baseline_and_chance_beside_every_model_number(
    evaluated,
):
    _, _, result, _ = evaluated
    expected = {"codebook_histogram", "mean_quantized", "pixels_pca", "majority_class"}
    for level in ("frame", "protein"):
        for label_set in ("all", "nine", "single"):
            assert set(result["knn"][level][label_set]) == expected
        # Every protein of the planted split has one localization.
        assert result["knn"][level]["single"] == result["knn"][level]["all"]
    for subset in ("predominant", "single"):
        assert set(result["cluster_score"][subset]) == expected - {"majority_class"}
    # The planted localizations are visible in the pixels, across proteins.
    assert result["knn"]["frame"]["all"]["pixels_pca"]["accuracy"] == 1.0
    assert result["knn"]["protein"]["nine"]["pixels_pca"]["macro_f1"] == 1.0
    assert result["knn"]["frame"]["all"]["majority_class"]["accuracy"] == 0.5
    assert result["cluster_score"]["predominant"]["pixels_pca"] > 1.0
    assert result["labels"]["all"] == {
        "n_classes": 2,
        "n_frames": 40,
        "n_proteins": 8,
        "frame_accuracy_ceiling": 1.0,
        "protein_accuracy_ceiling": 1.0,
    }


def test_a_second_model_on_the_same_split_reuses_the_pixel_baseline(
    evaluated, monkeypatch
):
    split, _, result, _ = evaluated
    pcas = []

    def counted_pca(*args, **kwargs):
        pcas.append(args[0])
        return compute_pixel_pca(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "compute_pixel_pca", counted_pca)
    evaluate_module._PIXEL_BASELINES.clear()
    states = [
        MODEL.create_train_state(
            jax.random.key(seed), split.get_dummy_input(), optax.adam(1e-3)
        )
        for seed in (0, 1)
    ]
    first, second = (
        evaluate(s, split, k=3, random_state=0, batch_size=16) for s in states
    )
    assert len(pcas) == 1
    assert first == result  # the same state as the fixture's
    # The second model's own numbers, beside the same baseline.
    assert second["codebook"] != first["codebook"]
    for level in ("frame", "protein"):
        for label_set in ("all", "nine", "single"):
            for name in ("pixels_pca", "majority_class"):
                scores = second["knn"][level][label_set]
                assert scores[name] == first["knn"][level][label_set][name]
    assert second["probe"]["pixels_pca"] == first["probe"]["pixels_pca"]
    # Other annotations of the same frames: the baseline is scored again.
    swapped = evaluate(states[0], planted_split(swapped=True), k=3, random_state=0)
    assert len(pcas) == 2
    assert swapped["labels"]["probe"]["n_positives"] == 8
    assert swapped["knn"]["frame"]["all"]["pixels_pca"]["accuracy"] == 1.0


def test_evaluate_probes_every_embedding_k_nn_scores_at_protein_level(evaluated):
    split, _, result, _ = evaluated
    knn_embeddings = set(result["knn"]["protein"]["all"]) - {"majority_class"}
    assert set(result["probe"]) == knn_embeddings
    # 8 proteins: four folds of two; both localizations are spread over them.
    assert result["labels"]["probe"] == {
        "n_proteins": 8,
        "n_unannotated": 0,
        "n_splits": 4,
        "n_classes_scored": 2,
        "classes": ["er", "nucleoplasm"],
        "excluded_classes": {},
        "n_positives": 8,
        "chance_average_precision": 0.5,
        "chance_macro_f1": pytest.approx(2 / 3),
        "reason": None,
    }
    for scores in result["probe"].values():
        assert set(scores) == {"macro_f1", "macro_average_precision"}
        assert all(0.0 <= value <= 1.0 for value in scores.values())
    # Scored on the same protein means as k-NN, with the same folds. (Six
    # training proteins are too few for a linear probe on 40 standardized PCA
    # scores, 39 of them noise: unlike k-NN, it does not find the planted
    # localizations here; test_probe.py checks that it does given data.)
    protein_ids, means = aggregate_by_protein(
        split, split.labels.frame_ids, compute_pixel_pca(split)["features"]
    )
    targets = probe_targets(
        protein_localization_sets(split, protein_ids), random_state=0
    )
    assert score_probe(means, targets) == result["probe"]["pixels_pca"]


def test_evaluate_codebook_health_and_mse_recount_the_split(evaluated):
    split, state, result, _ = evaluated
    images = split.images.frames
    indices = encoding_indices(state, images)
    counts = np.bincount(indices.ravel(), minlength=16)
    assert result["codebook"] == pytest.approx(compute_codebook_health(counts))
    mse = np.mean((np.asarray(reconstruct(state, images)) - images) ** 2)
    assert result["reconstruction_mse"] == pytest.approx(float(mse), rel=1e-5)
