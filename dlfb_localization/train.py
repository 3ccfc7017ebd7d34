"""Training of the model families (`model.interface`): one loss function, the
jitted steps, and `train`, which runs them through the shared epoch loop
(`loop.fit`)."""

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from dlfb_localization import checkpoint
from dlfb_localization.dataset import Dataset
from dlfb_localization.health import watch_health
from dlfb_localization.history import History
from dlfb_localization.loop import (
    DataParallel,
    NonFiniteLossError,
    check_batch_size,
    check_epochs,
    fit,
)
from dlfb_localization.model.interface import (
    AUGMENT_STREAM,
    FamilyOutputs,
    model_of,
)
from dlfb_localization.orientation import AUGMENT_MODES, random_orientation
from dlfb_localization.passes import (
    CPU_MICROBATCH,
    accumulate_passes,
    check_passes,
    combine_passes,
    default_microbatches,
    model_microbatches,
    program_passes,
    split_microbatches,
    training_rngs,
)

__all__ = [
    "CPU_MICROBATCH",
    "DataParallel",
    "NonFiniteLossError",
    "TrainState",
    "check_arguments",
    "compute_losses",
    "compute_metrics",
    "default_microbatches",
    "eval_step",
    "model_microbatches",
    "train",
    "train_step",
]

Batch = Mapping[str, np.ndarray | jax.Array]


def compute_losses(
    outputs: FamilyOutputs, batch: Batch, classification_weight: float | jax.Array
) -> dict[str, jax.Array]:
    """The training objective and its components, shared by training and eval:
    `outputs.losses(batch["labels"], classification_weight)`.

    For the chapter's model (`ModelOutputs.losses`): `total_loss = recon_loss +
    codebook_loss + commitment_loss + classification_weight *
    classification_loss`. For the full model (`CytoselfOutputs.losses`),
    cytoself's objective, with each level's terms suffixed `_local` and
    `_global`.

    Args:
      outputs: the model's `compute_outputs` for `batch["images"]`.
      batch: `{"images": [b, h, w, c] float32, "labels": [b] int}`.
      classification_weight: scalar weight of the classification loss.

    Returns:
      Scalars `total_loss`, `recon_loss`, `codebook_loss`, `commitment_loss`
      and `classification_loss` (mean cross-entropy, unweighted), and the
      family's own terms.
    """
    return outputs.losses(batch["labels"], classification_weight)


def compute_metrics(outputs: FamilyOutputs, batch: Batch) -> dict[str, jax.Array]:
    """Accuracy and codebook health of a batch (no gradient is taken of these):
    `outputs.metrics(batch["labels"])`.

    Returns:
      Scalars `accuracy`, `perplexity`, `codebook_used_fraction` (share of codes
      used at least once in the batch) and `codebook_max_share` (share of
      positions taken by the busiest code), `latent_norm` and `codebook_norm`
      (mean L2 norms of the encoder's output vectors and of the codes: a
      runaway encoder shows as the first growing away from the second); for
      the full model the same with `_local` and `_global` suffixes, `accuracy`
      being the global head's.
    """
    return outputs.metrics(batch["labels"])


def _compute_objective(
    params,
    state: TrainState,
    batch: Batch,
    classification_weight: jax.Array,
    is_training: bool,
    rngs: dict[str, jax.Array] | None,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, Any]]]:
    """Forward pass, losses and metrics: the one path both steps take.

    Returns `(total_loss, (metrics, codes))`, `codes` mapping each quantizer's
    parameter name to `(indices, latents)` (what code-use metrics over several
    passes and the codebook updates read)."""
    outputs = state.apply_fn(
        {"params": params},
        batch["images"],
        is_training=is_training,
        rngs=rngs,
        method="compute_outputs",
    )
    # None: an ablated head's weight, the number 0 (`_weight_argument`).
    weight = 0 if classification_weight is None else classification_weight
    losses = compute_losses(outputs, batch, weight)
    metrics = {**losses, **compute_metrics(outputs, batch)}
    codes = {
        name: (vq.indices, vq.latents) for name, vq in outputs.quantizers().items()
    }
    return losses["total_loss"], (metrics, codes)


# Folded into the step's key for the augmentation, a stream apart from dropout's
# (whose keys stay what they were without augmentation).
_AUGMENT_STREAM = 1_000_003
# The model's `AUGMENT_STREAM` key at evaluation: fixed, so that validation
# losses of masked or augmented objectives compare across epochs and runs.
_EVAL_SEED = 0


