"""Exported embeddings load without the library or pickle, and round-trip."""

import numpy as np
import pandas as pd
import pytest

from dlfb_localization.dataset import Dataset, Labels
from dlfb_localization.export import export_embeddings
from dlfb_localization.inspect.embeddings.utils import aggregate_proteins


def make_split() -> tuple[Dataset, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    n = 30
    proteins = 100 + np.arange(n) % 4
    localizations = np.array(["er", "golgi;er", "", "nuclear_membrane"])
    full = Dataset.from_arrays(
        rng.random((n, 16, 16, 1), dtype=np.float32),
        proteins,
        names=[f"GENE{p}" for p in proteins],
        localizations=localizations[proteins - 100],
        fov_ids=np.arange(n) // 3,
    )
    keep = np.arange(n) % 5 != 0  # frame ids with gaps
    split = Dataset(full.images, Labels(full.labels.lookup[keep]))
    frame_ids = split.labels.frame_ids
    embeddings = {
        "frame_ids": frame_ids,
        "frame_histograms": rng.integers(0, 9, size=(len(frame_ids), 6)).astype(
            np.int32
        ),
        "frame_vectors": rng.random((len(frame_ids), 3)).astype(np.float32),
    }
    return split, embeddings


def test_export_round_trips_without_pickle(tmp_path):
    split, embeddings = make_split()

    paths = export_embeddings(split, embeddings, tmp_path / "out", name="valid")

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "valid.npz",
        "valid_frames.csv",
        "valid_frames.h5ad",
        "valid_proteins.csv",
        "valid_proteins.h5ad",
    ]
    with np.load(paths["arrays"], allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    assert all(a.dtype != object for a in arrays.values())
    for key in ("frame_ids", "frame_histograms", "frame_vectors"):
        np.testing.assert_array_equal(arrays[key], embeddings[key])
        assert arrays[key].dtype == embeddings[key].dtype
    protein_ids, protein_histograms = aggregate_proteins(split, **embeddings)
    np.testing.assert_array_equal(arrays["protein_ids"], protein_ids)
    np.testing.assert_allclose(arrays["protein_histograms"], protein_histograms)
    np.testing.assert_array_equal(
        arrays["protein_names"], [f"GENE{p}" for p in protein_ids]
    )
    np.testing.assert_array_equal(
        arrays["protein_localizations"], ["er", "golgi", "", "nuclear_membrane"]
    )
    np.testing.assert_array_equal(arrays["protein_n_frames"], [6, 6, 6, 6])
    np.testing.assert_array_equal(
        arrays["frame_protein_ids"], arrays["frame_ids"] % 4 + 100
    )

    frames = pd.read_csv(paths["frames"], keep_default_na=False)
    np.testing.assert_array_equal(frames["frame_id"], arrays["frame_ids"])
    np.testing.assert_array_equal(
        frames["predominant_localization"], arrays["frame_localizations"]
    )
    assert list(frames.columns) == [
        "frame_id",
        "protein_id",
        "ensg",
        "name",
        "loc_grade1",
        "loc_grade2",
        "loc_grade3",
        "fov_id",
        "predominant_localization",
    ]
    proteins = pd.read_csv(paths["proteins"], keep_default_na=False)
    np.testing.assert_array_equal(proteins["protein_id"], arrays["protein_ids"])
    assert proteins.loc[1, "loc_grade1"] == "golgi;er"
    np.testing.assert_array_equal(proteins["n_frames"], arrays["protein_n_frames"])


def test_a_failed_export_leaves_neither_partial_nor_temporary_files(
    tmp_path, monkeypatch
):
    split, embeddings = make_split()
    out = tmp_path / "out"
    export_embeddings(split, embeddings, out, name="old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail)
    with pytest.raises(OSError, match="disk full"):
        export_embeddings(split, embeddings, out, name="new")
    assert sorted(p.name for p in out.iterdir()) == [
        "old.npz",
        "old_frames.csv",
        "old_frames.h5ad",
        "old_proteins.csv",
        "old_proteins.h5ad",
    ]


def test_export_rejects_embeddings_of_another_split(tmp_path):
    split, embeddings = make_split()
    embeddings = {**embeddings, "frame_ids": embeddings["frame_ids"] + 1000}
    with pytest.raises(ValueError, match="not in this split"):
        export_embeddings(split, embeddings, tmp_path)


def test_text_a_spreadsheet_would_run_is_defused_in_the_csv_only(tmp_path):
    names = np.array(["=1+2", "+SUM(A1)", "@cmd", "-GENE"])
    proteins = np.arange(8) % 4
    split = Dataset.from_arrays(
        np.zeros((8, 4, 4, 1), dtype=np.float32), proteins, names=names[proteins]
    )
    embeddings = {
        "frame_ids": split.labels.frame_ids,
        "frame_histograms": np.ones((8, 3), dtype=np.int32),
        "frame_vectors": -np.ones((8, 2), dtype=np.float32),
    }

    paths = export_embeddings(split, embeddings, tmp_path, name="valid")

    table = pd.read_csv(paths["proteins"], keep_default_na=False)
    assert list(table["name"]) == ["'=1+2", "'+SUM(A1)", "'@cmd", "'-GENE"]
    frames = pd.read_csv(paths["frames"], keep_default_na=False)
    assert set(frames["name"]) == {"'=1+2", "'+SUM(A1)", "'@cmd", "'-GENE"}
    with np.load(paths["arrays"]) as data:
        assert list(data["protein_names"]) == list(names)
        assert (data["frame_vectors"] == -1).all()  # numbers are left alone


def test_anndata_files_hold_the_rows_embeddings_and_labels(tmp_path):
    """scanpy's format: one AnnData per level, embeddings in `obsm`, labels in
    `obs`, rows in the order of the npz."""
    import anndata

    split, embeddings = make_split()
    paths = export_embeddings(split, embeddings, tmp_path, name="valid")

    frames = anndata.read_h5ad(paths["frames_h5ad"])
    n, k = embeddings["frame_histograms"].shape
    assert frames.shape == (n, k)
    assert list(frames.obs_names) == [str(i) for i in embeddings["frame_ids"]]
    np.testing.assert_array_equal(
        frames.obsm["X_codebook_histogram"], embeddings["frame_histograms"]
    )
    np.testing.assert_array_equal(frames.X, embeddings["frame_histograms"])
    np.testing.assert_allclose(
        frames.obsm["X_mean_quantized"], embeddings["frame_vectors"]
    )
    assert list(frames.obs["name"]) == [
        f"GENE{p}" for p in split.labels.lookup["protein_id"]
    ]
    assert set(frames.obs.columns) >= {"protein_id", "fov_id", "loc_grade1"}

    proteins = anndata.read_h5ad(paths["proteins_h5ad"])
    with np.load(paths["arrays"]) as data:
        assert list(proteins.obs_names) == [str(i) for i in data["protein_ids"]]
        np.testing.assert_allclose(
            proteins.obsm["X_codebook_histogram"], data["protein_histograms"]
        )
        np.testing.assert_allclose(
            proteins.obsm["X_mean_quantized"], data["protein_vectors"]
        )
    assert list(proteins.obs["predominant_localization"]) == [
        "er",
        "golgi",
        "",
        "nuclear_membrane",
    ]
    assert list(proteins.obs["n_frames"]) == [6, 6, 6, 6]
