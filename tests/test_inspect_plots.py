"""Figures: each returns a Figure with the axes, titles and data it promises."""

import jax
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax
import pytest
import tiny
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import leaves_list

from dlfb_localization.dataset import Dataset
from dlfb_localization.evaluate import reconstruct
from dlfb_localization.inspect.codebook import plot_codebook_usage
from dlfb_localization.inspect.embeddings.clustering import (
    LOCALIZATION_COLORS,
    Projection,
    plot_projection,
)
from dlfb_localization.inspect.embeddings.feature_spectrum import (
    plot_encoding_corr_heatmap,
    plot_stacked_histograms,
    plot_stacked_histrograms,
    to_roman,
)
from dlfb_localization.inspect.embeddings.utils import cluster_feature_spectrums
from dlfb_localization.inspect.metrics import plot_losses, plot_perplexity
from dlfb_localization.inspect.reconstruction import show_reconstruction
from dlfb_localization.model import LocalizationModel


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def make_split(n: int = 24) -> Dataset:
    rng = np.random.default_rng(0)
    proteins = np.arange(n) % 4
    localizations = np.array(["er", "golgi;er", "nucleoplasm", "membrane"])
    return Dataset.from_arrays(
        rng.random((n, 16, 16, 1), dtype=np.float32),
        proteins,
        names=[f"GENE{p}" for p in proteins],
        localizations=localizations[proteins],
    )


def make_metrics(epochs: int = 3) -> dict:
    def records(values, step=1):
        return [
            {"mean": float(v), "std": 0.0, "epoch": e}
            for e, v in zip(range(0, epochs, step), values, strict=False)
        ]

    names = ("recon_loss", "codebook_loss", "commitment_loss", "classification_loss")
    train = {
        name: records(np.linspace(1, 0.5, epochs) * (i + 1))
        for i, name in enumerate(names)
    }
    train["total_loss"] = records(np.linspace(9, 5, epochs))
    train["perplexity"] = records([10.0, 20.0, 30.0])
    valid = {
        "total_loss": records([9.5, 6.0], step=2),
        "perplexity": records([8.0, 25.0], step=2),
    }
    return {"train": train, "valid": valid}


def test_show_reconstruction_pairs_titled_inputs_with_their_reconstructions():
    split = make_split()
    model = LocalizationModel(**tiny.CHAPTER)
    state = model.create_train_state(
        jax.random.key(0), split.get_dummy_input(), optax.adam(1e-3)
    )

    fig = show_reconstruction(split, state, n=3, rng=5)

    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6
    frame_ids = split.sample_frame_ids(3, 5)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1::2] == ["reconstruction"] * 3
    for title, frame_id in zip(titles[::2], frame_ids, strict=True):
        protein = frame_id % 4
        main = ["er", "golgi (+1)", "nucleoplasm", "membrane"][protein]
        assert title == f"GENE{protein}\n{main}"
    expected = np.asarray(reconstruct(state, split.images.frames[frame_ids]))
    for i, ax in enumerate(fig.axes[1::2]):
        np.testing.assert_allclose(ax.images[0].get_array(), expected[i, ..., 0])
    # Input and reconstruction share the input's grey scale.
    assert fig.axes[0].images[0].get_clim() == fig.axes[1].images[0].get_clim()


def test_plot_losses_draws_four_components_and_train_vs_valid():
    fig = plot_losses(make_metrics())
    assert len(fig.axes) == 2
    parts, total = fig.axes
    assert parts.get_title() == "Loss components (train)"
    assert [line.get_label() for line in parts.get_lines()] == [
        "recon_loss",
        "codebook_loss",
        "commitment_loss",
        "classification_loss (unweighted)",
    ]
    assert [line.get_label() for line in total.get_lines()] == ["train", "valid"]
    np.testing.assert_array_equal(total.get_lines()[1].get_xdata(), [1, 3])


