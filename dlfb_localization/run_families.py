"""The model families a run can train (`runs.RunConfig.model`), each built
from a run's settings: its module, its optimizer and its training batches.

The VQ-VAE families (the chapter's `LocalizationModel` and `CytoselfModel`)
train with Adam on the split's shuffled batches, as the chapter does. The
ViT trains as SubCell does: AdamW (betas 0.9 and 0.95, weight decay 0.05,
learning rate 1e-4, warmed up then decayed: `vit_learning_rate`) and, when
its objective has the protein-specific (supervised contrastive) task,
batches of P proteins x K crops, so that every batch holds positives. The
run's code (`runs`, `train`) asks this table, never which family it holds.

Adding a family: its module under `model/` (`model.interface`) and an entry
in `MODELS`.
"""

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax

from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.protein_batches import (
    iterate_protein_batches,
    plan_split_batches,
)
from dlfb_localization.model import LocalizationModel
from dlfb_localization.model.contrastive import OBJECTIVES
from dlfb_localization.model.cytoself import CytoselfModel
from dlfb_localization.model.vit import VIT_SIZES, ViTModel

__all__ = [
    "MODELS",
    "VQ_FAMILIES",
    "Family",
    "TrainBatches",
    "adam",
    "vit_learning_rate",
    "vit_optimizer",
]

# `RunConfig` is passed in as `config` (it imports this module).
Config = Any


class TrainBatches(NamedTuple):
    """How a run's training batches are drawn.

    Attributes:
      batch_size: frames per step.
      batches: `batches(key)` -> one epoch's batches (`train.train`'s
        `batches`), or None for the split's shuffled batches.
      steps_per_epoch: batches an epoch gives: `len(train_split) //
        batch_size` for shuffled batches; for P x K batches, the count of one
        plan (seed 0), as another epoch's draw can leave a batch more or
        fewer (`plan_protein_batches`).
    """

    batch_size: int
    batches: Callable[[jax.Array], Iterable[dict]] | None
    steps_per_epoch: int


class Family(NamedTuple):
    """What a run needs to train one model family.

    Attributes:
      build: `build(config, common, init_sample)` -> the module; `common` holds
        the settings every VQ family shares (`runs.build_model`),
        `init_sample()` a seeded sample of training frames.
      optimizer: `optimizer(config, steps_per_epoch)` -> the optax
        transformation; `steps_per_epoch` is `TrainBatches.steps_per_epoch`
        (what a schedule over the run's steps needs).
      learning_rate: the learning rate a run gets when it names none.
      train_batches: `train_batches(config, train_split)` -> `TrainBatches`;
        raises ValueError if the split cannot give them.
    """

    build: Callable[[Config, dict, Callable[[], np.ndarray]], nn.Module]
    optimizer: Callable[[Config, int], optax.GradientTransformation]
    learning_rate: float
    train_batches: Callable[[Config, Dataset], TrainBatches]


def _chapter_model(config: Config, common: dict, init_sample) -> nn.Module:
    return LocalizationModel(**common, encoder_type=config.encoder)


def _cytoself_model(config: Config, common: dict, init_sample) -> nn.Module:
    variance = 1.0
    if not config.standardize_inputs:
        variance = float(np.var(init_sample()))
    return CytoselfModel(
        **common, global_splits=config.global_splits, data_variance=variance
    )


def _vit_model(config: Config, common: dict, init_sample) -> nn.Module:
    return ViTModel(
        size=VIT_SIZES[config.vit_size],
        patch_size=config.patch_size,
        objective=OBJECTIVES[config.objective],
        standardize_inputs=config.standardize_inputs,
        dtype=config.compute_dtype,
    )


# The ViT's schedule: linear warm-up over this share of the run's steps (at
# least one), then cosine decay to this share of the peak at its last step.
WARMUP_SHARE = 0.05
END_SHARE = 0.01


# One optimizer object per setting in a process (`functools.cache` on the
# functions that build them). `jit` keys a step's compiled program by the
# train state's static fields, the optimizer among them, and optax keeps its
# settings in closures, so two `optax.adam(1e-3)` are different keys: a second
# run with the same settings (the demo's second model, `compare`'s next seed, a
# resumed run) now reuses the first one's traced and compiled steps. optax's
# transformations are pure functions, so runs can share one.
@functools.cache
def adam(learning_rate: float) -> optax.GradientTransformation:
    """The chapter's Adam at a constant `learning_rate` (one object per rate)."""
    return optax.adam(learning_rate)


def _adam(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    # The chapter's constant rate: the VQ families' runs stay what they were.
    del steps_per_epoch
    return adam(config.learning_rate)


def vit_learning_rate(learning_rate: float, num_steps: int) -> optax.Schedule:
    """The ViT's learning rate by step, as SubCell warms up then decays it:
    from 0 linearly up to `learning_rate` over `WARMUP_SHARE` of the run's
    `num_steps` (at least one step), then down a cosine to `END_SHARE` of it
    at the run's last step (and there after, should a P x K epoch give a batch
    more than planned).

    A function of the optimizer's own step count, which is checkpointed with
    its state: a resumed run continues the schedule where it stopped.
    """
    if num_steps < 1:
        raise ValueError(f"a run needs at least one step, got {num_steps}")
    warmup = max(1, round(WARMUP_SHARE * num_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup,
        # optax counts the warm-up in `decay_steps`; the last step is n - 1.
        decay_steps=max(num_steps - 1, warmup + 1),
        end_value=END_SHARE * learning_rate,
    )


@functools.cache
def vit_optimizer(
    learning_rate: float, num_steps: int, weight_decay: float = 0.05
) -> optax.GradientTransformation:
    """SubCell's AdamW (betas 0.9 and 0.95) at `vit_learning_rate` over a
    run of `num_steps` steps (one object per setting, as `adam`)."""
    return optax.adamw(
        vit_learning_rate(learning_rate, num_steps),
        b1=0.9,
        b2=0.95,
        weight_decay=weight_decay,
    )


def _adamw(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    return vit_optimizer(
        config.learning_rate, config.num_epochs * steps_per_epoch, config.weight_decay
    )


def _shuffled_batches(config: Config, train_split: Dataset) -> TrainBatches:
    return TrainBatches(config.batch_size, None, len(train_split) // config.batch_size)


def _vit_batches(config: Config, train_split: Dataset) -> TrainBatches:
    """P x K batches (`dataset.protein_batches`) when the objective's
    supervised contrastive task is on (its positives share a protein), else
    the split's shuffled batches. Checked on the split before training: a
    split that cannot give one batch is refused here, not after the first
    checkpoint's configuration is written."""
    if OBJECTIVES[config.objective].supcon_weight == 0:
        return _shuffled_batches(config, train_split)
    p, k = config.proteins_per_batch, config.crops_per_protein
    plan = plan_split_batches(train_split, p, k, 0)
    if not len(plan):
        raise ValueError(
            f"the train split gives no batch of {p} proteins x {k} crops; lower "
            "--proteins-per-batch or --crops-per-protein"
        )
    return TrainBatches(
        p * k,
        functools.partial(iterate_protein_batches, train_split, p, k),
        len(plan),
    )


# The families a run can train (`RunConfig.model`).
MODELS: dict[str, Family] = {
    "chapter": Family(_chapter_model, _adam, 1e-3, _shuffled_batches),
    "cytoself": Family(_cytoself_model, _adam, 1e-3, _shuffled_batches),
    "vit": Family(_vit_model, _adamw, 1e-4, _vit_batches),
}
# The families whose settings are the VQ-VAE's (codebook, head, encoder).
VQ_FAMILIES = ("chapter", "cytoself")
