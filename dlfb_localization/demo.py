"""The main job on the embedded sample: what README's first command runs.

The embedded sample is not stored as arrays: it is these generator parameters,
and `write_release` turns them into the OpenCell release format in seconds.
"""

import logging
from pathlib import Path

import jax
import matplotlib.pyplot as plt

from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.synthetic import SyntheticSpec, write_release

logger = logging.getLogger(__name__)

EMBEDDED_SAMPLE = SyntheticSpec(
    n_proteins=40, fovs_per_protein=4, crops_per_fov=10, n_blocks=2, seed=0
)
SPLITS = {"train": 0.80, "valid": 0.10, "test": 0.10}


def run(out_dir: str | Path, seed: int = 42) -> Path:
    """Writes the sample, builds the chapter's splits and its first figures.

    Args:
      out_dir: the run folder; the sample goes to `<out_dir>/data`.
      seed: the chapter's seed for splits and frame sampling.

    Returns:
      The run folder.
    """
    out = Path(out_dir)
    data = out / "data"
    print(f"writing the embedded sample ({EMBEDDED_SAMPLE}) to {data}")
    write_release(data, EMBEDDED_SAMPLE, progress=True)

    rng = jax.random.PRNGKey(seed)
    rng, rng_frames, rng_dataset = jax.random.split(rng, 3)
    builder = DatasetBuilder(data, progress=True)
    splits = builder.build(rng=rng_dataset, splits=SPLITS, exclusive_by="fov_id")
    for name, split in splits.items():
        print(f"  {name:>5}: {split}")

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    _save(
        splits["train"].plot_random_frames(n=16, rng=rng_frames),
        figures / "random_frames.png",
    )
    protein = splits["train"].labels.lookup["name"].iloc[0]
    _save(
        splits["train"].plot_random_frames(
            n=16, rng=rng_frames, with_labels=False, gene_symbols=[protein]
        ),
        figures / f"frames_{protein}.png",
    )
    print(f"run folder: {out.resolve()}")
    return out


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"  wrote {path}")
