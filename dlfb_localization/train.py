"""Training of the model families (`model.interface`): one loss function, the
jitted steps, and `train`, which runs them through the shared epoch loop
(`loop.fit`)."""

import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState
from tqdm.auto import tqdm

from dlfb_localization import checkpoint
from dlfb_localization.dataset import Dataset
from dlfb_localization.health import (
    TrainingHealthWarning,
    check_health,
    health_metrics,
)
from dlfb_localization.history import History, HistoryLogger
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
    usage_metrics,
)
from dlfb_localization.orientation import AUGMENT_MODES, random_orientation

__all__ = [
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
    losses = compute_losses(outputs, batch, classification_weight)
    metrics = {**losses, **compute_metrics(outputs, batch)}
    codes = {
        name: (vq.indices, vq.latents) for name, vq in outputs.quantizers().items()
    }
    return losses["total_loss"], (metrics, codes)


# Frames per device in one forward/backward pass of a CPU train step. At the
# chapter's batch of 256, XLA:CPU's scratch for one pass is ~3 GiB: every step
# page-faults it in, and the activations fall out of cache between layers.
# Four passes of 64 with their gradients summed do the same arithmetic in
# 2.1 GiB and run ~1.5x faster (benchmarks/bench_train_step.py). Accelerators
# keep the whole batch in one pass.
CPU_MICROBATCH = 64


def default_microbatches(batch_size: int, n_devices: int = 1) -> int:
    """How many passes `train_step` splits a batch into on this backend.

    `batch_size // (64 * n_devices)` on CPU when that divides the batch evenly
    (so every pass has the same size and the summed gradient is exactly the
    full batch's), else 1; always 1 on GPU and TPU.
    """
    per_pass = CPU_MICROBATCH * n_devices
    if jax.default_backend() != "cpu" or batch_size % per_pass:
        return 1
    return max(batch_size // per_pass, 1)


def model_microbatches(state: TrainState, batch_size: int, n_devices: int = 1) -> int:
    """The passes `train` gives a step of the state's model: 1 for a model
    whose samples are not `independent_samples` (a contrastive loss compares
    a batch's samples), else `default_microbatches`."""
    if not getattr(model_of(state), "independent_samples", True):
        return 1
    return default_microbatches(batch_size, n_devices)


def _split_microbatches(batch: Batch, microbatches: int) -> list[Batch]:
    # Pass i takes frames i, i + m, i + 2m, ...: a batch split over devices in
    # contiguous blocks then gives every device the same share of every pass,
    # with no data moved between devices.
    def take(x, i):
        return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])[:, i]

    return [
        {key: take(batch[key], i) for key in ("images", "labels")}
        for i in range(microbatches)
    ]


# Folded into the step's key for the augmentation, a stream apart from dropout's
# (whose keys stay what they were without augmentation).
_AUGMENT_STREAM = 1_000_003
# Folded into the step's (or pass's) key for the model's own `AUGMENT_STREAM`
# (a ViT's views and masks): apart from dropout's and the orientation's keys,
# which stay what they were before models drew from it.
_VIEW_STREAM = 1_000_033
# The model's `AUGMENT_STREAM` key at evaluation: fixed, so that validation
# losses of masked or augmented objectives compare across epochs and runs.
_EVAL_SEED = 0


def _training_rngs(rng: jax.Array) -> dict[str, jax.Array]:
    """The rng streams of one training pass (`model.interface`)."""
    return {"dropout": rng, AUGMENT_STREAM: jax.random.fold_in(rng, _VIEW_STREAM)}


