"""The chapter's dataset helpers."""

import os

import numpy as np

from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.dataset import Dataset


def get_dataset(data_path: str | os.PathLike, **builder_kwargs) -> Dataset:
    """Every frame of the data set in one `Dataset` (for looking at the data).

    `builder_kwargs` go to `DatasetBuilder` (e.g. `channels`, `cache_dir`).
    """
    builder = DatasetBuilder(data_path, **builder_kwargs)
    return builder.build(rng=0, splits={"all": 1.0})["all"]


def count_unique_proteins(dataset_splits: dict[str, Dataset]) -> int:
    """Number of distinct proteins over all splits: the classifier's class count."""
    ids = [
        split.labels.lookup["protein_id"].to_numpy()
        for split in dataset_splits.values()
    ]
    return int(np.unique(np.concatenate(ids)).size)
