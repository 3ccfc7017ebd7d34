"""A training step's passes: how many a batch is split into on this backend
(`default_microbatches`, `model_microbatches`) and how many one compiled
program runs (`program_passes`), the split, the random streams of a pass, and
the gradients, metrics and codes summed over passes (`accumulate_passes`,
`combine_passes`). `train.train_step` uses them."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from dlfb_localization.model.interface import AUGMENT_STREAM, model_of, usage_metrics

__all__ = [
    "CPU_MICROBATCH",
    "PASSES_PER_PROGRAM",
    "accumulate_passes",
    "check_passes",
    "combine_passes",
    "default_microbatches",
    "model_microbatches",
    "program_passes",
    "split_microbatches",
    "training_rngs",
]

Batch = Mapping[str, np.ndarray | jax.Array]


# Frames per device in one forward/backward pass of a CPU train step, and how
# many passes one compiled program runs (`program_passes`). At the chapter's
# batch of 256, one pass needs ~3 GiB of XLA:CPU scratch, paged in at every
# step, and its activations fall out of cache between layers. Here a step is
# 16 passes of 16 frames, two to a program (XLA overlaps one pass's
# single-threaded work with the other's), eight programs each adding its
# gradients into the last one's donated buffer, then an update program.
# `benchmarks/bench_train_step.py`, three interleaved runs on 2 cores, against
# the four passes of 64 in one program used before:
# - 16 passes, two to a program: 34.5-38.6 images/s, peak RSS 2.1 GiB;
# - 4 passes in one program: 35.5-37.9 images/s, peak RSS 3.9 GiB.
# In one program XLA defers every pass's gradient of the head's 40,000 x 1,000
# kernel (160 MB each) to Adam's update, so more passes there cost memory
# (2.2 GiB of scratch for 4 passes, 2.7 GiB for 8); neither an
# `optimization_barrier` (XLA:CPU drops it) nor making the next pass wait on
# the summed gradients changed that. Other layouts, measured in a prototype of
# this one (peak RSS with each pass's latents kept as outputs):
# - 8 passes of 32, two to a program: 38-41 images/s, 2.86 GiB;
# - 4 passes of 64, one to a program: 30 images/s, 2.76 GiB (no overlap);
# - 4 passes of 64, two to a program: 36 images/s, 3.5 GiB;
# - 16 passes of 16, four to a program: 41 images/s, 3.3 GiB.
# A `lax.scan` over the passes needs little memory, but XLA:CPU computes
# convolutions' weight gradients inside a loop some 20 times slower.
# Accelerators keep the whole batch in one pass.
CPU_MICROBATCH = 16
PASSES_PER_PROGRAM = 2
# Frames per device up to which a CPU batch stays one pass: its scratch (~0.8
# GiB for 64 of the chapter's frames) needs no split, and the arithmetic of
# runs at such batches (the demo's 32) stays what it was.
CPU_ONE_PASS = 64


def default_microbatches(batch_size: int, n_devices: int = 1) -> int:
    """How many passes `train_step` splits a batch into on this backend.

    On CPU, a batch of more than 64 frames per device is split into passes of
    16 frames per device (`batch_size // (16 * n_devices)`) when they divide
    it evenly, so that every pass has the same size and the summed gradient is
    exactly the full batch's; else 1. Always 1 on GPU and TPU.
    """
    per_pass = CPU_MICROBATCH * n_devices
    if (
        jax.default_backend() != "cpu"
        or batch_size % per_pass
        or batch_size <= CPU_ONE_PASS * n_devices
    ):
        return 1
    return batch_size // per_pass


def program_passes(microbatches: int) -> int:
    """How many of a step's `microbatches` passes one compiled program runs:
    `PASSES_PER_PROGRAM` when that divides them, else all of them."""
    if microbatches % PASSES_PER_PROGRAM:
        return microbatches
    return PASSES_PER_PROGRAM


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


def check_passes(batch: Batch, passes: int) -> None:
    """Raises ValueError unless `passes` divides the batch."""
    if batch["labels"].shape[0] % passes:
        raise ValueError(
            f"microbatches={passes} does not divide the batch of "
            f"{batch['labels'].shape[0]}"
        )


def accumulate_passes(
    grad_fn, state, parts, classification_weight, rng, first=0, grads=None
):
    """The passes `parts` (`split_microbatches`' from pass `first` on; `first`
    may be traced): their gradients summed onto `grads` (None: onto nothing),
    in pass order, and each pass's metrics and codes (lists; `combine_passes`
    reduces them)."""
    metrics, codes = [], []
    for i, part in enumerate(parts):
        rngs = training_rngs(jax.random.fold_in(rng, first + i))
        (_, (part_metrics, part_codes)), part_grads = grad_fn(
            state.params, state, part, classification_weight, True, rngs
        )
        grads = (
            part_grads if grads is None else jax.tree.map(jnp.add, grads, part_grads)
        )
        metrics.append(part_metrics)
        codes.append(part_codes)
    return grads, metrics, codes


def combine_passes(state, grads, metrics, codes):
    """`train_step`'s gradients, metrics and codes from `accumulate_passes`'
    sum and lists over all of the step's passes (one entry of `metrics` per
    pass): the mean gradient, the mean metrics, and code use counted over the
    whole batch, not the mean of the passes' values."""
    passes = len(metrics)
    grads = jax.tree.map(lambda g: g / passes, grads)
    metrics = jax.tree.map(lambda *values: jnp.mean(jnp.stack(values)), *metrics)
    codes = jax.tree.map(lambda *parts: jnp.concatenate(parts), *codes)
    levels = model_of(state).codebook_levels
    indices = {levels[name]: codes[name][0] for name in codes}
    sizes = {levels[name]: state.params[name]["codebook"].shape[1] for name in codes}
    metrics.update(usage_metrics(indices, sizes))
    return grads, metrics, codes
