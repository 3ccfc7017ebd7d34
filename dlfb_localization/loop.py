"""The epoch loop every model family trains with, and its checkpoints.

`fit` runs a jitted step over shuffled, prefetched batches epoch by epoch,
validates on a schedule, stops on a non-finite loss, and, given a store,
writes an Orbax checkpoint after every epoch and resumes or restores a run
from it (`dlfb_localization.checkpoint`). What differs between families (the
step, the evaluation, the run's configuration, what to watch after an epoch)
is passed in: `train.train` (the VQ-VAE and cytoself) and
`nucleus.train.train_unet`/`train_gan` are thin wrappers around it.
"""

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from dlfb_localization import checkpoint
from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.prefetch import prefetch_to_device
from dlfb_localization.history import History, HistoryLogger
from dlfb_localization.locks import lock_folder

logger = logging.getLogger(__name__)

__all__ = [
    "DataParallel",
    "NonFiniteLossError",
    "check_batch_size",
    "check_epochs",
    "fit",
]

Batch = Mapping[str, np.ndarray | jax.Array]
Metrics = Mapping[str, jax.Array]
State = TypeVar("State")


class NonFiniteLossError(FloatingPointError):
    """A logged loss was NaN or infinite; training stopped before checkpointing."""


class DataParallel:
    """Data parallelism over all local devices: one code path for one or many.

    Parameters and optimizer state are replicated on every device and each batch
    is split along its first axis; `jit` then compiles one SPMD program whose
    gradients are averaged across devices by XLA. With one device this is plain
    single-device training. For several hosts, call `jax.distributed.initialize()`
    first on every host: `jax.devices()` then spans all of them and each host
    must feed the same global batches (the data order is a pure function of the
    seed, so it does). Tested with two CPU processes (Gloo collectives): they end
    with the parameters of one process driving two devices.
    """

    def __init__(self, devices=None):
        devices = jax.devices() if devices is None else devices
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        self.n_devices = len(devices)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.batch = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec("data")
        )

    def place_state(self, state: State) -> State:
        """A copy of `state` replicated on every device.

        The steps donate their input, so the copy keeps the caller's arrays alive;
        Orbax restores into the same placement, so a resumed run compiles the
        steps once.
        """

        def copy(x):
            if not isinstance(x, jax.Array):
                # e.g. `TrainState.create`'s Python int step: a strong int32 array,
                # as a restored one.
                x = jnp.asarray(np.asarray(x))
            return jax.device_put(x, self.replicated, may_alias=False)

        return jax.tree.map(copy, state)

    def batch_sharding(self, batch_size: int) -> jax.sharding.Sharding:
        """Split a batch over the devices, or replicate one that does not divide
        (the last, partial validation batch)."""
        return self.batch if batch_size % self.n_devices == 0 else self.replicated


def check_epochs(num_epochs: int, eval_every: int = 1) -> None:
    """Raises ValueError unless both are >= 1."""
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")


def check_batch_size(batch_size: int, train_size: int) -> None:
    """Raises ValueError unless an epoch of `train_size` frames has a full batch."""
    if not 1 <= batch_size <= train_size:
        raise ValueError(
            f"batch_size must be in [1, {train_size}] (the train split's size, as "
            f"the last partial batch is dropped), got {batch_size}"
        )


def _model_inputs(batch: Batch) -> dict[str, np.ndarray | jax.Array]:
    # Frame ids are int64 bookkeeping the step never reads; leave them on the host.
    return {"images": batch["images"], "labels": batch["labels"]}


def _check_finite(
    values: dict[str, dict[str, np.ndarray]],
    epoch: int,
    first_step: int,
    losses: Sequence[str] = ("total_loss",),
) -> None:
    """Raises `NonFiniteLossError` naming the epoch and steps of a bad loss.

    Each of `losses` is checked in the "train" and "valid" values; the message
    calls `total_loss` "loss" and any other by its name."""
    for name in losses:
        label = "loss" if name == "total_loss" else name
        train_losses = values.get("train", {}).get(name, np.array([]))
        last_step = first_step + train_losses.size - 1
        bad = np.flatnonzero(~np.isfinite(train_losses))
        if bad.size:
            raise NonFiniteLossError(
                f"non-finite training {label} in epoch {epoch}: first at step "
                f"{first_step + bad[0]} ({bad.size} of steps {first_step}-"
                f"{last_step}); this epoch was not checkpointed, the last "
                "checkpoint (if any) is unchanged"
            )
        valid_losses = values.get("valid", {}).get(name, np.array([]))
        if not np.all(np.isfinite(valid_losses)):
            raise NonFiniteLossError(
                f"non-finite validation {label} after epoch {epoch} (training "
                f"steps {first_step}-{last_step}); this epoch was not "
                "checkpointed, the last checkpoint (if any) is unchanged"
            )


