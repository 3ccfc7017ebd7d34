"""The multi-label localization probe: targets, folds, and its scores."""

import numpy as np
import pandas as pd
import pytest

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.labels import Labels
from dlfb_localization.embeddings import protein_localization_sets
from dlfb_localization.probe import probe_targets, score_probe

NAMES = ("er", "golgi", "nucleoplasm", "mitochondria")


def planted(n_proteins: int, seed: int, dims: int = 12, noise: float = 0.3):
    """Proteins with one or two of `NAMES` each, and embeddings in which each
    localization is a direction (plus noise): linearly decodable."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((n_proteins, len(NAMES)), np.int8)
    targets[np.arange(n_proteins), rng.integers(len(NAMES), size=n_proteins)] = 1
    second = rng.random(n_proteins) < 0.4
    targets[second, rng.integers(len(NAMES), size=int(second.sum()))] = 1
    directions = rng.normal(size=(len(NAMES), dims)) * 3
    features = targets @ directions + noise * rng.normal(size=(n_proteins, dims))
    localizations = [[NAMES[j] for j in np.flatnonzero(row)] for row in targets]
    return features, localizations


def test_linearly_decodable_localizations_score_near_one():
    features, localizations = planted(120, seed=0)
    targets = probe_targets(localizations, random_state=0)
    assert targets.classes == sorted(NAMES)
    assert targets.summary()["n_splits"] == 5
    scores = score_probe(features, targets, random_state=0)
    assert scores["macro_f1"] > 0.95
    assert scores["macro_average_precision"] > 0.98


def test_shuffled_localizations_score_near_chance_average_precision():
    features, localizations = planted(300, seed=1)
    order = np.random.default_rng(2).permutation(len(localizations))
    targets = probe_targets([localizations[i] for i in order], random_state=0)
    scores = score_probe(features, targets, random_state=0)
    chance = targets.summary()["chance_average_precision"]
    assert chance == pytest.approx(targets.targets.mean(axis=0).mean())
    assert abs(scores["macro_average_precision"] - chance) < 0.08
    assert scores["macro_f1"] < 0.6


def test_a_protein_with_two_localizations_is_a_positive_for_both():
    targets = probe_targets(
        [["er", "golgi"], ["er"], ["golgi"], ["nucleoplasm", "er"]] * 3
    )
    assert targets.classes == ["er", "golgi", "nucleoplasm"]
    np.testing.assert_array_equal(
        targets.targets[:4], [[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 0, 1]]
    )


def test_grade_two_is_read_and_grade_three_is_not():
    lookup = pd.DataFrame(
        {
            "frame_id": np.arange(6),
            "protein_id": [7, 7, 3, 3, 5, 5],
            "code": [2, 2, 0, 0, 1, 1],
            "loc_grade1": ["er", "er", "nucleoplasm", "nucleoplasm", "", ""],
            "loc_grade2": ["golgi;vesicles", "golgi;vesicles", "", "", "", ""],
            "loc_grade3": ["mitochondria", "mitochondria", "er", "er", "er", "er"],
        }
    )
    split = Dataset.from_arrays(np.zeros((6, 4, 4, 1)), lookup["protein_id"])
    split.labels = Labels(lookup)
    sets = protein_localization_sets(split, np.array([3, 5, 7]))
    assert sets == [["nucleoplasm"], [], ["er", "golgi", "vesicles"]]


def test_folds_never_put_a_protein_in_training_and_test_of_one_fold():
    _, localizations = planted(47, seed=3)
    targets = probe_targets(localizations, random_state=4)
    assert len(targets.folds) == 5
    tested = np.concatenate([test for _, test in targets.folds])
    np.testing.assert_array_equal(np.sort(tested), np.arange(47))  # once each
    for train, test in targets.folds:
        assert not set(targets.rows[train]) & set(targets.rows[test])
        assert len(train) + len(test) == 47


def test_unannotated_proteins_are_left_out():
    features, localizations = planted(60, seed=5)
    blank = np.zeros(60, bool)
    blank[::4] = True
    with_blanks = [
        [] if b else names for b, names in zip(blank, localizations, strict=True)
    ]
    targets = probe_targets(with_blanks, random_state=0)
    np.testing.assert_array_equal(targets.rows, np.flatnonzero(~blank))
    assert targets.summary()["n_unannotated"] == 15
    # The blank rows change nothing: same folds and scores as without them.
    kept = [names for names in with_blanks if names]
    alone = probe_targets(kept, random_state=0)
    assert score_probe(features, targets) == score_probe(features[~blank], alone)
    with pytest.raises(ValueError, match="59 feature rows for 60"):
        score_probe(features[1:], targets)


def test_a_localization_within_one_fold_is_reported_and_excluded():
    features, localizations = planted(40, seed=6)
    localizations[0] = [*localizations[0], "centrosome"]  # held by one protein
    targets = probe_targets(localizations, random_state=0)
    summary = targets.summary()
    assert "centrosome" not in targets.classes
    assert summary["excluded_classes"] == {"centrosome": 1}
    assert summary["n_classes_scored"] == len(NAMES)
    assert targets.targets.shape == (40, len(NAMES))
    assert score_probe(features, targets) is not None


def test_too_few_proteins_give_fewer_folds_then_none_with_a_reason():
    _, localizations = planted(9, seed=7)
    assert len(probe_targets(localizations).folds) == 4  # 9 // 2
    few = probe_targets([["er"], ["golgi"], [], ["er"]])
    assert score_probe(np.zeros((4, 3)), few) is None
    assert few.summary()["reason"].startswith("3 annotated protein(s)")
    assert few.summary()["excluded_classes"] == {"er": 2, "golgi": 1}
    # Every protein holds the one localization: nothing to tell apart.
    same = probe_targets([["er"]] * 12)
    assert score_probe(np.zeros((12, 3)), same) is None
    assert "can be scored" in same.summary()["reason"]
    assert same.summary()["chance_average_precision"] is None


def test_the_probe_is_deterministic_for_a_seed():
    features, localizations = planted(60, seed=8, noise=2.0)
    first = score_probe(features, probe_targets(localizations, random_state=1))
    again = score_probe(features, probe_targets(localizations, random_state=1))
    assert first == again
    other = probe_targets(localizations, random_state=2)
    assert any(
        not np.array_equal(a[1], b[1])
        for a, b in zip(
            probe_targets(localizations, random_state=1).folds,
            other.folds,
            strict=True,
        )
    )


def test_one_scored_localization_is_a_binary_probe():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(40, 4))
    er = features[:, 0] > 0
    features[:, 0] += np.where(er, 1.0, -1.0)
    # Proteins of "er" lie at x > 1, the others at x < -1; each other protein
    # has its own localization, too rare to score, so "er" is scored alone.
    localizations = [["er"] if e else [f"rare{i}"] for i, e in enumerate(er)]
    targets = probe_targets(localizations)
    assert targets.classes == ["er"]
    scores = score_probe(features, targets)
    assert scores["macro_average_precision"] > 0.98
    assert scores["macro_f1"] > 0.9
