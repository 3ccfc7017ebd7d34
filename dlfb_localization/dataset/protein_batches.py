"""Batches of P proteins x K crops, for contrastive tasks whose positives
share a protein.

SubCell's samples are fields of view with 8 cells each, so every batch holds
crops of the same protein (the supervised contrastive loss's positives) and
of others (its negatives). `plan_protein_batches` does the same with the
crops of a split: each batch takes K crops of each of P distinct proteins, the
K crops from one field of view where the protein has enough left there, else
from several of its fields. Within an epoch no crop is used twice; crops that
do not fill a group of K, and groups left over when fewer than P proteins
still have one, wait for the next epoch's draw.

The plan uses NumPy only; `iterate_protein_batches` reads the batches from the
split's memory-mapped frames in the format of `Dataset.get_batches`.
"""

from collections.abc import Iterator

import numpy as np

from dlfb_localization.dataset.batches import numpy_rng
from dlfb_localization.dataset.dataset import Dataset

__all__ = ["iterate_protein_batches", "plan_protein_batches", "plan_split_batches"]


def _check_request(
    protein_ids: np.ndarray, proteins_per_batch: int, crops_per_protein: int
) -> None:
    if proteins_per_batch < 1 or crops_per_protein < 1:
        raise ValueError(
            "proteins_per_batch and crops_per_protein must be >= 1, got "
            f"{proteins_per_batch} and {crops_per_protein}"
        )
    _, counts = np.unique(protein_ids, return_counts=True)
    enough = int(np.sum(counts >= crops_per_protein))
    if enough < proteins_per_batch:
        raise ValueError(
            f"a batch needs {proteins_per_batch} proteins with at least "
            f"{crops_per_protein} crops each, but only {enough} of the split's "
            f"{len(counts)} proteins have that many; lower proteins_per_batch or "
            "crops_per_protein"
        )


def _protein_groups(
    positions: np.ndarray,
    fov_ids: np.ndarray,
    crops_per_protein: int,
    generator: np.random.Generator,
) -> list[np.ndarray]:
    """One protein's crops cut into groups of K, in a random order: first the
    groups that fit inside one field of view, then groups of what is left
    over, across fields; fewer than K crops left at the end are dropped."""
    k = crops_per_protein
    groups, leftover = [], []
    fovs = fov_ids[positions]
    for fov in generator.permutation(np.unique(fovs)):
        crops = generator.permutation(positions[fovs == fov])
        full = len(crops) - len(crops) % k
        groups.extend(crops[:full].reshape(-1, k))
        leftover.append(crops[full:])
    leftover = generator.permutation(np.concatenate(leftover))
    full = len(leftover) - len(leftover) % k
    groups.extend(leftover[:full].reshape(-1, k))
    return [groups[i] for i in generator.permutation(len(groups))]


def plan_protein_batches(
    protein_ids: np.ndarray,
    fov_ids: np.ndarray,
    proteins_per_batch: int,
    crops_per_protein: int,
    rng,
) -> np.ndarray:
    """One epoch's batches of P proteins x K crops, as positions into the split.

    Each batch draws P distinct proteins, each with probability proportional to
    the groups of K it has left (so the epoch ends with few unused groups), and
    takes one group of each. The plan is a pure function of `rng`.

    Args:
      protein_ids: `[n]` the protein of each crop of the split.
      fov_ids: `[n]` the field of view of each crop.
      proteins_per_batch: P, at least 1.
      crops_per_protein: K, at least 1.
      rng: JAX key or int seed (e.g. `fold_in(rng_data, epoch)`), turned into a
        NumPy generator (`batches.numpy_rng`).

    Returns:
      `[n_batches, P * K]` int64 positions: row b holds batch b, protein by
      protein (`reshape(P, K)` gives one protein's crops per row), proteins in
      ascending id order. No position appears twice.

    Raises:
      ValueError: P or K is below 1, or fewer than P proteins have K crops.
    """
    protein_ids = np.asarray(protein_ids)
    fov_ids = np.asarray(fov_ids)
    if protein_ids.shape != fov_ids.shape or protein_ids.ndim != 1:
        raise ValueError(
            f"protein_ids and fov_ids must be [n] arrays of one length, got shapes "
            f"{protein_ids.shape} and {fov_ids.shape}"
        )
    _check_request(protein_ids, proteins_per_batch, crops_per_protein)
    generator = numpy_rng(rng)
    proteins, inverse = np.unique(protein_ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(proteins)))[:-1]
    groups = [
        _protein_groups(positions, fov_ids, crops_per_protein, generator)
        for positions in np.split(order, bounds)
    ]
    left = np.array([len(g) for g in groups], dtype=np.int64)
    batches = []
    while np.count_nonzero(left) >= proteins_per_batch:
        chosen = np.sort(
            generator.choice(
                len(proteins),
                size=proteins_per_batch,
                replace=False,
                p=left / left.sum(),
            )
        )
        left[chosen] -= 1
        batches.append(np.concatenate([groups[p][left[p]] for p in chosen]))
    width = proteins_per_batch * crops_per_protein
    return np.asarray(batches, dtype=np.int64).reshape(-1, width)


def plan_split_batches(
    dataset: Dataset, proteins_per_batch: int, crops_per_protein: int, rng
) -> np.ndarray:
    """`plan_protein_batches` of a split's crops: `[n_batches, P * K]`
    positions into the split. Fields of view come from the label table's
    `fov_id` column; without one, every crop counts as its own field, so
    groups mix fields. `len` of it is the epoch's number of batches."""
    lookup = dataset.labels.lookup
    protein_ids = lookup["protein_id"].to_numpy()
    fov_ids = (
        lookup["fov_id"].to_numpy() if "fov_id" in lookup else np.arange(len(lookup))
    )
    return plan_protein_batches(
        protein_ids, fov_ids, proteins_per_batch, crops_per_protein, rng
    )


def iterate_protein_batches(
    dataset: Dataset, proteins_per_batch: int, crops_per_protein: int, rng
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of P x K batches of a split (`plan_protein_batches`),
    as `Dataset.get_batches` does: `{"frame_ids": [P*K] int64, "images":
    [P*K, h, w, c] float32, "labels": [P*K] int32}`, protein by protein.

    The plan is `plan_split_batches`'s.

    Args:
      dataset: the split (its frames are read from its memory map).
      proteins_per_batch: P.
      crops_per_protein: K.
      rng: JAX key or int seed; the same key gives the same batches.
    """
    plan = plan_split_batches(dataset, proteins_per_batch, crops_per_protein, rng)
    frame_ids, codes = dataset.labels.frame_ids, dataset.labels.codes
    frames = dataset.images.frames
    for positions in plan:
        ids = frame_ids[positions]
        # Sorted reads are sequential on disk; `back` restores the batch's order.
        order = np.argsort(ids, kind="stable")
        back = np.argsort(order, kind="stable")
        images = np.asarray(frames[ids[order]], dtype=np.float32)[back]
        yield {"frame_ids": ids, "images": images, "labels": codes[positions]}
