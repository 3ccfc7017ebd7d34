"""A multi-label localization probe on frozen protein embeddings.

k-NN asks whether a protein's neighbours share its predominant localization.
The probe asks what SubCell and its peers report on OpenCell: whether a linear
model reads all of a protein's annotated localizations (grades 1 and 2) off its
embedding, scored by macro-F1 and macro average precision over the
localizations. Like `scoring`, it knows nothing of models: `probe_targets`
turns annotations into binary targets and cross-validation folds, once per
split; `score_probe` fits and scores one embedding on them.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score
from sklearn.model_selection import KFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MultiLabelBinarizer, StandardScaler

__all__ = [
    "PROBE_C",
    "PROBE_FOLDS",
    "ProbeTargets",
    "probe_targets",
    "score_probe",
]

PROBE_FOLDS = 5
# Inverse L2 strength, fixed before looking rather than tuned (tuning needs a
# nested cross-validation the small splits cannot feed). On the demo's 150
# unseen proteins (seed 42), C=1 gave macro AP within 0.02 of these for code
# histograms and pixels, and 0.08-0.09 higher for the trained models' mean
# quantized vectors; the ranking of models was the same.
PROBE_C = 0.1
# lbfgs converged without a warning on every embedding of that demo run, at C
# 0.1 and 1; scikit-learn warns if it does not.
PROBE_MAX_ITER = 5000
# A fold needs at least this many proteins.
_MIN_FOLD_SIZE = 2


@dataclasses.dataclass(frozen=True)
class ProbeTargets:
    """What `score_probe` fits and scores, from `probe_targets`.

    Attributes:
      n_input: proteins (rows) given, annotated or not.
      rows: `[m]` rows of the annotated proteins among them.
      targets: `[m, c]` 0/1, one column per scored localization.
      classes: the scored localizations, sorted.
      excluded: `{localization: proteins holding it}` of those not scored.
      folds: `(train, test)` positions into `rows`, one pair per fold.
      reason: why nothing can be scored, or None.
    """

    n_input: int
    rows: np.ndarray
    targets: np.ndarray
    classes: list[str]
    excluded: dict[str, int]
    folds: list[tuple[np.ndarray, np.ndarray]]
    reason: str | None

    def summary(self) -> dict:
        """JSON-ready label information: counts, classes, folds and chance.

        `chance_average_precision` is the mean prevalence of the scored
        localizations (a ranking that knows nothing scores this on average);
        `chance_macro_f1` that of calling every protein positive for every
        localization, the best an embedding-blind rule does on F1.
        """
        prevalence = self.targets.mean(axis=0) if self.classes else np.zeros(0)
        return {
            "n_proteins": len(self.rows),
            "n_unannotated": self.n_input - len(self.rows),
            "n_splits": len(self.folds),
            "n_classes_scored": len(self.classes),
            "classes": list(self.classes),
            "excluded_classes": dict(self.excluded),
            "n_positives": int(self.targets.sum()),
            "chance_average_precision": _mean_or_none(prevalence),
            "chance_macro_f1": _mean_or_none(2 * prevalence / (1 + prevalence)),
            "reason": self.reason,
        }


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def probe_targets(
    localizations: Sequence[Sequence[str]],
    *,
    n_splits: int = PROBE_FOLDS,
    random_state: int = 0,
) -> ProbeTargets:
    """Binary targets and cross-validation folds of proteins' localizations.

    Proteins without annotation (an empty list) are left out. Each remaining
    localization is one binary target (`MultiLabelBinarizer`): a protein with
    two localizations is a positive for both. Folds: `KFold` over the annotated
    proteins, shuffled with `random_state`; with one row per protein, no
    protein is ever in the training and test set of the same fold. A split
    with fewer than `2 * n_splits` annotated proteins gets fewer folds of two
    proteins each (at least two folds). A localization is scored only if its
    proteins fall in the test sets of at least two folds, and so does the rest:
    then every fold trains on positives and negatives of it, and some fold tests
    on it. Others (always those held by one protein) are `excluded`.

    Args:
      localizations: each protein's localization names (e.g.
        `embeddings.protein_localization_sets`), `[]` if unannotated.
      n_splits: folds wanted.
      random_state: seeds the folds' shuffle.

    Returns:
      A `ProbeTargets`; its `reason` says why nothing can be scored (fewer than
      four annotated proteins, or no localization spread over two folds).
    """
    n_input = len(localizations)
    rows = np.array([i for i, names in enumerate(localizations) if names], np.int64)
    annotated = [sorted(set(localizations[i])) for i in rows]
    binarizer = MultiLabelBinarizer()
    all_targets = binarizer.fit_transform(annotated).astype(np.int8)
    all_targets = all_targets.reshape(len(rows), len(binarizer.classes_))
    names = [str(c) for c in binarizer.classes_]
    counts = all_targets.sum(axis=0)
    folds_wanted = min(n_splits, len(rows) // _MIN_FOLD_SIZE)
    if folds_wanted < 2:
        return ProbeTargets(
            n_input,
            rows,
            np.zeros((len(rows), 0), np.int8),
            [],
            dict(zip(names, counts.tolist(), strict=True)),
            [],
            f"{len(rows)} annotated protein(s): the probe's cross-validation needs "
            f"at least {2 * _MIN_FOLD_SIZE} (two folds of {_MIN_FOLD_SIZE})",
        )
    splitter = KFold(n_splits=folds_wanted, shuffle=True, random_state=random_state)
    folds = list(splitter.split(rows))
    test_fold = np.empty(len(rows), np.int64)
    for fold, (_, test) in enumerate(folds):
        test_fold[test] = fold
    scored = [
        len(np.unique(test_fold[column == 1])) >= 2
        and len(np.unique(test_fold[column == 0])) >= 2
        for column in all_targets.T
    ]
    classes = [name for name, keep in zip(names, scored, strict=True) if keep]
    excluded = {
        name: int(count)
        for name, count, keep in zip(names, counts, scored, strict=True)
        if not keep
    }
    reason = None
    if not classes:
        reason = (
            f"no localization of the {len(rows)} annotated proteins can be "
            f"scored in {folds_wanted} folds: each has its proteins, or all the "
            "others, within one fold"
        )
    return ProbeTargets(
        n_input,
        rows,
        all_targets[:, np.flatnonzero(scored)],
        classes,
        excluded,
        folds,
        reason,
    )


def score_probe(
    features: np.ndarray,
    targets: ProbeTargets,
    *,
    C: float = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
    random_state: int = 0,
) -> dict[str, float] | None:
    """Cross-validated macro-F1 and macro AP of a linear multi-label probe.

    The model: `StandardScaler` then one `LogisticRegression` per localization
    (`OneVsRestClassifier`; L2 with inverse strength `C`, balanced class
    weights, so a rare localization's positives weigh as much as its
    negatives). Each fold's model is fitted on its training proteins and
    predicts probabilities for its test proteins; the out-of-fold probabilities
    of all folds are then scored together over the scored localizations:
    macro-F1 of the calls at probability 0.5 and macro average precision (the
    area under each localization's precision-recall curve, averaged; chance is
    `targets.summary()["chance_average_precision"]`). Deterministic given
    `random_state` and `targets`.

    Args:
      features: `[n_input, d]` protein embeddings, rows aligned with the
        annotations given to `probe_targets` (unannotated rows are skipped).
      targets: `probe_targets(...)` of those proteins.
      C: inverse L2 regularization strength.
      max_iter: lbfgs iterations per localization and fold.
      random_state: passed to the logistic regressions.

    Returns:
      `{"macro_f1", "macro_average_precision"}` in `[0, 1]`, or None if
      `targets.reason` says nothing can be scored.
    """
    features = np.asarray(features, np.float64)
    if len(features) != targets.n_input:
        raise ValueError(
            f"{len(features)} feature rows for {targets.n_input} proteins' labels"
        )
    if targets.reason is not None:
        return None
    x, y = features[targets.rows], targets.targets
    probabilities = np.zeros(y.shape, np.float64)
    for train, test in targets.folds:
        model = Pipeline(
            [
                ("scale", StandardScaler()),
                (
                    "classify",
                    OneVsRestClassifier(
                        LogisticRegression(
                            C=C,
                            class_weight="balanced",
                            max_iter=max_iter,
                            random_state=random_state,
                        )
                    ),
                ),
            ]
        )
        if y.shape[1] == 1:
            # One localization is a binary problem, whose probabilities come
            # back as [negative, positive] columns.
            model.fit(x[train], y[train, 0])
            probabilities[test, 0] = model.predict_proba(x[test])[:, 1]
        else:
            model.fit(x[train], y[train])
            probabilities[test] = model.predict_proba(x[test])
    calls = (probabilities >= 0.5).astype(np.int8)
    return {
        "macro_f1": float(f1_score(y, calls, average="macro", zero_division=0)),
        "macro_average_precision": float(
            average_precision_score(y, probabilities, average="macro")
        ),
    }
