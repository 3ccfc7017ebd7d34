"""Raw fields of view to release crops, on seven real OpenCell Hoechst fields.

The fields are read from ../shared (never copied into the repository); the
protein channels are made here, so the tests know where the signal must land.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

from dlfb_localization import cli
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.raw import (
    CropSettings,
    RawInputError,
    RawLayout,
    crop_field,
    crop_release,
    find_fields,
    read_field,
)

REAL = Path(__file__).parents[2] / "shared" / "data" / "real" / "opencell_raw_nuclei"
FIELDS = sorted(REAL.glob("FOV_*_RAW.tif")) if REAL.is_dir() else []
needs_real = pytest.mark.skipif(
    not FIELDS, reason=f"the real raw OpenCell fields are not at {REAL}"
)
SETTINGS = CropSettings()
SIZE = SETTINGS.crop_size


@pytest.fixture(scope="module")
def real_crops():
    """`{name: (raw nucleus, FieldCrops)}` of all seven fields, protein = nucleus."""
    out = {}
    for path in FIELDS:
        raw = tifffile.imread(path)
        out[path.name] = (raw, crop_field(raw, raw, SETTINGS))
    return out


@needs_real
def test_real_fields_have_plausible_nucleus_counts_and_sizes(real_crops):
    assert len(real_crops) == 7
    counts = {name: int(c.labels.max()) for name, (_, c) in real_crops.items()}
    # By eye: 00076 is a dense monolayer (~150 nuclei), 01176 a sparse patch (~35).
    assert all(25 <= n <= 200 for n in counts.values()), counts
    assert counts["FOV_00076_RAW.tif"] > 3 * counts["FOV_01176_RAW.tif"]
    assert 450 <= sum(counts.values()) <= 750, counts
    um2 = SETTINGS.target_pixel_size_um**2
    for name, (_, crops) in real_crops.items():
        areas = np.bincount(crops.labels.ravel())[1:]
        diameters = 2 * np.sqrt(areas / np.pi)
        # cytoself's crops show a HEK293T nucleus ~35 px across.
        assert 30 <= np.median(diameters) <= 40, name
        assert areas.min() * um2 >= SETTINGS.segmentation.min_area_um2, name
        assert areas.max() * um2 <= SETTINGS.segmentation.max_area_um2, name
        # The watershed splits clumps: few nuclei are over twice the median.
        assert np.mean(areas > 2 * np.median(areas)) < 0.1, name


@needs_real
def test_crops_lie_inside_the_field_one_per_nucleus_centred_on_it(real_crops):
    for name, (_, crops) in real_crops.items():
        labels, centres, frames = crops.labels, crops.centres, crops.frames
        assert len(frames) == len(centres) >= 20, name
        assert len(np.unique(centres[:, 0])) == len(centres), name
        top, left = centres[:, 1] - SIZE // 2, centres[:, 2] - SIZE // 2
        assert (top >= 0).all() and (left >= 0).all(), name
        assert (top + SIZE <= labels.shape[0]).all(), name
        assert (left + SIZE <= labels.shape[1]).all(), name
        # The centre pixel belongs to the crop's own nucleus.
        assert (labels[centres[:, 1], centres[:, 2]] == centres[:, 0]).all(), name
        assert (frames[:, SIZE // 2, SIZE // 2, 3] == 1).all(), name
        # Channels 2 and 3 agree: positive distance exactly inside nuclei.
        assert np.array_equal(frames[..., 2] > 0, frames[..., 3] == 1), name
        assert frames[..., :2].min() >= 0 and frames[..., :2].max() <= 1, name
        # Nuclei at the border are segmented but never cropped.
        border = np.unique(
            np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        )
        assert not np.isin(centres[:, 0], border[border > 0]).any(), name
        # The QC picture outlines cropped nuclei (yellow) on nucleus pixels only.
        yellow = (crops.qc == (255, 230, 26)).all(axis=-1)
        assert yellow.any() and (labels[yellow] > 0).all(), name
        assert np.isin(labels[yellow], centres[:, 0]).all(), name


@needs_real
def test_protein_channel_lands_in_channel_0_of_the_right_crops(real_crops):
    raw, crops = real_crops["FOV_00076_RAW.tif"]
    rng = np.random.default_rng(0)
    marked = rng.choice(len(crops.centres), len(crops.centres) // 2, replace=False)
    protein = np.full(raw.shape, 300.0)
    scale = SETTINGS.target_pixel_size_um / SETTINGS.pixel_size_um
    for _, row, col in crops.centres[marked]:
        protein[round(row * scale), round(col * scale)] = 1e6
    protein = ndimage.gaussian_filter(protein, 6.0)
    protein = np.clip(protein, 0, 65535).astype(np.uint16)

    two = crop_field(raw, protein, SETTINGS)
    assert np.array_equal(two.centres, crops.centres)
    assert np.array_equal(two.frames[..., 1:], crops.frames[..., 1:])
    centre = two.frames[:, SIZE // 2, SIZE // 2, 0]
    is_marked = np.zeros(len(centre), bool)
    is_marked[marked] = True
    assert centre[is_marked].min() > 0.5
    # An unmarked crop is bright at its centre only if a marked neighbour is close.
    assert np.median(centre[~is_marked]) < 0.05


def _write_field(folder: Path, name: str, image: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / name, image)
    return folder / name


@needs_real
def test_stacks_and_separate_files_read_the_same_channels(tmp_path):
    nucleus = tifffile.imread(FIELDS[0])
    protein = nucleus[::-1].copy()
    stack = np.stack([nucleus, protein])
    folder = tmp_path / "stacks" / "ACTB_ENSG00000075624"
    tifffile.imwrite(folder.mkdir(parents=True) or folder / "a_proj.ome.tif", stack)
    ((field,),) = [find_fields(tmp_path / "stacks")]
    assert (field.name, field.ensg, field.field) == (
        "ACTB",
        "ENSG00000075624",
        "a_proj.ome",
    )
    read = read_field(field)
    assert np.array_equal(read[0], nucleus) and np.array_equal(read[1], protein)
    swapped = read_field(field, RawLayout(nucleus_channel=1, protein_channel=0))
    assert np.array_equal(swapped[0], protein)

    layout = RawLayout(nucleus_file="{field}_405.tif", protein_file="{field}_488.tif")
    folder = tmp_path / "separate" / "LMNB1"
    _write_field(folder, "f1_405.tif", nucleus)
    _write_field(folder, "f1_488.tif", protein)
    (field,) = find_fields(tmp_path / "separate", layout)
    assert (field.name, field.ensg, field.field) == ("LMNB1", "", "f1")
    read = read_field(field, layout)
    assert np.array_equal(read[0], nucleus) and np.array_equal(read[1], protein)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a tiff at all", "not a readable TIFF"),
        (np.zeros((64, 64), np.uint8), "16-bit"),
        (np.zeros((64, 64), np.uint16), "protein channel is missing"),
        (np.full((2, 256, 256), 400, np.uint16), "no nuclei found"),
    ],
    ids=["unreadable", "8-bit", "one-channel", "blank"],
)
def test_bad_input_is_named_and_leaves_no_release(tmp_path, content, message):
    folder = tmp_path / "raw" / "TOMM20_ENSG00000173726"
    folder.mkdir(parents=True)
    path = folder / "field1.tif"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        tifffile.imwrite(path, content)
    out = tmp_path / "release"
    with pytest.raises(RawInputError, match=message) as error:
        crop_release(tmp_path / "raw", out)
    assert str(path) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_missing_protein_file_is_named(tmp_path):
    folder = tmp_path / "raw" / "TOMM20"
    _write_field(folder, "f1_405.tif", np.zeros((8, 8), np.uint16))
    layout = RawLayout(nucleus_file="{field}_405.tif", protein_file="{field}_488.tif")
    with pytest.raises(
        RawInputError, match=r"f1_405\.tif.*no protein file.*f1_488\.tif"
    ):
        find_fields(tmp_path / "raw", layout)


@needs_real
def test_crop_writes_a_release_that_prepare_and_the_builder_read(tmp_path, capsys):
    raw_dir = tmp_path / "raw"
    genes = {"ACTB_ENSG00000075624": FIELDS[1], "LMNB1_ENSG00000113368": FIELDS[5]}
    for folder, path in genes.items():
        nucleus = tifffile.imread(path)
        _write_field(raw_dir / folder, "f1_405.tif", nucleus)
        _write_field(raw_dir / folder, "f1_488.tif", np.roll(nucleus, 40, axis=1))
    annotations = tmp_path / "annotations.csv"
    annotations.write_text(
        "ensg,name,loc_grade1,loc_grade2\nENSG00000075624,ACTB,cytoplasmic,membrane\n"
    )
    out = tmp_path / "release"
    argv = ["crop", str(raw_dir), "--out", str(out), "--annotations", str(annotations)]
    argv += ["--nucleus-file", "{field}_405.tif", "--protein-file", "{field}_488.tif"]
    assert cli.main(argv) == 0
    # The command line prints the library's warning: the unannotated protein.
    assert "LMNB1_ENSG00000113368 is not in the annotation" in capsys.readouterr().err

    fields = pd.read_csv(out / "fields.csv")
    assert list(fields["FOV_id"]) == [0, 1]
    assert sorted(p.name for p in (out / "qc").iterdir())[0].startswith("00000_ACTB")
    assert len(list((out / "qc").iterdir())) == 2
    labels = pd.read_csv(out / "Label_data00.csv", dtype=str, keep_default_na=False)
    images = np.load(out / "Image_data00.npy", mmap_mode="r")
    assert images.shape == (fields["n_crops"].sum(), SIZE, SIZE, 4)
    assert images.dtype == np.float32
    actb = labels["name"] == "ACTB"
    assert actb.sum() == fields["n_crops"][0]
    assert set(labels.loc[actb, "loc_grade2"]) == {"membrane"}
    assert set(labels.loc[~actb, "loc_grade1"]) == {""}
    assert set(labels["protein_id"]) == {"0", "1"}

    assert cli.main(["prepare", str(out), "--channels", "0,1"]) == 0
    splits = DatasetBuilder(out, channels=(0, 1)).build(0, {"train": 0.5, "valid": 0.5})
    assert sum(len(s.labels) for s in splits.values()) == len(images)
    # The protein channel is the shifted nucleus, not a copy of it.
    assert not np.allclose(images[:, :, :, 0], images[:, :, :, 1])
    # A second run refuses to overwrite the release.
    assert cli.main(argv) == 1


@needs_real
def test_a_run_trained_on_cropped_fields_embeds_crops_of_other_fields(tmp_path):
    """The biologist's path: raw fields -> `crop` -> `train`, then the trained
    model applied with `embed --data` to crops of fields it never saw."""
    import anndata

    def crop(name: str, proteins: dict[str, list[Path]]) -> Path:
        raw_dir = tmp_path / f"raw_{name}"
        for folder, paths in proteins.items():
            for field, path in enumerate(paths):
                nucleus = tifffile.imread(path)
                protein = np.roll(nucleus, 40, axis=0)
                _write_field(raw_dir / folder, f"f{field}_405.tif", nucleus)
                _write_field(raw_dir / folder, f"f{field}_488.tif", protein)
        argv = ["crop", str(raw_dir), "--out", str(tmp_path / name)]
        argv += [
            "--nucleus-file",
            "{field}_405.tif",
            "--protein-file",
            "{field}_488.tif",
        ]
        assert cli.main(argv) == 0
        return tmp_path / name

    # Training splits by field of view (80/10/10): ten fields, two per protein,
    # from fields 0-4 (each in two proteins); the new folder holds fields 5, 6.
    seen = crop(
        "seen",
        {f"G{i}_ENSG0000000000{i}": [FIELDS[i], FIELDS[(i + 1) % 5]] for i in range(5)},
    )
    unseen = crop("unseen", {"H5_ENSG00000000105": [FIELDS[5], FIELDS[6]]})
    store = tmp_path / "run"
    tiny = ["--embedding-dim", "8", "--num-embeddings", "16", "--batch-size", "8"]
    train = ["train", "--data", str(seen), "--store", str(store), "--epochs", "1"]
    train += ["--max-frames", "80"]
    assert cli.main([*train, *tiny]) == 0

    out = tmp_path / "embeddings"
    assert (
        cli.main(
            ["embed", "--store", str(store), "--data", str(unseen), "--out", str(out)]
        )
        == 0
    )
    n_crops = pd.read_csv(unseen / "fields.csv")["n_crops"].tolist()
    proteins = anndata.read_h5ad(out / "unseen_proteins.h5ad")
    frames = anndata.read_h5ad(out / "unseen_frames.h5ad")
    assert frames.shape == (sum(n_crops), 16)
    # 100x100 crops: the 25x25 latent grid's codes, counted once each.
    assert (frames.X.sum(axis=1) == 25 * 25).all()
    assert proteins.obs["name"].tolist() == ["H5"]
    assert proteins.obs["n_frames"].tolist() == [sum(n_crops)]
