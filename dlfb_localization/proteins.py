"""Frames to proteins and localizations: which protein each frame shows, the
label tables of frames and proteins, means of embeddings over a protein's
frames (or a localization's proteins) and each protein's localizations.
Arrays and tables only; `embeddings` re-exports all of it."""

import numpy as np
import pandas as pd

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.localizations import (
    GRADE_COLUMNS,
    LOCALIZATIONS_OF_INTEREST,
    frame_localizations,
)

__all__ = [
    "aggregate_by_protein",
    "aggregate_localizations",
    "aggregate_proteins",
    "frame_protein_ids",
    "frame_rows",
    "label_tables",
    "protein_localization_sets",
    "protein_localizations",
]


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
