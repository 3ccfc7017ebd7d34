"""A training step's passes: how many a batch is split into on this backend
(`default_microbatches`, `model_microbatches`), the split, the random streams
of a pass and the gradients, metrics and codes summed over passes
(`accumulate_passes`). `train.train_step` uses them."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from dlfb_localization.model.interface import AUGMENT_STREAM, model_of, usage_metrics

__all__ = [
    "CPU_MICROBATCH",
    "accumulate_passes",
    "default_microbatches",
    "model_microbatches",
    "split_microbatches",
    "training_rngs",
]

Batch = Mapping[str, np.ndarray | jax.Array]


# Frames per device in one forward/backward pass of a CPU train step. At the
# chapter's batch of 256, XLA:CPU's scratch for one pass is ~3 GiB: every step
# page-faults it in, and the activations fall out of cache between layers.
# Four passes of 64 with their gradients summed do the same arithmetic in
# 2.2 GiB and run ~1.5x faster (benchmarks/bench_train_step.py). Accelerators
# keep the whole batch in one pass.
#
# Of those 2.2 GiB, 0.6 GiB are the four passes' gradients of the head's
# 40,000 x 1,000 kernel (160 MB each): XLA defers those products and fuses
# all four into Adam's update. Two ways to avoid that were measured at the
# chapter's settings, each against this code in the same sitting; both were
# slower, so neither is used:
# - each pass a program of its own, run in turn: 0.8 GiB of scratch and a
#   peak of 2.3 GiB, but 18% fewer images/s;
# - the next pass's images made to depend on the summed gradients: 0.9 GiB
#   and a peak of 2.5 GiB, but 8% fewer images/s.
# A `lax.scan` over the passes needs little memory too, but XLA:CPU computes
# convolutions' weight gradients inside a loop some 20 times slower. An
# `optimization_barrier` on each pass's inputs and the gradients so far, used
# before, left the scratch as it was (2.97, 2.20 and 2.70 GiB for 2, 4 and 8
# passes, with or without) and the speed within the noise: XLA:CPU drops it
# before it schedules.
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


def split_microbatches(batch: Batch, microbatches: int) -> list[Batch]:
    """The batch's images and labels in `microbatches` equal passes."""

    # Pass i takes frames i, i + m, i + 2m, ...: a batch split over devices in
    # contiguous blocks then gives every device the same share of every pass,
    # with no data moved between devices.
    def take(x, i):
        return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])[:, i]

    return [
        {key: take(batch[key], i) for key in ("images", "labels")}
        for i in range(microbatches)
    ]


# Folded into the step's (or pass's) key for the model's own `AUGMENT_STREAM`
# (a ViT's views and masks): apart from dropout's and the orientation's keys,
# which stay what they were before models drew from it.
_VIEW_STREAM = 1_000_033


def training_rngs(rng: jax.Array) -> dict[str, jax.Array]:
    """The rng streams of one training pass (`model.interface`)."""
    return {"dropout": rng, AUGMENT_STREAM: jax.random.fold_in(rng, _VIEW_STREAM)}


def accumulate_passes(grad_fn, state, batch, classification_weight, rng, passes):
    """`train_step`'s gradients, metrics and codes over `passes` equal parts."""
    if batch["labels"].shape[0] % passes:
        raise ValueError(
            f"microbatches={passes} does not divide the batch of "
            f"{batch['labels'].shape[0]}"
        )
    grads, metrics, codes = None, [], []
    for i, part in enumerate(split_microbatches(batch, passes)):
        rngs = training_rngs(jax.random.fold_in(rng, i))
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