def train_step(
    state: TrainState,
    batch: Batch,
    rng_dropout: jax.Array,
    classification_weight: float | jax.Array,
    microbatches: int | None = None,
    augment: str = "none",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step.

    Dropout uses `fold_in(rng_dropout, state.step)`, so passing the same key at
    every step still gives fresh, reproducible masks (a resumed run repeats
    them). `state`'s buffers are donated: use the returned state.

    With `microbatches=m > 1` the batch is processed in `m` equal passes whose
    gradients are averaged before the one update: the same objective as one
    pass (every loss is a mean over equal-sized parts: only for a model whose
    `independent_samples` is true), in less memory. Metrics
    are those of the whole batch (code usage is counted over all passes).
    The passes run two to a compiled program (`passes.program_passes`), each
    program adding its gradients into the previous one's buffer, then one
    program applies the update. By default (None) the step picks the passes as
    `train` does on one device (`model_microbatches`), so the chapter's
    four-argument call `train_step(state, batch, rng, weight)` takes the fast
    path too: 16 passes of 16 for a batch of 256 on a CPU, one pass on GPU and
    TPU.

    With `augment="d4"` or `"rotate"` every image of the batch is first given
    its own random orientation (`invariance.random_orientation`), on the
    device, with keys from `fold_in(fold_in(rng_dropout, state.step),
    1_000_003)`: reproducible, and different at every step. A model's own
    views and masks (`model.interface.AUGMENT_STREAM`) draw from
    `fold_in(fold_in(rng_dropout, state.step), 1_000_033)`.

    Args:
      state: `TrainState` of a `LocalizationModel` or `CytoselfModel`.
      batch: `{"images": [b, h, w, c] float32, "labels": [b] int32}`; other keys
        are ignored.
      rng_dropout: JAX key for dropout.
      classification_weight: scalar weight of the classification loss, a
        Python number or a float32 array (traced, so sweeping it does not
        recompile). The number 0 (as the chapter's ablation passes it) leaves
        the head's term out of the gradient: the same objective and update,
        without the head's backward pass (its loss is still reported).
      microbatches: passes per step (static); must divide the batch size.
        None: `model_microbatches(state, batch size)`.
      augment: "none", "d4" (one of the 8 rotations by multiples of 90 degrees
        and flips) or "rotate" (any angle, plus a random flip); static.

    Returns:
      `(new_state, metrics)`; metrics are the scalars of `compute_losses` and
      `compute_metrics`, computed with the parameters before the update (on the
      augmented images).
    """
    if microbatches is None:
        microbatches = model_microbatches(state, batch["images"].shape[0])
    check_passes(batch, microbatches)
    classification_weight = _weight_argument(classification_weight)
    per_program = program_passes(microbatches)
    if per_program == microbatches:
        return _step_program(
            state,
            batch,
            rng_dropout,
            classification_weight,
            microbatches=microbatches,
            augment=augment,
        )
    rng = jax.random.fold_in(rng_dropout, state.step)
    parts = _split_program(
        rng, batch["images"], batch["labels"], passes=microbatches, augment=augment
    )
    grads, metrics, codes = None, [], []
    for first in range(0, microbatches, per_program):
        grads, part_metrics, part_codes = _passes_program(
            state,
            parts[first : first + per_program],
            classification_weight,
            rng,
            grads,
            jnp.int32(first),
        )
        metrics += part_metrics
        codes += part_codes
    return _update_program(state, grads, metrics, codes, rng)


def _weight_argument(classification_weight):
    """The weight as the compiled programs take it. The number 0 (a Python
    int or float, not an array) becomes None, which crosses `jit` as a
    constant where a number would be traced, so the programs for a weight of
    0 leave the head's term out of the objective
    (`model.interface.weighted_term`): its backward pass is not computed.
    Another Python number becomes a float32 scalar, so that 1 and 1.0 share
    one program and a sweep of weights compiles once; an array is passed as
    it is."""
    if isinstance(classification_weight, int | float):
        if classification_weight == 0:
            return None
        return np.float32(classification_weight)
    return classification_weight


def _orient(rng, images, augment):
    """The images, each given its random orientation unless `augment` is
    "none"."""
    if augment == "none":
        return images
    return random_orientation(jax.random.fold_in(rng, _AUGMENT_STREAM), images, augment)


@functools.partial(jax.jit, static_argnames=("passes", "augment"))
def _split_program(rng, images, labels, passes, augment):
    """The batch's `passes` parts (`split_microbatches`), after the images'
    random orientation."""
    batch = {"images": _orient(rng, images, augment), "labels": labels}
    return split_microbatches(batch, passes)


_value_and_grad = jax.value_and_grad(_compute_objective, has_aux=True)


def _update(state, grads, codes, rng):
    """The optimizer's update, then the model's non-gradient state (e.g. EMA
    codebooks) from the step's codes."""
    state = state.apply_gradients(grads=grads)
    if getattr(state, "collections", None) is not None:
        params, collections = model_of(state).update_collections(
            state.params, state.collections, codes, rng
        )
        state = state.replace(params=params, collections=collections)
    return state


@functools.partial(
    jax.jit, donate_argnums=0, static_argnames=("microbatches", "augment")
)
def _step_program(
    state, batch, rng_dropout, classification_weight, microbatches, augment
):
    """`train_step` as one program: its passes (all of them), then the update."""
    rng = jax.random.fold_in(rng_dropout, state.step)
    batch = {**batch, "images": _orient(rng, batch["images"], augment)}
    if microbatches == 1:
        (_, (metrics, codes)), grads = _value_and_grad(
            state.params, state, batch, classification_weight, True, training_rngs(rng)
        )
    else:
        parts = split_microbatches(batch, microbatches)
        summed = accumulate_passes(
            _value_and_grad, state, parts, classification_weight, rng
        )
        grads, metrics, codes = combine_passes(state, *summed)
    return _update(state, grads, codes, rng), metrics


@functools.partial(jax.jit, donate_argnums=4)
def _passes_program(state, parts, classification_weight, rng, grads, first):
    """The step's passes `parts`, from pass `first` on (traced, so that every
    program of a step but the first, which has no `grads` yet, is one
    compiled program), their gradients added to `grads` (the previous
    program's, donated). Without non-gradient state to update, only the codes'
    indices leave the program (the code-use metrics count them)."""
    grads, metrics, codes = accumulate_passes(
        _value_and_grad, state, parts, classification_weight, rng, first, grads
    )
    if getattr(state, "collections", None) is None:
        codes = [{name: (pair[0],) for name, pair in part.items()} for part in codes]
    return grads, metrics, codes


@functools.partial(jax.jit, donate_argnums=0)
def _update_program(state, grads, metrics, codes, rng):
    """The update from the gradients summed over all of the step's passes, and
    their metrics and codes (one entry per pass)."""
    grads, metrics, codes = combine_passes(state, grads, metrics, codes)
    return _update(state, grads, codes, rng), metrics


def eval_step(
    state: TrainState, batch: Batch, classification_weight: float | jax.Array
) -> dict[str, jax.Array]:
    """Losses and metrics without dropout or update (same names as training).
    A model's masks (`AUGMENT_STREAM`) come from one fixed key, the same at
    every call.

    Args:
      state: `TrainState` of a `LocalizationModel` or `CytoselfModel`.
      batch: `{"images": [b, h, w, c] float32, "labels": [b] int32}`.
      classification_weight: scalar weight of the classification loss.

    Returns:
      The scalars of `compute_losses` and `compute_metrics`.
    """
    return _eval_program(state, batch, _weight_argument(classification_weight))


@jax.jit
def _eval_program(state, batch, classification_weight):
    rngs = {AUGMENT_STREAM: jax.random.PRNGKey(_EVAL_SEED)}
    _, (metrics, _) = _compute_objective(
        state.params, state, batch, classification_weight, False, rngs
    )
    return metrics


def _check_classes(state: TrainState, dataset_splits: dict[str, Dataset]) -> None:
    # An out-of-range label makes the cross-entropy NaN, which would surface
    # only as a non-finite loss at the end of the first epoch. A model without
    # a classification head reads labels only as groups (contrastive positives).
    num_classes = getattr(model_of(state), "num_classes", None)
    if num_classes is None:
        return
    for name in ("train", "valid"):
        codes = dataset_splits[name].labels.codes
        if codes.size and int(codes.max()) >= num_classes:
            raise ValueError(
                f"the {name!r} split has protein class {int(codes.max())} but the "
                f"model's head predicts {num_classes} classes; build the model with "
                "num_classes=count_unique_proteins(dataset_splits)"
            )


def check_arguments(
    dataset_splits: dict[str, Dataset],
    num_epochs: int,
    batch_size: int,
    eval_every: int,
    augment: str,
) -> None:
    """Checks `train`'s arguments of these names, as `train` does first.

    Raises:
      ValueError: one is invalid; the message names it.
    """
    missing = {"train", "valid"} - set(dataset_splits)
    if missing:
        raise ValueError(f"dataset_splits needs the splits {sorted(missing)}")
    check_epochs(num_epochs, eval_every)
    if augment not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {AUGMENT_MODES}, got {augment!r}")
    n_devices = jax.device_count()
    if batch_size % n_devices:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the {n_devices} devices "
            "the batch is split over"
        )
    check_batch_size(batch_size, len(dataset_splits["train"]))


def train(
    state: TrainState,
    rng: jax.Array,
    dataset_splits: dict[str, Dataset],
    num_epochs: int,
    batch_size: int,
    classification_weight: float,
    eval_every: int = 10,
    store_path: str | os.PathLike | None = None,
    augment: str = "none",
    *,
    settings: Mapping[str, Any] | None = None,
    batches: Callable[[jax.Array], Iterable[Batch]] | None = None,
    steps_per_epoch: int | None = None,
    label: str | None = None,
) -> tuple[TrainState, History]:
    """Trains a model family (`model.interface`) epoch by epoch: a VQ-VAE,
    optionally with its protein-id head, or a ViT.

    Randomness comes from two keys split once from `rng`: `rng_data`, whose
    `fold_in(rng_data, epoch)` orders the training batches of that epoch (the
    dataset seeds a NumPy generator from it), and `rng_dropout`, which
    `train_step` folds with the step number. Both depend only on the epoch and
    step, so a resumed run repeats the randomness of an uninterrupted one.
    A batch is split into `default_microbatches` passes only for a model
    whose `independent_samples` is true; others train in one pass.

    The "valid" split is evaluated after epochs with `epoch % eval_every == 0`
    and after the last epoch, in order and without dropping frames.

    With `store_path`, an Orbax checkpoint (state, epoch, metrics, run
    configuration) is written after every epoch. Calling again with the same
    configuration restores a finished run without training, or resumes an
    interrupted one at the next epoch; a different configuration at the same
    path raises `checkpoint.ConfigMismatchError` naming the fields.

    Args:
      state: initial `TrainState` (e.g. `model.create_train_state(...)`). Its
        arrays are copied, not donated, so the caller's state stays usable.
      rng: JAX key for data order and dropout.
      dataset_splits: at least "train" and "valid" `Dataset`s.
      num_epochs: passes over the training split.
      batch_size: frames per step; the last partial training batch is dropped.
      classification_weight: weight of the classification loss; 0 ablates the
        head.
      eval_every: validate every this many epochs.
      store_path: folder for checkpoints, or None to keep nothing.
      augment: random orientation of the training images inside `train_step`:
        "none", "d4" or "rotate" (see `train_step`); validation never augments.
      settings: with `store_path`, the caller's own description of the run
        (JSON-ready), stored in the checkpoint and compared whole on a rerun:
        `runs.train_run` passes its `RunConfig`.
      batches: `batches(fold_in(rng_data, epoch))` -> that epoch's training
        batches of `batch_size` frames (e.g. P proteins x K crops,
        `dataset.protein_batches`), or None for the split's shuffled batches.
      steps_per_epoch: how many batches `batches` gives an epoch, for the
        progress bar (`loop.fit`); default the shuffled batches' count.
      label: names the run in its progress bar (`loop.fit`).

    Returns:
      `(state, metrics)`: the final state and `metrics[split][name]`, a list of
      `{"mean", "std", "epoch"}` records, for "train" (every epoch) and "valid"
      (evaluated epochs).

    After every epoch `health.check_health` looks for a codebook running away
    from the encoder, a collapsing perplexity and dead codes: a failing check
    is shown in the progress bar, recorded as `metrics["train"]["health_<check>"]`
    (1 when failing at that epoch) and, when it starts failing, warned about
    with the numbers and the remedy (`health.TrainingHealthWarning`).

    Raises:
      NonFiniteLossError: a loss became NaN or infinite; the message names the
        epoch and steps, and the last checkpoint on disk is left as it was.
      checkpoint.ConfigMismatchError: `store_path` holds a different run.
    """
    check_arguments(dataset_splits, num_epochs, batch_size, eval_every, augment)
    _check_classes(state, dataset_splits)
    parallel = DataParallel()
    state = parallel.place_state(state)
    rng_data, rng_dropout = jax.random.split(rng)
    microbatches = model_microbatches(state, batch_size, parallel.n_devices)
    config = None
    if store_path is not None:
        config = checkpoint.build_run_config(
            state,
            rng,
            dataset_splits,
            num_epochs=num_epochs,
            batch_size=batch_size,
            classification_weight=classification_weight,
            eval_every=eval_every,
            augment=augment,
            settings=settings,
        )

    # The steps with this run's arguments (looked up per call: tests replace them).
    def step(state: TrainState, batch: Batch):
        return train_step(
            state, batch, rng_dropout, classification_weight, microbatches, augment
        )

    def evaluate(state: TrainState, batch: Batch):
        return eval_step(state, batch, classification_weight)

    return fit(
        state,
        step,
        dataset_splits["train"],
        rng_data,
        num_epochs=num_epochs,
        batch_size=batch_size,
        parallel=parallel,
        evaluate=evaluate,
        eval_split=dataset_splits["valid"],
        eval_every=eval_every,
        on_epoch=watch_health,
        store_path=store_path,
        config=config,
        batches=batches,
        steps_per_epoch=steps_per_epoch,
        label=label,
    )
