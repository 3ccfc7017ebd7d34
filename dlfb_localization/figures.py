"""The chapter's figures for one or several trained models, written to files."""

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax.training.train_state import TrainState
from matplotlib.figure import Figure

from dlfb_localization.dataset import Dataset
from dlfb_localization.embeddings import (
    EMBEDDING_KINDS,
    aggregate_by_protein,
    aggregate_localizations,
    aggregate_proteins,
    cluster_feature_spectrums,
    get_frame_embeddings,
    histogram_levels,
    label_tables,
)
from dlfb_localization.files import replace_when_written
from dlfb_localization.history import History
from dlfb_localization.inference import (
    can_reconstruct,
    has_attention_maps,
    reconstructs_masked_patches,
)
from dlfb_localization.inspect.attention import show_attention
from dlfb_localization.inspect.codebook import plot_codebook_usage
from dlfb_localization.inspect.embeddings.clustering import (
    Projection,
    calculate_projection,
    plot_projection,
)
from dlfb_localization.inspect.embeddings.feature_spectrum import (
    plot_encoding_corr_heatmap,
    plot_stacked_histograms,
)
from dlfb_localization.inspect.interactive import write_interactive_map
from dlfb_localization.inspect.mae import show_mae_reconstructions
from dlfb_localization.inspect.metrics import plot_losses, plot_perplexity
from dlfb_localization.inspect.reconstruction import show_reconstruction
from dlfb_localization.scoring import nearest_neighbours

logger = logging.getLogger(__name__)

__all__ = ["save_figure", "write_embedding_map", "write_model_figures"]

N_CODE_GROUPS = 8  # the chapter's n_clusters for the feature spectra
MAP_NEIGHBOURS = 5  # as the report's protein-level k-NN
# The map's frames tab shows at most this many frames (a seeded sample beyond),
# each with a 32-pixel thumbnail. Measured on the demo's 150 unseen proteins
# and 1,174 frames: 3.6 MB, of which BokehJS 1.65 MB, thumbnails 1.2 kB a
# frame and 2.4 kB a protein; so the real release's 1,311 proteins with 2,000
# frames come to about 8 MB.
MAP_MAX_FRAMES = 2000


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


_FEATURE_TEXT = {
    "frame_histograms": "codebook histogram",
    "frame_vectors": "mean quantized vector",
    "frame_pooled": "attention-pooled embedding",
}


def projected_feature(frame_embeddings: Sequence[Mapping[str, np.ndarray]]) -> str:
    """What `umap.png` and `map.html` place frames by: the first embedding of
    `EMBEDDING_KINDS` every model has, so the codebook histograms (the
    chapter's) for the VQ-VAEs and the pooled tokens for a ViT.

    Raises:
      ValueError: the models share no embedding (a ViT beside a VQ-VAE): draw
        them with separate `figures` commands.
    """
    for feature in EMBEDDING_KINDS:
        if all(feature in e for e in frame_embeddings):
            return feature
    raise ValueError(
        "the models share no kind of embedding to place their frames in one "
        "UMAP (a ViT's pooled tokens beside a VQ-VAE's codes?); draw each "
        "family's runs with its own figures command"
    )