def test_plot_perplexity_draws_train_and_valid_per_epoch():
    fig = plot_perplexity(make_metrics())
    (ax,) = fig.axes
    train, valid = ax.get_lines()
    np.testing.assert_array_equal(train.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(train.get_ydata(), [10, 20, 30])
    np.testing.assert_array_equal(valid.get_ydata(), [8, 25])
    assert ax.get_ylim()[0] == 0


def test_plot_losses_without_records_says_what_to_pass():
    with pytest.raises(ValueError, match="train"):
        plot_losses({"valid": {}})


def test_codebook_usage_title_reports_health():
    histograms = np.array([[3, 1, 0, 0], [1, 3, 0, 0]])
    fig = plot_codebook_usage(histograms, title="model")
    (ax,) = fig.axes
    assert ax.get_title() == (
        "model\nperplexity 2.0 of 4, used 50%, largest share 50.0% (2 frames)"
    )
    heights = [patch.get_height() for patch in ax.patches if patch.get_height() > 0]
    assert heights[:2] == [0.5, 0.5]


def test_plot_projection_colours_the_nine_and_greys_the_rest():
    split = make_split()
    ids = split.labels.frame_ids
    rng = np.random.default_rng(0)
    panels = {
        name: Projection(ids, rng.random((len(ids), 2)).astype(np.float32))
        for name in ("no_head", "with_head")
    }

    fig = plot_projection(panels, split, titles=["No head", "With head"])

    assert len([ax for ax in fig.axes if ax.get_title()]) == 2
    left = fig.axes[0]
    assert left.get_title() == "No head\n(24 frames)"
    colours = [
        to_hex(c)
        for collection in left.collections
        for c in collection.get_facecolors()[:1]
    ]
    # "membrane" is not among the nine: grey; er and nucleoplasm in their colours.
    assert LOCALIZATION_COLORS["er"] in colours
    assert LOCALIZATION_COLORS["nucleoplasm"] in colours
    highlighted = left.collections[-1]
    # One highlighted frame per coloured class (1% of 6 rounds up to one).
    assert len(highlighted.get_offsets()) == 3
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["er", "golgi", "nucleoplasm", "other / none"]


def test_plot_projection_single_mode_leaves_multi_localized_proteins_grey():
    split = make_split()
    ids = split.labels.frame_ids
    projection = Projection(ids, np.zeros((len(ids), 2), np.float32))
    fig = plot_projection(projection, split, subset_mode="single")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["er", "nucleoplasm", "other / none"]
    assert fig.axes[0].get_title() == "UMAP\n(24 frames)"


def spectra():
    rng = np.random.default_rng(0)
    groups = np.array([0, 1, 0, 1, 2, 2, -1, 0])
    activity = rng.gamma(2.0, 1.0, size=(30, 3))
    noise = rng.uniform(0.9, 1.1, size=(30, 8))
    histograms = np.where(groups >= 0, activity[:, np.maximum(groups, 0)] * noise, 0)
    return histograms, *cluster_feature_spectrums(histograms, n_clusters=3)


def test_corr_heatmap_is_in_dendrogram_order_with_tree_bar_and_colorbar():
    _, corr, tree, clusters = spectra()
    fig = plot_encoding_corr_heatmap(corr, tree, clusters)
    assert len(fig.axes) == 4
    ax_tree, ax_bar, ax_heat, ax_cbar = fig.axes
    order = leaves_list(tree)
    shown = ax_heat.images[0].get_array()
    np.testing.assert_array_equal(shown.mask, np.isnan(corr[np.ix_(order, order)]))
    np.testing.assert_allclose(
        shown.filled(0), np.nan_to_num(corr[np.ix_(order, order)])
    )
    # Groups are numbered left to right; the constant code has its own mark.
    groups = [
        t.get_text() for t in sorted(ax_bar.texts, key=lambda t: t.get_position()[0])
    ]
    assert [g for g in groups if g != "–"] == ["I", "II", "III"]
    assert groups.count("–") == 1
    assert "Pearson" in ax_tree.get_title()
    assert ax_cbar.get_ylabel() == "Pearson correlation"


def test_stacked_histograms_one_row_per_localization_codes_in_tree_order():
    histograms, _, tree, clusters = spectra()
    names = ["er", "golgi", "nucleoplasm"]
    rows = histograms[:3]

    fig = plot_stacked_histograms(names, rows, tree, clusters)

    assert len(fig.axes) == 3
    labels = {ax.get_ylabel(): ax for ax in fig.axes}
    assert set(labels) == set(names)
    order = leaves_list(tree)
    # One filled step outline per row: bar i spans [i, i + 1].
    (steps,) = labels["golgi"].patches
    values, edges, baseline = steps.get_data()
    np.testing.assert_allclose(values, rows[1, order])
    np.testing.assert_array_equal(edges, np.arange(rows.shape[1] + 1))
    assert baseline == 0 and steps.get_fill()
    group_names = {t.get_text() for t in fig.axes[0].texts}
    assert group_names == {"I", "II", "III", "–"}
    assert plot_stacked_histrograms is plot_stacked_histograms


def test_roman_numerals():
    assert [to_roman(i) for i in (1, 4, 8, 9, 12, 14, 40)] == [
        "I",
        "IV",
        "VIII",
        "IX",
        "XII",
        "XIV",
        "XL",
    ]


def test_plots_leave_rcparams_and_global_random_state_alone():
    rc_before = dict(matplotlib.rcParams)
    # The legacy global generator is exactly what plots must not touch.
    _, keys_before, position_before, *_ = np.random.get_state()  # noqa: NPY002
    split = make_split()
    ids = split.labels.frame_ids
    histograms, corr, tree, clusters = spectra()

    plot_losses(make_metrics())
    plot_perplexity(make_metrics())
    plot_codebook_usage(np.ones((2, 4), int))
    plot_projection(Projection(ids, np.zeros((len(ids), 2), np.float32)), split)
    plot_encoding_corr_heatmap(corr, tree, clusters)
    plot_stacked_histograms(["er"], histograms[:1], tree, clusters)

    assert dict(matplotlib.rcParams) == rc_before
    _, keys_after, position_after, *_ = np.random.get_state()  # noqa: NPY002
    np.testing.assert_array_equal(keys_after, keys_before)
    assert position_after == position_before
