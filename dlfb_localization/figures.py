"""The chapter's figures for one or several trained models, written to files."""

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import matplotlib.pyplot as plt
from flax.training.train_state import TrainState
from matplotlib.figure import Figure

from dlfb_localization.dataset import Dataset
from dlfb_localization.embeddings import (
    aggregate_localizations,
    aggregate_proteins,
    cluster_feature_spectrums,
    get_frame_embeddings,
    histogram_levels,
)
from dlfb_localization.files import replace_when_written
from dlfb_localization.history import History
from dlfb_localization.inspect.codebook import plot_codebook_usage
from dlfb_localization.inspect.embeddings.clustering import (
    calculate_projection,
    plot_projection,
)
from dlfb_localization.inspect.embeddings.feature_spectrum import (
    plot_encoding_corr_heatmap,
    plot_stacked_histograms,
)
from dlfb_localization.inspect.metrics import plot_losses, plot_perplexity
from dlfb_localization.inspect.reconstruction import show_reconstruction

logger = logging.getLogger(__name__)

__all__ = ["save_figure", "write_model_figures"]

N_CODE_GROUPS = 8  # the chapter's n_clusters for the feature spectra


def save_figure(fig: Figure, path: Path) -> Path:
    """Saves a figure as PNG through `files.replace_when_written`, and closes it."""
    try:
        with replace_when_written(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    logger.info("wrote %s", path)
    return path


def _save_spectra(
    save, name: str, title: str, dataset_split: Dataset, frame_ids, histograms
) -> None:
    """`codebook_`, `feature_correlation_` and `feature_spectra_<name>.png`."""
    save(f"codebook_{name}", plot_codebook_usage(histograms, title))
    protein_ids, protein_histograms = aggregate_proteins(
        dataset_split, frame_ids, histograms
    )
    corr_idx_idx, tree, encoding_clusters = cluster_feature_spectrums(
        protein_histograms, n_clusters=N_CODE_GROUPS
    )
    fig = plot_encoding_corr_heatmap(corr_idx_idx, tree, encoding_clusters)
    fig.suptitle(f"{title}: codes used together across proteins")
    save(f"feature_correlation_{name}", fig)
    localizations, localization_histograms = aggregate_localizations(
        dataset_split, protein_ids, protein_histograms
    )
    if localizations:
        fig = plot_stacked_histograms(
            localizations, localization_histograms, tree, encoding_clusters
        )
        fig.suptitle(f"{title}: feature spectrum per localization")
        save(f"feature_spectra_{name}", fig)


def write_model_figures(
    models: Mapping[str, tuple[TrainState, History | None]],
    dataset_split: Dataset,
    out_dir: str | os.PathLike,
    *,
    rng: jax.Array | int = 0,
    titles: Mapping[str, str] | None = None,
    frame_embeddings: Mapping[str, dict] | None = None,
) -> dict[str, Path]:
    """Writes the chapter's figures for each model, and one UMAP of them all.

    Per model `<name>`: `reconstructions_<name>.png`, `codebook_<name>.png`,
    `feature_correlation_<name>.png` (code-code correlation heatmap with its
    dendrogram, figure 6-15), `feature_spectra_<name>.png` (mean spectrum per
    localization, figure 6-16) and, where metrics are given, `losses_<name>.png`
    and `perplexity_<name>.png`; for a `CytoselfModel` also the codebook and
    feature-spectrum figures of its global codes (`<name>_global`). For all
    models together: `umap.png`, an
    AlignedUMAP of their codebook histograms (figure 6-14; a plain UMAP for one
    model).

    Args:
      models: name -> (state, training metrics or None).
      dataset_split: the frames to show and embed.
      out_dir: folder for the PNG files (created if needed).
      rng: key or seed choosing the frames shown in reconstructions.
      titles: name -> readable title (default: the names).
      frame_embeddings: name -> `get_frame_embeddings` results, if already
        computed (e.g. by `evaluate`); computed here otherwise.

    Returns:
      figure name -> path, in the order written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    titles = {name: (titles or {}).get(name, name) for name in models}
    embeddings = dict(frame_embeddings or {})
    written: dict[str, Path] = {}

    def save(key: str, fig: Figure) -> None:
        written[key] = save_figure(fig, out / f"{key}.png")

    for name, (state, metrics) in models.items():
        if name not in embeddings:
            embeddings[name] = get_frame_embeddings(state, dataset_split)
        fig = show_reconstruction(dataset_split, state, n=8, rng=rng)
        fig.suptitle(f"{titles[name]}: frames and reconstructions", y=1.02)
        save(f"reconstructions_{name}", fig)
        if metrics is not None:
            fig = plot_losses(metrics)
            fig.suptitle(titles[name], y=1.02)
            save(f"losses_{name}", fig)
            fig = plot_perplexity(metrics)
            fig.suptitle(titles[name], y=1.02)
            save(f"perplexity_{name}", fig)
        # Every level's codes: the chapter's one; a `CytoselfModel`'s global
        # level as well (`<name>_global`).
        for level, key in histogram_levels(embeddings[name]).items():
            title = titles[name] + (f" ({level[1:]} codes)" if level else "")
            _save_spectra(
                save,
                f"{name}{level}",
                title,
                dataset_split,
                embeddings[name]["frame_ids"],
                embeddings[name][key],
            )

    if len(models) == 1:
        projection = calculate_projection(embeddings[next(iter(models))])
    else:
        projection = calculate_projection({name: embeddings[name] for name in models})
    save(
        "umap",
        plot_projection(
            projection, dataset_split, titles=[titles[name] for name in models]
        ),
    )
    return written
