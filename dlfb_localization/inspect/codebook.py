"""How a split uses the codebook: sorted code shares and health numbers."""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from dlfb_localization.embeddings import compute_codebook_health

__all__ = ["plot_codebook_usage"]


def plot_codebook_usage(frame_histograms: np.ndarray, title: str = "") -> Figure:
    """Share of each code over a split, codes sorted from most to least used.

    A healthy codebook shows a long, gently falling curve; a collapsing one a
    few tall bars and a long run of unused codes. The title gives perplexity,
    the fraction of codes used and the busiest code's share
    (`compute_codebook_health`, also `evaluate`'s).

    Args:
      frame_histograms: `[n, K]` per-frame code counts (from
        `get_frame_embeddings`).
      title: first title line (e.g. the model's name).

    Returns:
      The Figure with one axis.
    """
    frame_histograms = np.asarray(frame_histograms)
    if frame_histograms.ndim != 2:
        raise ValueError(
            f"frame_histograms must be [n_frames, K], got {frame_histograms.shape}"
        )
    counts = frame_histograms.sum(axis=0).astype(np.float64)
    health = compute_codebook_health(counts)
    shares = np.sort(counts / counts.sum())[::-1]
    used = int(np.count_nonzero(shares))

    fig, ax = plt.subplots(figsize=(8.0, 3.8))
    ax.bar(np.arange(used) + 1, shares[:used], width=1.0, color="#1f77b4")
    ax.set_yscale("log")
    ax.set_xlim(0.5, len(shares) + 0.5)
    ax.axhline(1 / len(shares), color="black", lw=0.8, ls="--", label="uniform (1/K)")
    if used < len(shares):
        # Unused codes have no bar on a log scale: shade where they would be.
        ax.axvspan(used + 0.5, len(shares) + 0.5, color="0.9", label="unused codes")
    ax.legend(frameon=False, loc="upper right")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("share of positions (log scale)")
    stats = (
        f"perplexity {health['perplexity']:.1f} of {health['num_embeddings']}, "
        f"used {health['used_fraction']:.0%}, largest share "
        f"{health['max_share']:.1%} ({len(frame_histograms)} frames)"
    )
    ax.set_title(f"{title}\n{stats}" if title else f"Codebook usage\n{stats}")
    fig.tight_layout()
    return fig
