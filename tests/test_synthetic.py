"""The synthetic OpenCell generator: format, determinism and what the pixels show."""

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest

from dlfb_localization.dataset.localizations import LOCALIZATIONS_OF_INTEREST
from dlfb_localization.dataset.sources import discover_blocks
from dlfb_localization.dataset.synthetic import (
    LABEL_COLUMNS,
    PATTERNS,
    SECOND_STYLE,
    SyntheticSpec,
    SyntheticStyle,
    generate_protein,
    write_release,
    write_sample_format,
)
from dlfb_localization.dataset.synthetic.render import _render_fov
from dlfb_localization.dataset.synthetic.spec import _plan

# Tiny but real-sized crops: 9 proteins (all of the chapter's nine), 2 FOVs each.
TINY = SyntheticSpec(n_proteins=9, fovs_per_protein=2, crops_per_fov=2, n_blocks=3)


def _read_release(path, n_blocks):
    images = [np.load(path / f"Image_data{b:02d}.npy") for b in range(n_blocks)]
    labels = [
        pd.read_csv(path / f"Label_data{b:02d}.csv", dtype=str, keep_default_na=False)
        for b in range(n_blocks)
    ]
    return images, labels


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "release"
    written = write_release(path, TINY)
    return path, written


@pytest.fixture(scope="module")
def every_pattern():
    """One protein per localization, no secondaries: {pattern: frames}."""
    spec = SyntheticSpec(
        n_proteins=20, fovs_per_protein=1, crops_per_fov=3, secondary_fraction=0.0
    )
    result = {}
    for index in range(spec.n_proteins):
        frames, labels = generate_protein(spec, index)
        result.setdefault(labels["loc_grade1"].iloc[0], frames)
    return result


def test_writes_blocks_with_matching_csv_rows_and_exact_header(tiny_release):
    path, written = tiny_release
    names = [p.name for p in written]
    assert names == [
        f"{kind}_data{b:02d}.{ext}"
        for b in range(3)
        for kind, ext in (("Image", "npy"), ("Label", "csv"))
    ]
    assert not list(path.glob("*.tmp"))
    images, labels = _read_release(path, 3)
    for image, label, block in zip(images, labels, range(3), strict=True):
        assert image.dtype == np.float32
        assert image.shape[1:] == (100, 100, 4)
        assert len(image) == len(label) > 0
        header = (path / f"Label_data{block:02d}.csv").read_text().splitlines()[0]
        assert header == "ensg,name,loc_grade1,loc_grade2,loc_grade3,protein_id,FOV_id"
        assert "nan" not in (path / f"Label_data{block:02d}.csv").read_text()
    table = pd.concat(labels, ignore_index=True)
    assert tuple(table.columns) == LABEL_COLUMNS
    # Frames are ordered by protein, then FOV; every FOV has at least one crop.
    protein = table["protein_id"].astype(int).to_numpy()
    fov = table["FOV_id"].astype(int).to_numpy()
    assert (np.diff(protein) >= 0).all() and (np.diff(fov) >= 0).all()
    assert sorted(set(protein)) == list(range(TINY.n_proteins))
    assert table.groupby("protein_id")["FOV_id"].nunique().eq(2).all()