def fit(
    state: State,
    step: Callable[[State, Batch], tuple[State, Metrics]],
    train_split: Dataset,
    rng_data: jax.Array,
    *,
    num_epochs: int,
    batch_size: int,
    parallel: DataParallel | None = None,
    evaluate: Callable[[State, Batch], Metrics] | None = None,
    eval_split: Dataset | None = None,
    eval_every: int = 1,
    on_epoch: Callable[[HistoryLogger, int], str] | None = None,
    store_path: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
    losses: Sequence[str] = ("total_loss",),
    batches: Callable[[jax.Array], Iterable[Batch]] | None = None,
    steps_per_epoch: int | None = None,
    label: str | None = None,
) -> tuple[State, History]:
    """Trains `state` epoch by epoch with `step`, optionally checkpointed.

    Epoch `epoch` runs `step` on the batches of
    `train_split.get_batches(fold_in(rng_data, epoch), batch_size)` (shuffled,
    the last partial batch dropped), each read and put on the devices while the
    previous step runs. With `evaluate`, `eval_split` is then evaluated, in
    order and without dropping frames, after epochs with `epoch % eval_every ==
    0` and after the last. A non-finite value of one of `losses` stops the run
    (`NonFiniteLossError`) before the epoch is checkpointed. `on_epoch` then
    sees the metrics and returns the progress bar's text. The bar counts steps
    ("Epoch e/n", with ", validating" and ", saving" while it does those); it
    says what it does ("training", "resuming", "restored") through the module's
    logger.

    With `store_path`, an Orbax checkpoint (state, epoch, metrics, `config`) is
    written after every epoch (`checkpoint.save_epoch`), the folder's lock
    (`locks.lock_folder`) held from before the first read to after the last
    save. Called again with the
    same `config`, a finished run is restored without training and an
    interrupted one resumes at the next epoch (`checkpoint.restore_run`): the
    data order depends only on the epoch, so as long as the step's randomness
    depends only on the state's step, the result is bit-identical to an
    uninterrupted run's.

    Args:
      state: the initial state, placed by `parallel.place_state`; any pytree
        with a `step` (a `TrainState`, or e.g. the GAN's pair of them). A
        restored run is read back into its structure and placement.
      step: `step(state, batch) -> (state, metrics)`, jitted; the batch is
        `{"images", "labels"}` on the devices; metrics are scalars.
      train_split: the frames trained on.
      rng_data: JAX key of the data order.
      num_epochs: passes over `train_split`.
      batch_size: frames per step.
      parallel: how batches are split over the devices (default: all devices).
      evaluate: `evaluate(state, batch) -> metrics`, or None to train only.
      eval_split: the frames `evaluate` sees (needed with `evaluate`).
      eval_every: evaluate every this many epochs.
      on_epoch: `on_epoch(history, epoch) -> str`, called after the epoch's
        metrics are summarised and checked, before the checkpoint (it may
        record more); default: the latest values of `losses`.
      store_path: folder for checkpoints, or None to keep nothing.
      config: with `store_path`, what decides the run, as JSON-ready values
        (e.g. `checkpoint.build_run_config`); a stored run is used only if its
        configuration is the same.
      losses: metric names that must stay finite, in "train" and "valid".
      batches: `batches(fold_in(rng_data, epoch))` -> the epoch's training
        batches of `batch_size` frames, in place of `train_split`'s shuffled
        ones (e.g. P proteins x K crops); a pure function of its key, as a
        resumed run must repeat them.
      steps_per_epoch: the steps the progress bar expects an epoch to take
        (default `len(train_split) // batch_size`, the shuffled batches'
        count); pass the count of `batches`' epochs. An epoch that took
        another number of steps corrects the bar's total when it ends.
      label: names the run at the start of its progress bar ("label: Epoch
        e/n"), for runs trained at the same time (`demo.run`).

    Returns:
      `(state, metrics)`: the final state and `metrics[split][name]`, a list of
      `{"mean", "std", "epoch"}` records, for "train" (every epoch) and "valid"
      (evaluated epochs).

    Raises:
      NonFiniteLossError: one of `losses` became NaN or infinite; the message
        names the epoch and steps, and the last checkpoint on disk is left as
        it was.
      checkpoint.ConfigMismatchError: `store_path` holds a different run.
      locks.FolderLockedError: another process is writing `store_path`.
    """
    check_epochs(num_epochs, eval_every)
    check_batch_size(batch_size, len(train_split))
    if evaluate is not None and eval_split is None:
        raise ValueError("evaluate needs an eval_split")
    if store_path is not None and config is None:
        raise ValueError("a store_path needs the run's config")
    parallel = DataParallel() if parallel is None else parallel
    history = HistoryLogger()
    start_epoch = 0
    with _open_store(store_path) as manager:
        if manager is not None:
            resumed = checkpoint.restore_run(manager, state, config)
            if resumed is not None:
                state = resumed.state
                history = HistoryLogger(resumed.metrics)
                start_epoch = resumed.epoch + 1
                if start_epoch >= num_epochs:
                    logger.info(
                        "restored the finished run in %s (%d epochs); nothing to train",
                        store_path,
                        num_epochs,
                    )
                    return state, history.export()
                logger.info(
                    "resuming %s after epoch %d of %d",
                    store_path,
                    start_epoch,
                    num_epochs,
                )
        if start_epoch == 0:
            logger.info(
                "training %d epoch%s%s",
                num_epochs,
                "" if num_epochs == 1 else "s",
                "" if store_path is None else f", checkpointed in {store_path}",
            )

        if steps_per_epoch is None:
            steps_per_epoch = len(train_split) // batch_size
        prefix = "" if label is None else f"{label}: "
        bar = tqdm(
            total=num_epochs * steps_per_epoch,
            initial=start_epoch * steps_per_epoch,
            unit="step",
        )
        with bar:
            for epoch in range(start_epoch, num_epochs):
                bar.set_description(f"{prefix}Epoch {epoch + 1}/{num_epochs}")
                first_step = int(state.step)
                rng_epoch = jax.random.fold_in(rng_data, epoch)
                if batches is None:
                    epoch_batches = train_split.get_batches(rng_epoch, batch_size)
                else:
                    epoch_batches = batches(rng_epoch)
                # Reads and host-to-device copies overlap with the running step.
                sharding = parallel.batch_sharding(batch_size)
                taken, previous = 0, None
                for batch in prefetch_to_device(epoch_batches, device=sharding):
                    state, metrics = step(state, _model_inputs(batch))
                    history.log_step("train", metrics, weight=len(batch["labels"]))
                    # The bar counts finished steps, one behind the dispatch:
                    # steps run asynchronously, and counted as dispatched the
                    # bar crossed an epoch in seconds, then stood at
                    # "validating" while the epoch computed. One step stays
                    # queued, so the device never waits for Python.
                    if previous is not None:
                        jax.block_until_ready(previous)
                        bar.update()
                    previous = metrics
                    taken += 1
                if previous is not None:
                    jax.block_until_ready(previous)
                    bar.update()
                if taken != steps_per_epoch:  # a P x K draw gave another count
                    bar.total += taken - steps_per_epoch
                    bar.refresh()

                if evaluate is not None and (
                    epoch % eval_every == 0 or epoch == num_epochs - 1
                ):
                    bar.set_description(
                        f"{prefix}Epoch {epoch + 1}/{num_epochs}, validating"
                    )
                    for batch in eval_split.get_batches(
                        rng_data, batch_size, shuffle=False, drop_remainder=False
                    ):
                        sharding = parallel.batch_sharding(len(batch["labels"]))
                        inputs = jax.device_put(_model_inputs(batch), sharding)
                        metrics = evaluate(state, inputs)
                        history.log_step("valid", metrics, weight=len(batch["labels"]))

                _check_finite(history.flush(epoch), epoch, first_step, losses)
                if on_epoch is None:
                    bar.set_postfix_str(history.latest(losses))
                else:
                    bar.set_postfix_str(on_epoch(history, epoch))
                if manager is not None:
                    bar.set_description(
                        f"{prefix}Epoch {epoch + 1}/{num_epochs}, saving"
                    )
                    checkpoint.save_epoch(
                        manager, state, epoch, config, history.export()
                    )
    return state, history.export()


@contextlib.contextmanager
def _open_store(
    store_path: str | os.PathLike | None,
) -> Iterator[ocp.CheckpointManager | None]:
    """The checkpoint manager of `store_path` (None without one), used while
    holding the folder's lock (`locks.lock_folder`) and closed after. The
    processes of one multi-process run write the store together: process 0
    holds the lock for all of them."""
    if store_path is None:
        yield None
        return
    lock = lock_folder(store_path) if jax.process_index() == 0 else None
    with lock or contextlib.nullcontext():
        manager = checkpoint.open_manager(store_path)
        try:
            yield manager
        finally:
            manager.close()
