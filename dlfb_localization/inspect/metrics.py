"""Training curves: loss components and codebook perplexity per epoch."""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dlfb_localization.history import History

__all__ = ["plot_losses", "plot_perplexity"]

_LOSS_COMPONENTS = (
    "recon_loss",
    "global_recon_loss",  # CytoselfModel only
    "codebook_loss",
    "commitment_loss",
    "classification_loss",
)


def _curve(metrics: History, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs (1-based, as the progress bar counts) and means of one metric."""
    records = metrics.get(split, {}).get(name, [])
    epochs = np.array([r["epoch"] + 1 for r in records], dtype=int)
    means = np.array([r["mean"] for r in records], dtype=float)
    return epochs, means


def _require(metrics: History, split: str, name: str) -> None:
    if not metrics.get(split, {}).get(name):
        raise ValueError(
            f"metrics has no {split!r} records of {name!r}; pass the metrics that "
            "train() returned"
        )


def _finish(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, framealpha=0.8)


def plot_losses(metrics: History) -> Figure:
    """Loss components on the training split (left), total train vs valid (right).

    The left panel has a log scale: the classification loss is orders of
    magnitude above the others, and on a linear scale they would look flat.
    The classification loss is shown unweighted, as `train` logs it.

    Args:
      metrics: `metrics[split][name]` records from `train`.

    Returns:
      The Figure with two axes.
    """
    _require(metrics, "train", "total_loss")
    fig, (ax_parts, ax_total) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    for name in _LOSS_COMPONENTS:
        epochs, means = _curve(metrics, "train", name)
        if len(epochs):
            label = f"{name} (unweighted)" if name == "classification_loss" else name
            ax_parts.plot(epochs, means, marker="o", ms=3, label=label)
    ax_parts.set_yscale("log")
    _finish(ax_parts, "Loss components (train)", "loss (log scale)")

    for split in ("train", "valid"):
        epochs, means = _curve(metrics, split, "total_loss")
        if len(epochs):
            ax_total.plot(epochs, means, marker="o", ms=3, label=split)
    _finish(ax_total, "Total loss", "loss")
    fig.tight_layout()
    return fig


def plot_perplexity(metrics: History) -> Figure:
    """Codebook perplexity per epoch on the training and validation splits.

    Perplexity is the exponential of the entropy of code use in a batch (1 when
    one code is used, K when all are used equally); `train` logs the
    batch-size-weighted mean over an epoch's batches. A `CytoselfModel`'s run
    has one curve per codebook (local and global).

    Args:
      metrics: `metrics[split][name]` records from `train`.

    Returns:
      The Figure with one axis.
    """
    # The chapter's one codebook, or a CytoselfModel's two.
    names = [
        n
        for n in ("perplexity", "perplexity_local", "perplexity_global")
        if metrics.get("train", {}).get(n)
    ]
    _require(metrics, "train", names[0] if names else "perplexity")
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name in names:
        level = name.removeprefix("perplexity").lstrip("_")
        for split in ("train", "valid"):
            epochs, means = _curve(metrics, split, name)
            if len(epochs):
                label = f"{level} codes, {split}" if level else split
                ax.plot(epochs, means, marker="o", ms=3, label=label)
    # From 0, so a drop reads as large only when it is.
    ax.set_ylim(bottom=0)
    _finish(ax, "Codebook perplexity (per batch)", "perplexity")
    fig.tight_layout()
    return fig
