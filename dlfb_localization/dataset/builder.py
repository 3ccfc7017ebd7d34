"""`DatasetBuilder`: from a folder of OpenCell data to named, exclusive splits."""

import os
from collections.abc import Sequence

import numpy as np

from dlfb_localization.dataset.batches import numpy_rng
from dlfb_localization.dataset.cache import open_cache
from dlfb_localization.dataset.dataset import Dataset
from dlfb_localization.dataset.images import Images
from dlfb_localization.dataset.labels import Labels
from dlfb_localization.dataset.splits import (
    EXCLUSIVE_BY,
    assign_splits,
    validate_splits,
)


class DatasetBuilder:
    """Opens (building once) the cache of a data folder and cuts it into splits.

    Args:
      data_path: folder with the full release (`Image_dataNN.npy`,
        `Label_dataNN.csv`) or cytoself's per-protein sample format.
      force_recreate: rebuild the cache even if it is valid.
      channels: channels to keep, in order; the chapter uses `(0,)`, the protein.
        The release has 0=protein, 1=nucleus, 2=nuclear distance,
        3=nuclear segmentation.
      cache_dir: where to keep the cache (default `<data_path>/dlfb_cache`).
      trust_pickled_labels: allow unpickling the sample format's label files.
      progress: show a progress bar while building the cache.
      cache_dtype: "float32" (default) or "float16", which halves the cache.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        force_recreate: bool = False,
        *,
        channels: Sequence[int] = (0,),
        cache_dir: str | os.PathLike | None = None,
        trust_pickled_labels: bool = False,
        progress: bool = False,
        cache_dtype: str = "float32",
    ):
        frames, table, digest = open_cache(
            data_path,
            channels,
            cache_dir=cache_dir,
            force_recreate=force_recreate,
            trust_pickled_labels=trust_pickled_labels,
            progress=progress,
            cache_dtype=cache_dtype,
        )
        self.images = Images(frames, digest)
        self.table = table

    def build(
        self,
        rng,
        splits: dict[str, float],
        exclusive_by: str = "fov_id",
        n_proteins: int | None = None,
        max_frames: int | None = None,
    ) -> dict[str, Dataset]:
        """Samples proteins (and frames) and splits them.

        Args:
          rng: JAX key (or int seed); the same key gives the same splits.
          splits: name -> fraction of the exclusive sets, summing to 1.
          exclusive_by: "fov_id" (no field of view in two splits) or "protein_id".
          n_proteins: how many proteins to sample at random (default: all).
          max_frames: at most this many frames, sampled at random from the chosen
            proteins' frames (the book truncated in protein order instead).

        Returns:
          `{name: Dataset}` in the order of `splits`. Class codes are consecutive
          over the chosen proteins and shared by all splits.
        """
        validate_splits(splits)
        if exclusive_by not in EXCLUSIVE_BY:
            raise ValueError(
                f"exclusive_by must be one of {EXCLUSIVE_BY}, not {exclusive_by!r}"
            )
        proteins = np.unique(self.table["protein_id"].to_numpy())
        if n_proteins is None:
            n_proteins = len(proteins)
        if not 0 < n_proteins <= len(proteins):
            raise ValueError(
                f"n_proteins={n_proteins} but the data set has {len(proteins)} "
                f"proteins; choose 1 to {len(proteins)} (or None for all)"
            )
        if max_frames is not None and max_frames <= 0:
            raise ValueError(f"max_frames must be positive or None, got {max_frames}")

        generator = numpy_rng(rng)
        chosen = np.sort(generator.choice(proteins, size=n_proteins, replace=False))
        table = self.table[self.table["protein_id"].isin(chosen)]
        if max_frames is not None and len(table) > max_frames:
            keep = np.sort(generator.choice(len(table), size=max_frames, replace=False))
            table = table.iloc[keep]
        table = table.copy()
        # Codes over the proteins that still have frames, so they stay consecutive.
        _, codes = np.unique(table["protein_id"].to_numpy(), return_inverse=True)
        table["code"] = codes.astype(np.int32)

        masks = assign_splits(table[exclusive_by].to_numpy(), splits, generator)
        return {
            name: Dataset(self.images, Labels(table[mask].reset_index(drop=True)))
            for name, mask in masks.items()
        }
