"""cytoself's per-protein sample format: `<name>_pro/_nuc/_nucdist/_label.npy`."""

import numpy as np
import pytest

from dlfb_localization.dataset import DataFormatError
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.utils import get_dataset


def _write_sample(path, pickled=True):
    rng = np.random.default_rng(0)
    path.mkdir(parents=True, exist_ok=True)
    channels = {}
    for i, (name, loc) in enumerate([("BETA", "er"), ("ALPHA", "nucleoplasm")]):
        n = 3 + i
        pro = rng.integers(0, 65535, (n, 12, 12), dtype=np.uint16)
        nuc = rng.integers(0, 255, (n, 12, 12), dtype=np.uint8)
        dist = rng.normal(size=(n, 12, 12)).astype(np.float64)
        np.save(path / f"{name}_pro.npy", pro)
        np.save(path / f"{name}_nuc.npy", nuc)
        np.save(path / f"{name}_nucdist.npy", dist)
        label = np.array(
            [[f"ENSG{i}", name, loc]] * n, dtype=object if pickled else str
        )
        np.save(path / f"{name}_label.npy", label, allow_pickle=pickled)
        channels[name] = np.stack([pro, nuc, dist], axis=-1).astype(np.float32)
    return channels


def test_loads_with_trust_in_name_order(tmp_path):
    channels = _write_sample(tmp_path / "sample")
    dataset = get_dataset(
        tmp_path / "sample", channels=(0, 1, 2), trust_pickled_labels=True
    )
    lookup = dataset.labels.lookup
    assert list(lookup["name"]) == ["ALPHA"] * 4 + ["BETA"] * 3  # sorted by name
    assert list(lookup["loc_grade1"][:4]) == ["nucleoplasm"] * 4
    batch = next(dataset.get_batches(None, 7, shuffle=False, drop_remainder=False))
    expected = np.concatenate([channels["ALPHA"], channels["BETA"]])
    np.testing.assert_allclose(batch["images"], expected, rtol=1e-6)
    # No field of view is recorded: each protein counts as one.
    assert (lookup["fov_id"] == lookup["protein_id"]).all()


def test_pickled_labels_need_explicit_trust(tmp_path):
    _write_sample(tmp_path / "sample")
    with pytest.raises(DataFormatError, match="trust_pickled_labels=True"):
        DatasetBuilder(tmp_path / "sample")
    assert not (tmp_path / "sample" / "dlfb_cache").exists() or not list(
        (tmp_path / "sample" / "dlfb_cache").glob("manifest*")
    )


def test_unpickled_string_labels_load_without_trust(tmp_path):
    _write_sample(tmp_path / "sample", pickled=False)
    assert len(get_dataset(tmp_path / "sample")) == 7


def test_missing_channel_file_and_segmentation_channel(tmp_path):
    _write_sample(tmp_path / "sample", pickled=False)
    with pytest.raises(DataFormatError, match=r"channel\(s\) \[3\] do not exist"):
        get_dataset(tmp_path / "sample", channels=(3,))
    (tmp_path / "sample" / "BETA_nuc.npy").unlink()
    with pytest.raises(DataFormatError, match=r"BETA_nuc\.npy is missing"):
        get_dataset(tmp_path / "sample")


def test_a_nan_frame_names_the_channel_file_and_protein(tmp_path):
    _write_sample(tmp_path / "sample", pickled=False)
    dist = np.load(tmp_path / "sample" / "BETA_nucdist.npy")
    dist[2, 5, 5] = np.nan
    np.save(tmp_path / "sample" / "BETA_nucdist.npy", dist)
    get_dataset(tmp_path / "sample", channels=(0, 1))  # the channel is not read
    with pytest.raises(DataFormatError) as info:
        get_dataset(tmp_path / "sample", channels=(0, 2), force_recreate=True)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'sample' / 'BETA_nucdist.npy'}: frame 2")
    assert (
        "protein BETA" in message and "NaN or infinite pixels in channel 2" in message
    )