@functools.partial(
    jax.jit, donate_argnums=0, static_argnames=("microbatches", "augment")
)
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
    By default (None) the step picks them as `train` does on one device
    (`model_microbatches`), so the chapter's four-argument call
    `train_step(state, batch, rng, weight)` takes the fast path too: 4 passes
    of 64 for a batch of 256 on a CPU, one pass on GPU and TPU.

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
      classification_weight: scalar weight of the classification loss (traced,
        so sweeping it does not recompile; keep its type fixed, e.g. float32).
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
    rng = jax.random.fold_in(rng_dropout, state.step)
    if augment != "none":
        images = random_orientation(
            jax.random.fold_in(rng, _AUGMENT_STREAM), batch["images"], augment
        )
        batch = {**batch, "images": images}
    grad_fn = jax.value_and_grad(_compute_objective, has_aux=True)
    if microbatches == 1:
        (_, (metrics, codes)), grads = grad_fn(
            state.params, state, batch, classification_weight, True, _training_rngs(rng)
        )
    else:
        grads, metrics, codes = _accumulate_passes(
            grad_fn, state, batch, classification_weight, rng, microbatches
        )
    state = state.apply_gradients(grads=grads)
    if getattr(state, "collections", None) is not None:
        params, collections = model_of(state).update_collections(
            state.params, state.collections, codes, rng
        )
        state = state.replace(params=params, collections=collections)
    return state, metrics


def _accumulate_passes(grad_fn, state, batch, classification_weight, rng, passes):
    """`train_step`'s gradients, metrics and codes over `passes` equal parts."""
    if batch["labels"].shape[0] % passes:
        raise ValueError(
            f"microbatches={passes} does not divide the batch of "
            f"{batch['labels'].shape[0]}"
        )
    grads, metrics, codes = None, [], []
    for i, part in enumerate(_split_microbatches(batch, passes)):
        if grads is not None:
            # Finish pass i - 1 before pass i starts, or XLA schedules the
            # forward passes side by side and the memory saving is lost.
            grads, part = jax.lax.optimization_barrier((grads, part))
        rngs = _training_rngs(jax.random.fold_in(rng, i))
        (_, (part_metrics, part_codes)), part_grads = grad_fn(
            state.params, state, part, classification_weight, True, rngs
        )
        grads = (
            part_grads if grads is None else jax.tree.map(jnp.add, grads, part_grads)
        )
        metrics.append(part_metrics)
        codes.append(part_codes)
    grads = jax.tree.map(lambda g: g / passes, grads)
    metrics = jax.tree.map(lambda *values: jnp.mean(jnp.stack(values)), *metrics)
    # Code use over the whole batch, not the mean of the passes' values.
    codes = jax.tree.map(lambda *parts: jnp.concatenate(parts), *codes)
    levels = model_of(state).codebook_levels
    indices = {levels[name]: codes[name][0] for name in codes}
    sizes = {levels[name]: state.params[name]["codebook"].shape[1] for name in codes}
    metrics.update(usage_metrics(indices, sizes))
    return grads, metrics, codes


@jax.jit
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


def _watch_health(history: HistoryLogger, epoch: int) -> str:
    """Runs `health.check_health` after an epoch: records its flags, warns
    (`TrainingHealthWarning`) when a check starts failing, and returns the
    progress bar's text."""
    issues = check_health(history.history())
    flags = health_metrics(issues)
    previous = {
        name: records[-1]["mean"]
        for name in flags
        if (records := history.history()["train"].get(name))
    }
    history.record("train", epoch, flags)
    for issue in issues:
        if not previous.get(f"health_{issue.check}"):
            # Attributed to the caller of `train` (here <- loop.fit <- train);
            # the progress bars are cleared while it prints, then redrawn.
            with tqdm.external_write_mode(file=sys.stderr):
                warnings.warn(
                    f"epoch {epoch + 1}: {issue.message}", TrainingHealthWarning, 4
                )
    text = history.latest(["total_loss", "perplexity"])
    failed = sorted({issue.check for issue in issues})
    return text + (f" | unhealthy: {', '.join(failed)}" if failed else "")


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
    weight = jnp.float32(classification_weight)
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
        return train_step(state, batch, rng_dropout, weight, microbatches, augment)

    def evaluate(state: TrainState, batch: Batch):
        return eval_step(state, batch, weight)

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
        on_epoch=_watch_health,
        store_path=store_path,
        config=config,
        batches=batches,
        steps_per_epoch=steps_per_epoch,
    )
