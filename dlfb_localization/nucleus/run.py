"""`dlfb-localization predict`: train, evaluate on held-out fields of view, write.

    out/
      checkpoints/unet  Orbax checkpoints of the U-Net, after each epoch (the
                        last two kept), and checkpoints/gan
      config.json       the PredictConfig
      training.json     each model's loss per epoch
      evaluation.json   `evaluate_predictions` on the test fields of view
      predictions.png   `plot_predictions` of a few test frames
      .lock             while a process writes the folder (`locks.lock_folder`)

Each model is trained in the shared epoch loop (`loop.fit`) with an Orbax
checkpoint (`dlfb_localization.checkpoint`) written after every epoch, with
the run's configuration and the training history so far beside it. Run again
with the same settings, a finished model is restored instead of trained and
an interrupted one resumes at the epoch after its last checkpoint, ending
bit-identical to an uninterrupted run; with other settings on the same
folder, the run is refused, naming the differences.
"""

import dataclasses
import os
from pathlib import Path

import jax
import optax

from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.utils import count_unique_proteins
from dlfb_localization.figures import save_figure
from dlfb_localization.files import write_json
from dlfb_localization.locks import lock_folder
from dlfb_localization.nucleus.config import PredictConfig
from dlfb_localization.nucleus.evaluate import evaluate_predictions
from dlfb_localization.nucleus.figures import plot_predictions
from dlfb_localization.nucleus.model import ConditionalUNet, PatchDiscriminator
from dlfb_localization.nucleus.train import (
    create_gan_state,
    create_unet_state,
    train_gan,
    train_unet,
)

__all__ = ["SPLITS", "run_prediction"]

# Exclusive by field of view: test fields are unseen, their proteins are known.
SPLITS = {"train": 0.8, "test": 0.2}
N_FIGURE_FRAMES = 6
# The settings that decide both models (the data's fingerprint is recorded too).
_SHARED_SETTINGS = (
    "seed",
    "image_size",
    "features",
    "depth",
    "embedding_dim",
    "num_epochs",
    "batch_size",
)


def run_prediction(config: PredictConfig, out_dir: str | os.PathLike) -> dict:
    """Trains the U-Net (and the GAN), evaluates them on held-out fields of view
    and writes the files listed in the module docstring.

    One process at a time writes `out_dir`: it is locked first.

    Returns:
      The `evaluate_predictions` result (models "unet" and, with `config.gan`,
      "gan").

    Raises:
      locks.FolderLockedError: another process is writing `out_dir`.
    """
    with lock_folder(out_dir):
        return _run_prediction(config, Path(out_dir))


def _run_prediction(config: PredictConfig, out: Path) -> dict:
    splits = DatasetBuilder(
        config.data, channels=(0, 1), cache_dir=config.cache_dir
    ).build(rng=config.seed, splits=SPLITS, exclusive_by="fov_id")
    rng_unet, rng_gan, rng_frames = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    unet = ConditionalUNet(
        num_proteins=count_unique_proteins(splits),
        features=config.features,
        depth=config.depth,
        embedding_dim=config.embedding_dim,
    )
    # The settings recorded beside each model: only what decides it, so a U-Net
    # stored without --gan is reused with it.
    settings = {name: getattr(config, name) for name in _SHARED_SETTINGS}
    train_kwargs = {
        "train_split": splits["train"],
        "num_epochs": config.num_epochs,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
    }
    rng_init, rng_data = jax.random.split(rng_unet)
    histories = {}
    unet_state, histories["unet"] = train_unet(
        create_unet_state(
            unet, rng_init, config.image_size, optax.adam(config.learning_rate)
        ),
        rng_data,
        store_path=out / "checkpoints" / "unet",
        settings={**settings, "learning_rate": config.learning_rate},
        **train_kwargs,
    )
    models = {"unet": unet_state}
    gan_state = None
    if config.gan:
        rng_init, rng_data = jax.random.split(rng_gan)
        gan_state, histories["gan"] = train_gan(
            create_gan_state(
                unet,
                PatchDiscriminator(features=config.features),
                rng_init,
                config.image_size,
                config.gan_learning_rate,
            ),
            rng_data,
            l1_weight=config.l1_weight,
            store_path=out / "checkpoints" / "gan",
            settings={
                **settings,
                "gan_learning_rate": config.gan_learning_rate,
                "l1_weight": config.l1_weight,
            },
            **train_kwargs,
        )
        models["gan"] = gan_state.generator

    write_json(dataclasses.asdict(config), out / "config.json")
    write_json(histories, out / "training.json")
    result = evaluate_predictions(
        models,
        splits["train"],
        splits["test"],
        image_size=config.image_size,
        out_path=out / "evaluation.json",
    )
    fig = plot_predictions(
        splits["test"],
        unet_state,
        image_size=config.image_size,
        gan=None if gan_state is None else gan_state.generator,
        n_frames=min(N_FIGURE_FRAMES, len(splits["test"])),
        rng=rng_frames,
    )
    save_figure(fig, out / "predictions.png")
    return result