def test_same_seed_writes_identical_bytes_and_another_seed_differs(
    tiny_release, tmp_path
):
    _, written = tiny_release
    again = write_release(tmp_path / "again", TINY)
    for first, second in zip(written, again, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name
    other = write_release(tmp_path / "other", dataclasses.replace(TINY, seed=1))
    a = np.load(written[0], mmap_mode="r")
    b = np.load(other[0], mmap_mode="r")
    n = min(len(a), len(b))
    assert not np.array_equal(a[:n, ..., 0], b[:n, ..., 0])
    assert not np.array_equal(a[:n, ..., 3], b[:n, ..., 3])


def test_channel_semantics_and_crops_centred_on_a_nucleus(tiny_release):
    path, _ = tiny_release
    images, _ = _read_release(path, 3)
    frames = np.concatenate(images)
    protein, nucleus, distance, segmentation = np.moveaxis(frames, -1, 0)
    for channel in (protein, nucleus):
        assert np.isfinite(channel).all()
        assert channel.min() >= 0 and channel.max() <= 1
        # Per-FOV scaling: bright structures reach ~1, the background stays low.
        assert np.median(channel) < 0.5 < channel.max()
    assert np.isfinite(distance).all()
    assert set(np.unique(segmentation)) == {0.0, 1.0}
    np.testing.assert_array_equal(segmentation == 1, distance > 0)
    assert (distance[segmentation == 0] < 0).all()
    assert (segmentation[:, 50, 50] == 1).all()
    # The crop's own nucleus is ~35 px across (OpenCell at cytoself's scale).
    assert 12 <= np.median(distance[:, 50, 50]) <= 22
    # Hoechst is bright in nuclei and dark outside them.
    assert nucleus[segmentation == 1].mean() > 4 * nucleus[segmentation == 0].mean()


def test_fov_ids_are_unique_to_one_protein(tiny_release):
    path, _ = tiny_release
    _, labels = _read_release(path, 3)
    table = pd.concat(labels, ignore_index=True)
    assert table.groupby("FOV_id")["protein_id"].nunique().eq(1).all()
    assert table.groupby("protein_id")[["ensg", "name"]].nunique().eq(1).all().all()
    assert table.groupby("name")["protein_id"].nunique().eq(1).all()
    assert all(re.fullmatch(r"ENSG9\d{10}", e) for e in table["ensg"])


def test_localization_labels():
    spec = SyntheticSpec(n_proteins=40, fovs_per_protein=1, crops_per_fov=1)
    rows = pd.concat(
        [generate_protein(spec, i)[1].iloc[:1] for i in range(spec.n_proteins)]
    )
    main = rows["loc_grade1"].str.split(";").str[0]
    assert set(main) <= set(PATTERNS)
    assert set(LOCALIZATIONS_OF_INTEREST) <= set(main)
    # About three quarters on the chapter's nine, the rest on the extras.
    assert 0.6 <= main.isin(LOCALIZATIONS_OF_INTEREST).mean() <= 0.85
    assert set(main) - set(LOCALIZATIONS_OF_INTEREST)
    # Secondary localizations: exactly the requested share, all known names.
    secondary = rows["loc_grade1"].str.contains(";") | (rows["loc_grade2"] != "")
    secondary |= rows["loc_grade3"] != ""
    assert secondary.sum() == round(spec.secondary_fraction * spec.n_proteins)
    for column in ("loc_grade1", "loc_grade2", "loc_grade3"):
        for cell in rows[column]:
            assert set(filter(None, cell.split(";"))) <= set(PATTERNS)


def test_nine_proteins_cover_the_chapters_nine():
    spec = SyntheticSpec(n_proteins=9, fovs_per_protein=1, crops_per_fov=1)
    main = {generate_protein(spec, i)[1]["loc_grade1"].iloc[0] for i in range(9)}
    assert {m.split(";")[0] for m in main} == set(LOCALIZATIONS_OF_INTEREST)


def _inside_outside(frames):
    protein, segmentation = frames[..., 0], frames[..., 3] == 1
    return protein[segmentation].mean(), protein[~segmentation].mean()


@pytest.mark.parametrize(
    "pattern", ["nucleoplasm", "chromatin", "nucleolus_gc", "nuclear_punctae"]
)
def test_nuclear_patterns_are_brighter_inside_nuclei(every_pattern, pattern):
    inside, outside = _inside_outside(every_pattern[pattern])
    # Outside is mostly noise; nucleoli cover only part of each nucleus.
    assert inside > 2 * outside


@pytest.mark.parametrize(
    "pattern",
    ["cytoplasmic", "mitochondria", "er", "golgi", "vesicles", "membrane"],
)
def test_cytoplasmic_patterns_are_dim_inside_nuclei(every_pattern, pattern):
    inside, outside = _inside_outside(every_pattern[pattern])
    assert inside < 0.5 * outside


def test_nuclear_membrane_is_concentrated_at_the_nuclear_boundary(every_pattern):
    frames = every_pattern["nuclear_membrane"]
    protein, distance = frames[..., 0], frames[..., 2]
    rim = np.abs(distance) < 3
    assert protein[rim].mean() > 4 * protein[~rim].mean()


def test_punctate_patterns_are_sparse_and_bright(every_pattern):
    # A few bright pixels hold most of the signal, unlike diffuse patterns.
    def top_share(frames):
        values = np.sort(frames[..., 0].ravel())[::-1]
        return values[: values.size // 50].sum() / values.sum()

    diffuse = top_share(every_pattern["cytoplasmic"])
    for pattern in ("centrosome", "golgi", "nucleolus_fc_dfc"):
        assert top_share(every_pattern[pattern]) > 2 * diffuse, pattern


def test_a_secondary_localization_is_visible():
    # The same nucleoplasmic protein without and with a cytoplasmic pool at grade 2.
    spec = SyntheticSpec(n_proteins=1, fovs_per_protein=1, crops_per_fov=3, n_blocks=1)
    protein = dataclasses.replace(
        _plan(spec)[0],
        components=(("nucleoplasm", 1.0),),
        diffuse=0.0,
        brightness=500.0,
    )
    both = dataclasses.replace(
        protein, components=(("nucleoplasm", 1.0), ("cytoplasmic", 0.3))
    )
    ratios = []
    for p in (protein, both):
        frames = _render_fov(spec, p, 0)
        cytoplasm = (frames[..., 3] == 0) & (frames[..., 0] > 0)
        nucleus = frames[..., 3] == 1
        ratios.append(frames[..., 0][cytoplasm].mean() / frames[..., 0][nucleus].mean())
    assert ratios[0] < 0.1
    assert 0.15 < ratios[1] < 0.6


def test_generate_protein_equals_its_release_rows(tiny_release):
    path, _ = tiny_release
    images, labels = _read_release(path, 3)
    frames = np.concatenate(images)
    table = pd.concat(labels, ignore_index=True)
    protein_ids = table["protein_id"].astype(int).to_numpy()
    block = np.repeat(np.arange(3), [len(i) for i in images])
    spans = pd.Series(block).groupby(protein_ids).nunique()
    straddling = list(spans.index[spans > 1])
    assert straddling  # The block split falls inside a protein here.
    for index in {0, TINY.n_proteins - 1, *straddling}:
        rows = np.flatnonzero(protein_ids == index)
        expected_frames, expected_labels = generate_protein(TINY, index)
        np.testing.assert_array_equal(frames[rows], expected_frames)
        got = table.iloc[rows].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected_labels.astype(str))


def test_sample_format_round_trips(tmp_path):
    spec = SyntheticSpec(n_proteins=2, fovs_per_protein=1, crops_per_fov=2)
    written = write_sample_format(tmp_path, spec)
    assert len(written) == 8
    for index in range(2):
        frames, labels = generate_protein(spec, index)
        name = labels["name"].iloc[0]
        pro = np.load(tmp_path / f"{name}_pro.npy")
        nuc = np.load(tmp_path / f"{name}_nuc.npy")
        dist = np.load(tmp_path / f"{name}_nucdist.npy")
        assert pro.dtype == nuc.dtype == np.uint16 and dist.dtype == np.float32
        assert pro.shape == nuc.shape == dist.shape == frames.shape[:3]
        np.testing.assert_allclose(pro / 65535, frames[..., 0], atol=1 / 65535)
        np.testing.assert_allclose(nuc / 65535, frames[..., 1], atol=1 / 65535)
        np.testing.assert_array_equal(dist, frames[..., 2])
        with pytest.raises(ValueError, match="pickle"):
            np.load(tmp_path / f"{name}_label.npy")
        label = np.load(tmp_path / f"{name}_label.npy", allow_pickle=True)
        assert label.dtype == object and label.shape == (len(frames), 3)
        main = labels["loc_grade1"].iloc[0].split(";")[0]
        assert (label == [labels["ensg"].iloc[0], name, main]).all()


def test_the_reader_finds_what_the_writers_write(tiny_release, tmp_path):
    # Reader and writers share the formats' names: every block and protein written
    # is found, in order, with its pixels and labels.
    path, _ = tiny_release
    images, labels = _read_release(path, 3)
    blocks = discover_blocks(path, (0, 1, 2, 3))
    assert [b.name for b in blocks] == [f"Image_data{b:02d}.npy" for b in range(3)]
    for block, frames, table in zip(blocks, images, labels, strict=True):
        np.testing.assert_array_equal(block.read(0, len(frames), (0, 1, 2, 3)), frames)
        got = block.read_labels()
        assert list(got["fov_id"]) == list(table["FOV_id"].astype(int))
        assert list(got["loc_grade1"]) == list(table["loc_grade1"])

    spec = SyntheticSpec(n_proteins=2, fovs_per_protein=1, crops_per_fov=2)
    write_sample_format(tmp_path, spec)
    blocks = discover_blocks(tmp_path, (0, 1, 2), trust_pickled_labels=True)
    assert len(blocks) == 2
    for index, block in enumerate(blocks):
        frames, labels = generate_protein(spec, index)
        assert block.name == f"{labels['name'].iloc[0]}_pro.npy"
        np.testing.assert_array_equal(
            block.read(0, len(frames), (2,))[..., 0], frames[..., 2]
        )
        assert list(block.read_labels()["ensg"]) == list(labels["ensg"])


def test_rewriting_with_fewer_blocks_removes_stale_ones(tmp_path):
    spec = SyntheticSpec(n_proteins=2, fovs_per_protein=2, crops_per_fov=1, n_blocks=4)
    write_release(tmp_path, spec)
    (tmp_path / "notes.txt").write_text("keep me")
    write_release(tmp_path, dataclasses.replace(spec, n_blocks=2), progress=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "Image_data00.npy",
        "Image_data01.npy",
        "Label_data00.csv",
        "Label_data01.csv",
        "notes.txt",
    ]


def test_small_crops_keep_cells_at_their_real_size():
    spec = SyntheticSpec(
        n_proteins=1, fovs_per_protein=1, crops_per_fov=4, n_blocks=1, image_size=32
    )
    frames, labels = generate_protein(spec, 0)
    assert frames.shape == (len(labels), 32, 32, 4)
    assert (frames[:, 16, 16, 3] == 1).all()


def test_the_second_style_changes_the_look_and_keeps_the_plan():
    spec = SyntheticSpec(n_proteins=3, fovs_per_protein=1, crops_per_fov=6, n_blocks=1)
    second = dataclasses.replace(spec, style=SECOND_STYLE)

    def roughness(protein):  # high-frequency share: noise and fine detail
        return np.std(np.diff(protein, axis=1)) / np.std(protein)

    for index in range(3):
        frames, labels = generate_protein(spec, index)
        other_frames, other_labels = generate_protein(second, index)
        # Same proteins, localizations and crop counts: only pixels change.
        pd.testing.assert_frame_equal(labels, other_labels)
        # Smaller nuclei (the distance to the nuclear boundary at the centre)...
        assert np.median(other_frames[:, 50, 50, 2]) < 0.9 * np.median(
            frames[:, 50, 50, 2]
        )
        # ...and dimmer, noisier proteins.
        assert roughness(other_frames[..., 0]) > roughness(frames[..., 0])
    with pytest.raises(ValueError, match="brightness"):
        SyntheticStyle(brightness=0.0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_proteins": 0}, "n_proteins"),
        ({"fovs_per_protein": 0}, "fovs_per_protein"),
        ({"crops_per_fov": 0}, "crops_per_fov"),
        ({"n_blocks": 0}, "n_blocks"),
        ({"n_blocks": 9, "n_proteins": 2, "fovs_per_protein": 4}, "n_blocks"),
        ({"image_size": 8}, "image_size"),
        ({"secondary_fraction": 1.5}, "secondary_fraction"),
        ({"seed": -1}, "seed"),
        ({"n_proteins": 2.5}, "n_proteins"),
    ],
)
def test_spec_validation_names_the_field(change, field):
    with pytest.raises((ValueError, TypeError), match=field):
        SyntheticSpec(**change)


def test_protein_index_out_of_range():
    with pytest.raises(IndexError, match="n_proteins"):
        generate_protein(SyntheticSpec(n_proteins=2), 2)


def test_symlinks_at_the_old_temporary_names_are_not_written_through(tmp_path):
    # The names the writers used before were predictable (`<file>.tmp`).
    out = tmp_path / "release"
    out.mkdir()
    spec = SyntheticSpec(
        n_proteins=2, fovs_per_protein=1, crops_per_fov=2, n_blocks=1, image_size=32
    )
    targets = {}
    for name in ("Image_data00.npy", "Label_data00.csv"):
        targets[name] = tmp_path / f"precious_{name}"
        targets[name].write_text("not yours")
        (out / f"{name}.tmp").symlink_to(targets[name])
    write_release(out, spec)
    for name, target in targets.items():
        assert target.read_text() == "not yours"
        assert (out / f"{name}.tmp").is_symlink()
    write_release(tmp_path / "reference", spec)
    for name in targets:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
