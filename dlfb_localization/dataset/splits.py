"""Seeded splits that keep fields of view (or proteins) exclusive to one split."""

import math

import numpy as np

EXCLUSIVE_BY = ("fov_id", "protein_id")


def validate_splits(splits: dict[str, float]) -> None:
    """Checks split names and fractions; fractions must sum to 1."""
    if not isinstance(splits, dict) or not splits:
        raise ValueError(
            "splits must be a non-empty dict of name -> fraction, e.g. "
            '{"train": 0.8, "valid": 0.1, "test": 0.1}'
        )
    for name, fraction in splits.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"split names must be non-empty strings, got {name!r}")
        if not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise ValueError(
                f"split {name!r} has fraction {fraction!r}; each fraction must be a "
                "number in (0, 1]"
            )
    total = sum(splits.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(
            f"split fractions sum to {total:g}, not 1: {splits}; adjust them so they "
            "add up to 1"
        )


def split_sizes(splits: dict[str, float], n_sets: int) -> dict[str, int]:
    """Number of exclusive sets per split: floors, the last split takes the rest."""
    names = list(splits)
    sizes = {name: int(n_sets * splits[name]) for name in names[:-1]}
    sizes[names[-1]] = n_sets - sum(sizes.values())
    empty = [name for name, size in sizes.items() if size == 0]
    if empty:
        raise ValueError(
            f"split(s) {empty} would get no data: only {n_sets} exclusive sets "
            f"(fields of view or proteins) for fractions {splits}; use more proteins, "
            "fewer splits or larger fractions"
        )
    return sizes


def assign_splits(
    set_ids: np.ndarray, splits: dict[str, float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Masks `[n_frames]` per split; frames sharing a set id share a split.

    Args:
      set_ids: `[n_frames]` the field of view (or protein) of each frame.
      splits: name -> fraction of the distinct set ids (validated).
      rng: NumPy generator; the assignment is a pure function of its state.
    """
    unique = rng.permutation(np.unique(set_ids))
    masks, start = {}, 0
    for name, size in split_sizes(splits, len(unique)).items():
        masks[name] = np.isin(set_ids, unique[start : start + size])
        start += size
    return masks
