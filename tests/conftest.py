"""Tiny data sets written in the real on-disk formats, for fast tests."""

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from dlfb_localization.dataset.sources import LABEL_COLUMNS

matplotlib.use("Agg")
# One device and no preallocation keep tests fast and isolated on a 2-core CPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

LOCS = [
    "er",
    "mitochondria;cytoplasmic",
    "nucleoplasm",
    "chromatin",
    "golgi",
    "vesicles",
]


def write_tiny_release(
    path: Path,
    n_proteins: int = 6,
    fovs_per_protein: int = 3,
    frames_per_fov: int = 4,
    n_blocks: int = 2,
    size: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Writes Image_dataNN.npy / Label_dataNN.csv; returns all images and labels.

    Pixels are random, so every frame is distinguishable; protein ids are
    non-consecutive (10, 13, 16, …) so class encoding is exercised.
    """
    rng = np.random.default_rng(seed)
    rows = []
    fov = 100
    for p in range(n_proteins):
        for _ in range(fovs_per_protein):
            for _ in range(frames_per_fov):
                rows.append(
                    {
                        "ensg": f"ENSG9{p:010d}",
                        "name": f"GENE{p}",
                        "loc_grade1": LOCS[p % len(LOCS)],
                        "loc_grade2": "golgi" if p % 4 == 0 else "",
                        "loc_grade3": "",
                        "protein_id": 10 + 3 * p,
                        "FOV_id": fov,
                    }
                )
            fov += 1
    labels = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    images = rng.random((len(labels), size, size, 4), dtype=np.float32)
    path.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(labels)), n_blocks)):
        np.save(path / f"Image_data{i:02d}.npy", images[idx])
        labels.iloc[idx].to_csv(path / f"Label_data{i:02d}.csv", index=False)
    return images, labels


@pytest.fixture
def tiny_release(tmp_path):
    """A fresh tiny release folder: (path, images [n,16,16,4], labels table)."""
    images, labels = write_tiny_release(tmp_path / "release")
    return tmp_path / "release", images, labels