def write_embedding_map(
    path: str | os.PathLike,
    dataset_split: Dataset,
    frame_embeddings: Mapping[str, np.ndarray],
    projection: Projection,
    *,
    title: str = "Embedding map",
    k: int = MAP_NEIGHBOURS,
    max_frames: int = MAP_MAX_FRAMES,
    seed: int = 0,
) -> Path:
    """`map.html`: the interactive map (`inspect.interactive`) of one model.

    Each protein sits at the mean position of its frames in `projection` (the
    frame UMAP that `umap.png` draws), coloured by its predominant
    localization; its hover shows the first channel (the protein in the
    chapter's data) of its first frame. Clicking it lists its `k` nearest
    proteins by the Hellinger distance between their mean codebook histograms
    (`aggregate_proteins`), the distance and protein embedding of the report's
    protein-level k-NN, not by distance on the map. The frames tab shows every
    frame, or a `seed`ed sample of `max_frames` of them.

    Args:
      path: the `.html` file to write.
      dataset_split: the split the frames belong to (labels and crops).
      frame_embeddings: `get_frame_embeddings` of one model on the split.
      projection: the frames' 2-D positions (`calculate_projection`).
      title: the page's heading.
      k: neighbours listed per protein.
      max_frames: most frames in the frames tab.
      seed: chooses the frames shown when there are more than `max_frames`.

    Returns:
      `path`.
    """
    feature = projected_feature([frame_embeddings])
    frame_ids = np.asarray(frame_embeddings["frame_ids"], dtype=np.int64)
    protein_ids, protein_features = aggregate_proteins(
        dataset_split, frame_ids, frame_embeddings[feature]
    )
    xy_ids, protein_xy = aggregate_by_protein(
        dataset_split, projection.frame_ids, projection.coordinates
    )
    if not np.array_equal(xy_ids, protein_ids):
        raise ValueError("the projection and the embeddings hold other proteins")
    frames, proteins = label_tables(dataset_split, projection.frame_ids)
    metric = EMBEDDING_KINDS[feature][1]
    if len(protein_ids) > 1:
        neighbours, distances = nearest_neighbours(protein_features, k=k, metric=metric)
    else:  # a lone protein has none to list
        neighbours, distances = np.zeros((1, 0), np.int64), np.zeros((1, 0))

    images = dataset_split.images.frames
    first_frames = frames.groupby("protein_id")["frame_id"].min()
    thumbnails = images[first_frames.loc[protein_ids].to_numpy()][..., 0]
    shown = np.arange(len(frames))
    if len(shown) > max_frames:
        generator = np.random.default_rng(seed)
        shown = np.sort(generator.choice(shown, size=max_frames, replace=False))
    frames = frames.iloc[shown]
    frame_thumbnails = images[frames["frame_id"].to_numpy()][..., 0]
    note = (
        f"{len(proteins)} proteins, each at the centre of its frames in the UMAP "
        f"of the frames' {_FEATURE_TEXT[feature]}s (as in umap.png), coloured by its "
        "predominant localization. Hover for its gene, localizations and a crop; "
        "click it for its nearest proteins."
    )
    if len(shown) < len(projection.frame_ids):
        note += (
            f" The frames tab shows {len(shown)} of the "
            f"{len(projection.frame_ids)} frames (seed {seed})."
        )
    return write_interactive_map(
        path,
        protein_xy=protein_xy,
        protein_table=proteins,
        neighbours=neighbours,
        neighbour_distances=distances,
        thumbnails=thumbnails,
        frame_xy=projection.coordinates[shown],
        frame_table=frames,
        frame_thumbnails=frame_thumbnails,
        title=title,
        note=note,
        neighbour_note=f" by {metric.capitalize()} distance of mean "
        f"{_FEATURE_TEXT[feature]}s (not distance on the map)",
    )


def write_model_figures(
    models: Mapping[str, tuple[TrainState, History | None]],
    dataset_split: Dataset,
    out_dir: str | os.PathLike,
    *,
    rng: jax.Array | int = 0,
    titles: Mapping[str, str] | None = None,
    frame_embeddings: Mapping[str, dict] | None = None,
    map_model: str | None = None,
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
    model), and `map.html`, an interactive map of one model's proteins and
    frames on its panel of that UMAP (`write_embedding_map`; open it in a
    browser): of `map_model`, by default the first model (the first `--store`
    of the `figures` command). A model without codebooks (a ViT) gets what it
    has: its losses, `attention_<name>.png` (where its pooling looks),
    `mae_<name>.png` where its objective reconstructs (masked crops, the
    decoder's fill and the originals) and the UMAP and map of its pooled
    embeddings (`projected_feature`).

    Args:
      models: name -> (state, training metrics or None).
      dataset_split: the frames to show and embed.
      out_dir: folder for the files (created if needed).
      rng: key or seed choosing the frames shown in reconstructions.
      titles: name -> readable title (default: the names).
      frame_embeddings: name -> `get_frame_embeddings` results, if already
        computed (e.g. by `evaluate`); computed here otherwise.
      map_model: the model `map.html` shows (default: the first).

    Returns:
      figure name -> path, in the order written.
    """
    map_name = next(iter(models)) if map_model is None else map_model
    if map_name not in models:
        raise ValueError(f"map_model {map_name!r} is none of the models {list(models)}")
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
        if can_reconstruct(state):
            fig = show_reconstruction(dataset_split, state, n=8, rng=rng)
            fig.suptitle(f"{titles[name]}: frames and reconstructions", y=1.02)
            save(f"reconstructions_{name}", fig)
        if has_attention_maps(state):
            fig = show_attention(dataset_split, state, n=8, rng=rng)
            fig.suptitle(f"{titles[name]}: where the pooling looks", y=1.02)
            save(f"attention_{name}", fig)
        if reconstructs_masked_patches(state):
            fig = show_mae_reconstructions(dataset_split, state, n=6, rng=rng)
            fig.suptitle(f"{titles[name]}: masked patches filled in", y=1.02)
            save(f"mae_{name}", fig)
        if metrics is not None:
            fig = plot_losses(metrics)
            fig.suptitle(titles[name], y=1.02)
            save(f"losses_{name}", fig)
            if histogram_levels(embeddings[name]):  # a model with codebooks
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

    feature = projected_feature([embeddings[name] for name in models])
    if len(models) == 1:
        projection = calculate_projection(
            embeddings[next(iter(models))], feature=feature
        )
    else:
        projection = calculate_projection(
            {name: embeddings[name] for name in models}, feature=feature
        )
    save(
        "umap",
        plot_projection(
            projection, dataset_split, titles=[titles[name] for name in models]
        ),
    )
    written["map"] = write_embedding_map(
        out / "map.html",
        dataset_split,
        embeddings[map_name],
        projection if len(models) == 1 else projection[map_name],
        title=f"{titles[map_name]}: proteins in the embedding",
    )
    return written
