"""The data layer: cache, splits, batches and the chapter's helpers."""

import numpy as np
import pytest

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.utils import count_unique_proteins, get_dataset

SPLITS = {"train": 0.6, "valid": 0.2, "test": 0.2}


def test_batches_equal_raw_protein_channel_at_frame_id(tiny_release):
    path, images, _ = tiny_release
    splits = DatasetBuilder(path).build(rng=1, splits=SPLITS)
    seen = []
    for split in splits.values():
        for batch in split.get_batches(rng=3, batch_size=5):
            np.testing.assert_array_equal(
                batch["images"], images[batch["frame_ids"]][..., :1]
            )
            assert batch["images"].dtype == np.float32
            seen.append(batch["frame_ids"])
    assert len(np.concatenate(seen)) > 0


def test_channels_are_kept_in_the_order_asked(tiny_release):
    path, images, _ = tiny_release
    dataset = get_dataset(path, channels=(1, 0))
    batch = next(dataset.get_batches(None, 7, shuffle=False, drop_remainder=False))
    np.testing.assert_array_equal(batch["images"], images[:7][..., [1, 0]])
    assert dataset.get_dummy_input().shape == (1, 16, 16, 2)


@pytest.mark.parametrize("exclusive_by", ["fov_id", "protein_id"])
def test_splits_share_no_exclusive_set_and_cover_all_frames(tiny_release, exclusive_by):
    path, _, labels = tiny_release
    splits = DatasetBuilder(path).build(rng=0, splits=SPLITS, exclusive_by=exclusive_by)
    sets = [set(s.labels.lookup[exclusive_by]) for s in splits.values()]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]
    all_ids = np.concatenate([s.labels.frame_ids for s in splits.values()])
    assert sorted(all_ids) == list(range(len(labels)))


def test_same_seed_same_splits_and_batch_order(tiny_release):
    path, _, _ = tiny_release
    builder = DatasetBuilder(path)

    def run(seed):
        splits = builder.build(rng=seed, splits=SPLITS, n_proteins=5)
        ids = [tuple(s.labels.frame_ids) for s in splits.values()]
        order = [tuple(b["frame_ids"]) for b in splits["train"].get_batches(seed, 4)]
        return ids, order

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_class_codes_are_consecutive_and_one_per_protein(tiny_release):
    path, _, _ = tiny_release
    splits = DatasetBuilder(path).build(rng=2, splits=SPLITS, n_proteins=4)
    lookup = np.concatenate(
        [s.labels.lookup[["protein_id", "code"]] for s in splits.values()]
    )
    pairs = {tuple(row) for row in lookup}
    codes = sorted(code for _, code in pairs)
    assert codes == list(range(4))  # one code per protein, consecutive from 0
    assert len({p for p, _ in pairs}) == 4
    assert count_unique_proteins(splits) == 4


def test_max_frames_samples_from_all_chosen_proteins(tiny_release):
    path, _, _ = tiny_release
    splits = DatasetBuilder(path).build(rng=0, splits={"all": 1.0}, max_frames=30)
    lookup = splits["all"].labels.lookup
    assert len(lookup) == 30
    # Truncating in protein order (the book's defect) would keep only 3 proteins.
    assert lookup["protein_id"].nunique() == 6


def test_shuffled_epoch_drops_remainder_and_inference_keeps_every_frame(tiny_release):
    path, _, _ = tiny_release
    dataset = get_dataset(path)
    n = len(dataset)  # 72
    train = [b["frame_ids"] for b in dataset.get_batches(rng=0, batch_size=10)]
    assert [len(b) for b in train] == [10] * (n // 10)
    assert len(set(np.concatenate(train))) == n // 10 * 10
    infer = [
        b["frame_ids"]
        for b in dataset.get_batches(None, 10, shuffle=False, drop_remainder=False)
    ]
    np.testing.assert_array_equal(np.concatenate(infer), np.arange(n))


def test_localization_helpers(tiny_release):
    path, _, _ = tiny_release
    labels = get_dataset(path).labels
    predominant = labels.localizations("predominant")
    single = labels.localizations("single")
    names = labels.lookup["name"].to_numpy()
    # GENE0: er + golgi (grade 2) -> predominant er, not single.
    assert set(predominant[names == "GENE0"]) == {"er"}
    assert set(single[names == "GENE0"]) == {""}
    # GENE1: "mitochondria;cytoplasmic" -> predominant mitochondria, not single.
    assert set(predominant[names == "GENE1"]) == {"mitochondria"}
    assert set(single[names == "GENE2"]) == {"nucleoplasm"}


def test_plot_random_frames_titles_gene_and_localization(tiny_release):
    path, _, _ = tiny_release
    dataset = get_dataset(path)
    fig = dataset.plot_random_frames(n=24, rng=0)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    frame_ids = dataset.sample_frame_ids(24, rng=0)
    names = dataset.labels.lookup.set_index("frame_id").loc[frame_ids, "name"]
    expected = {
        "GENE0": "GENE0\ner (+1)",  # golgi in grade 2
        "GENE1": "GENE1\nmitochondria (+1)",
        "GENE2": "GENE2\nnucleoplasm",
    }
    assert len(titled) == 24
    for name, title in zip(names, titled, strict=True):
        if name in expected:
            assert title == expected[name]
    assert set(names) & set(expected)
    fig = dataset.plot_random_frames(
        n=4, rng=0, with_labels=False, gene_symbols=["GENE1"]
    )
    assert sum(bool(ax.get_images()) for ax in fig.axes) == 4
    assert not any(ax.get_title() for ax in fig.axes)
    with pytest.raises(ValueError, match="NOPE"):
        dataset.plot_random_frames(n=1, rng=0, gene_symbols=["NOPE"])


def test_from_arrays_encodes_labels():
    images = np.zeros((6, 8, 8, 1))
    dataset = Dataset.from_arrays(images, np.array([5, 5, 9, 9, 2, 2]))
    np.testing.assert_array_equal(dataset.labels.codes, [1, 1, 2, 2, 0, 0])
    assert dataset.image_shape == (8, 8, 1)
