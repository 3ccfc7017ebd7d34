"""Bad input raises an error that names the file or field, and changes nothing."""

import os

import numpy as np
import pandas as pd
import pytest

from dlfb_localization.dataset import DataFormatError
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.cache import open_cache


def _snapshot(path):
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.iterdir()
        if p.is_file()
    }


def _expect_error(path, match, **kwargs):
    before = _snapshot(path)
    with pytest.raises(DataFormatError, match=match):
        open_cache(path, **kwargs)
    assert _snapshot(path) == before  # nothing of the user's changed
    assert not list(path.glob("dlfb_cache/*.tmp"))
    assert not list(path.glob("dlfb_cache/manifest*"))


def test_missing_folder(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        open_cache(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    _expect_error(tmp_path, "no OpenCell data")


def test_missing_label_block(tiny_release):
    path, _, _ = tiny_release
    (path / "Label_data01.csv").unlink()
    _expect_error(path, "Image_data01.npy has no label file")


def test_extra_image_block_without_labels(tiny_release):
    path, images, _ = tiny_release
    np.save(path / "Image_data02.npy", images[:3])
    _expect_error(path, "Image_data02.npy has no label file")


def test_gap_in_block_numbers(tiny_release):
    path, _, _ = tiny_release
    os.rename(path / "Image_data01.npy", path / "Image_data02.npy")
    os.rename(path / "Label_data01.csv", path / "Label_data02.csv")
    _expect_error(path, "block 01 is missing")


def test_row_counts_differ(tiny_release):
    path, _, _ = tiny_release
    labels = pd.read_csv(path / "Label_data00.csv", keep_default_na=False)
    labels.iloc[:-1].to_csv(path / "Label_data00.csv", index=False)
    _expect_error(path, r"Label_data00.csv has \d+ rows but .*Image_data00.npy has")


def test_wrong_shape(tiny_release):
    path, images, _ = tiny_release
    np.save(path / "Image_data00.npy", images[:36, ..., :3])
    _expect_error(path, r"Image_data00.npy has shape \(36, 16, 16, 3\)")


def test_mismatched_frame_size_between_blocks(tiny_release):
    path, _, _ = tiny_release
    np.save(path / "Image_data01.npy", np.zeros((36, 20, 20, 4), np.float32))
    _expect_error(path, "Image_data01.npy has frames of 20x20")


def test_wrong_dtype(tiny_release):
    path, _, _ = tiny_release
    np.save(path / "Image_data00.npy", np.zeros((36, 16, 16, 4), np.complex64))
    _expect_error(path, "Image_data00.npy has dtype complex64")


def test_nan_frame_names_file_and_row(tiny_release):
    path, images, _ = tiny_release
    block = images[36:].copy()
    block[5, 3, 3, 0] = np.nan
    np.save(path / "Image_data01.npy", block)
    _expect_error(path, r"Image_data01.npy: frame 5 .* NaN or infinite")


def test_huge_pixels_are_refused_naming_file_frame_and_protein(tiny_release):
    # Finite, but squared in the loss they overflow float32: without
    # standardization training would stop at a NaN loss naming only the step.
    path, images, _ = tiny_release
    block = images[36:].copy()
    block[5, 3, 3, 0] = -3e20
    np.save(path / "Image_data01.npy", block)
    file = str(path / "Image_data01.npy")
    _expect_error(
        path, f"^{file}: frame 5 .*protein GENE3.* magnitude 3e\\+20 in channel 0"
    )
    block[5, 3, 3, 0] = 1e14  # large, but trainable
    np.save(path / "Image_data01.npy", block)
    frames, _, _ = open_cache(path)
    assert frames[41, 3, 3, 0] == np.float32(1e14)


def test_a_file_a_repeated_channel_and_an_unwritable_cache_folder(tiny_release):
    path, _, _ = tiny_release
    with pytest.raises(DataFormatError, match="is a file, not a folder"):
        open_cache(path / "Image_data00.npy")
    _expect_error(path, r"channels \[0, 0\] name a channel twice", channels=(0, 0))
    (path.parent / "a_file").write_text("")
    with pytest.raises(PermissionError, match="writable folder with --cache-dir"):
        open_cache(path, cache_dir=path.parent / "a_file" / "cache")


def test_inf_in_an_unused_channel_is_fine(tiny_release):
    path, images, _ = tiny_release
    block = images[36:].copy()
    block[5, 3, 3, 2] = np.inf
    np.save(path / "Image_data01.npy", block)
    frames, _, _ = open_cache(path, channels=(0,))
    assert np.isfinite(frames).all()
    with pytest.raises(DataFormatError, match="frame 5"):
        open_cache(path, channels=(0, 2))


def test_bad_label_header_and_values(tiny_release):
    path, _, _ = tiny_release
    labels = pd.read_csv(path / "Label_data00.csv", keep_default_na=False)
    labels.drop(columns="FOV_id").to_csv(path / "Label_data00.csv", index=False)
    _expect_error(path, r"Label_data00.csv lacks the column\(s\) \['FOV_id'\]")
    labels["protein_id"] = labels["protein_id"].astype(str)
    labels.loc[2, "protein_id"] = "abc"
    labels.to_csv(path / "Label_data00.csv", index=False)
    _expect_error(path, r"column 'protein_id' must hold integers, found 'abc' in row 3")


def test_unknown_channel(tiny_release):
    path, _, _ = tiny_release
    _expect_error(path, r"channel\(s\) \[4\] do not exist", channels=(4,))


@pytest.mark.parametrize(
    ("splits", "match"),
    [
        ({"train": 0.8, "valid": 0.1}, "sum to 0.9"),
        ({"train": 1.2, "valid": -0.2}, "fraction 1.2"),
        ({}, "non-empty dict"),
    ],
)
def test_bad_split_fractions(tiny_release, splits, match):
    path, _, _ = tiny_release
    with pytest.raises(ValueError, match=match):
        DatasetBuilder(path).build(rng=0, splits=splits)


def test_unknown_exclusive_by_and_too_many_proteins(tiny_release):
    path, _, _ = tiny_release
    builder = DatasetBuilder(path)
    with pytest.raises(ValueError, match="exclusive_by must be one of"):
        builder.build(rng=0, splits={"all": 1.0}, exclusive_by="well_id")
    with pytest.raises(ValueError, match="n_proteins=7 but the data set has 6"):
        builder.build(rng=0, splits={"all": 1.0}, n_proteins=7)


def test_split_that_would_be_empty(tiny_release):
    path, _, _ = tiny_release
    with pytest.raises(ValueError, match=r"split\(s\) \['valid'\] would get no data"):
        DatasetBuilder(path).build(
            rng=0,
            splits={"train": 0.9, "valid": 0.05, "test": 0.05},
            exclusive_by="protein_id",
        )
