"""Epoch checkpoints of a training run with Orbax, and when to trust them.

A checkpoint is one Orbax step (numbered by the optimizer step) with two items:
"state", the train state's arrays (a `TrainState`'s, or e.g. the GAN's pair of
them), and "meta", JSON holding the run's configuration, the last finished
epoch and the metrics so far. `loop.fit` writes one after every epoch. Nothing is
pickled. Orbax writes each step into a temporary folder and renames it into
place only when complete, so a crash mid-save leaves no step that can be
restored; the previous step stays valid. A step damaged later (a truncated or
overwritten file) is skipped with a warning naming it, and the step before it
is used; with no readable step left, `DamagedCheckpointError` names the folder.

The configuration records everything that decides the result and can be
recorded (`run_record`: `build_run_config` for the VQ families; other families
build theirs with `describe_run`; all re-exported here). A stored run
is used only if its configuration matches; otherwise `ConfigMismatchError`
names the differing fields.
"""

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

from dlfb_localization import __version__
from dlfb_localization.history import History
from dlfb_localization.run_record import (
    ConfigMismatchError,
    build_run_config,
    describe_run,
    describe_train_state,
    find_config_differences,
    rng_record,
    to_json,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigMismatchError",
    "DamagedCheckpointError",
    "RestoredRun",
    "build_run_config",
    "describe_run",
    "describe_train_state",
    "find_config_differences",
    "open_manager",
    "read_meta",
    "restore_latest",
    "restore_run",
    "restore_state",
    "rng_record",
    "save_epoch",
    "to_json",
]

# Bump when the layout of "meta" changes incompatibly.
FORMAT_VERSION = 1
# Two steps, so that the previous epoch survives while the next one is written.
MAX_TO_KEEP = 2
# Orbax numbers its operations with one counter per process and signals between
# its threads by that number: two saves at the same time (runs trained in
# threads, `demo`) read each other's signals and time out. A process's saves and
# restores take turns.
_ORBAX_TURN = threading.Lock()


class DamagedCheckpointError(ValueError):
    """No step of a checkpoint folder can be read back (damaged files)."""


class RestoredRun(NamedTuple):
    """A run read back from its latest checkpoint.

    Attributes:
      state: the `TrainState` after `epoch`.
      epoch: the last finished epoch (0-based).
      metrics: the metrics history up to and including `epoch`.
    """

    state: TrainState
    epoch: int
    metrics: History


def open_manager(store_path: str | os.PathLike) -> ocp.CheckpointManager:
    """An Orbax `CheckpointManager` for a run's folder (created if missing).

    Only finalized steps are listed by Orbax; an unfinished save (a
    `*.orbax-checkpoint-tmp*` folder) is ignored and overwritten when that step
    is saved again.
    """
    with _ORBAX_TURN:
        return ocp.CheckpointManager(
            Path(store_path).expanduser().absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP, create=True),
        )


def save_epoch(
    manager: ocp.CheckpointManager,
    state: TrainState,
    epoch: int,
    config: Mapping[str, Any],
    metrics: History,
) -> None:
    """Writes the state after `epoch`, with config and metrics, and waits for it.

    The step number is the optimizer step. Waiting matters: the next train step
    donates (reuses) the state's buffers.

    Raises:
      OSError: the step could not be written (e.g. the disk is full); the
        message names the folder and the original error.
    """
    meta = {
        "config": config,
        "epoch": epoch,
        "metrics": metrics,
        "version": {
            "format": FORMAT_VERSION,
            "dlfb_localization": __version__,
            "jax": jax.__version__,
            "orbax": ocp.__version__,
        },
    }
    try:
        with _ORBAX_TURN:
            manager.save(
                int(state.step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_state_items(state)),
                    meta=ocp.args.JsonSave(to_json(meta)),
                ),
            )
            manager.wait_until_finished()
    except OSError as error:
        raise OSError(
            f"could not write the checkpoint of epoch {epoch + 1} into "
            f"{manager.directory} ({error.strerror or error}); the previous "
            "epoch's checkpoint is kept. Free space there, or train into another "
            "--store, and run the same command again to resume",
        ) from error


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON "meta" item of a step (config, epoch, metrics, version)."""
    with _ORBAX_TURN:
        restored = manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
    return restored["meta"]


def restore_state(
    manager: ocp.CheckpointManager, step: int, target: TrainState
) -> TrainState:
    """The `TrainState` of a step, placed like `target`'s arrays.

    `target` only provides structure, shapes, dtypes and device placement (its
    values are not read), so a run written on a GPU restores on a CPU.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_items(target))
    try:
        with _ORBAX_TURN:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
            )
    except json.JSONDecodeError:
        raise  # a garbled file, not another layout
    except ValueError as error:
        raise ConfigMismatchError(
            f"{manager.directory} step {step} holds a train state shaped "
            f"differently from this run's ({str(error).splitlines()[0]}); was it "
            "written by another version or model? Use another folder."
        ) from None
    if not isinstance(target, TrainState):
        return restored["state"]
    return target.replace(**restored["state"])


def _state_items(state: TrainState) -> dict[str, Any]:
    """The arrays a checkpoint keeps: step, parameters, optimizer state, and
    non-gradient collections when the model has any. A dict rather than the
    state object, so that states of every family (and checkpoints written
    before `ModelState`) share one layout. Another state (the GAN's pair of
    train states) is kept as it is."""
    if not isinstance(state, TrainState):
        return state
    items = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    collections = getattr(state, "collections", None)
    if collections is not None:
        items["collections"] = collections
    return items


def _check_format(manager: ocp.CheckpointManager, meta: Mapping[str, Any]) -> None:
    stored_format = meta.get("version", {}).get("format")
    if stored_format != FORMAT_VERSION:
        raise ConfigMismatchError(
            f"{manager.directory} holds checkpoint format {stored_format}, this "
            f"library reads format {FORMAT_VERSION}; use another store_path"
        )


def _restore_newest_readable(
    manager: ocp.CheckpointManager,
    target: TrainState,
    check: Callable[[Mapping[str, Any]], None],
) -> tuple[RestoredRun | None, list[int]]:
    """The newest step that reads back whole, and the newer damaged steps.

    A step whose files cannot be read (a truncated or overwritten array file,
    garbled JSON) is skipped with a warning naming the store and the step, and
    the step before it is tried. `check(meta)` is called on each readable
    step's "meta" before its state is restored, and may raise.

    Returns:
      `(run, damaged)`: the restored run (None if the folder holds no
      finished step) and the damaged step numbers, newest first.

    Raises:
      DamagedCheckpointError: the folder holds steps but none reads back.
      ConfigMismatchError: from the format check or `check`.
    """
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = read_meta(manager, step)
            epoch, metrics = int(meta["epoch"]), meta["metrics"]
        except Exception as error:  # Orbax raises JSON, I/O and plain errors
            damaged.append(_warn_damaged(manager, step, "meta JSON", error))
            continue
        _check_format(manager, meta)
        check(meta)
        try:
            state = restore_state(manager, step, target)
        except ConfigMismatchError:
            raise
        except Exception as error:  # TensorStore's errors are plain Exceptions
            damaged.append(_warn_damaged(manager, step, "arrays", error))
            continue
        if damaged:
            logger.warning(
                "%s: using step %d (epoch %d), the newest readable one",
                manager.directory,
                step,
                epoch + 1,
            )
        return RestoredRun(state=state, epoch=epoch, metrics=metrics), damaged
    if damaged:
        raise DamagedCheckpointError(
            f"{manager.directory}: no checkpoint can be read (step(s) "
            f"{', '.join(map(str, damaged))} damaged; see the warnings above); "
            "train into a new --store, or delete the damaged step folders to "
            "train this run again from the start"
        )
    return None, damaged


def _shape(shape: Sequence[int]) -> str:
    height, width, channels = shape
    return f"{height}x{width} pixels with {channels} channel(s)"


def _warn_damaged(
    manager: ocp.CheckpointManager, step: int, item: str, error: Exception
) -> int:
    lines = str(error).strip().splitlines() or [""]
    # TensorStore appends a dump of its whole spec to the first line.
    reason = lines[0].split(" See full TensorStore details")[0]
    logger.warning(
        "%s: step %d is damaged, its %s cannot be read (%s: %s)",
        manager.directory,
        step,
        item,
        type(error).__name__,
        reason[:160],
    )
    return step


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames damaged step folders to `<step>.damaged`, so that training can
    write those steps again while nothing is deleted."""
    for step in steps:
        folder = Path(manager.directory) / str(step)
        aside = folder.with_name(f"{step}.damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = folder.with_name(f"{step}.damaged{n}")
        folder.rename(aside)
        logger.warning(
            "%s: moved damaged step %d aside to %s", folder.parent, step, aside
        )
    manager.reload()


def restore_run(
    manager: ocp.CheckpointManager, state: TrainState, config: Mapping[str, Any]
) -> RestoredRun | None:
    """The latest readable checkpoint of the run described by `config`, if any.

    Damaged newer steps are skipped with a warning and moved aside
    (`<step>.damaged`), so that the run resumes from the newest readable step
    and writes the damaged ones again.

    Args:
      manager: from `open_manager`.
      state: a state shaped like the stored one (e.g. the fresh initial state).
      config: `build_run_config` of the run being started.

    Returns:
      The restored run, or None if the folder holds no finished checkpoint.

    Raises:
      ConfigMismatchError: the stored run's configuration differs.
      DamagedCheckpointError: no stored step can be read.
    """

    def check(meta: Mapping[str, Any]) -> None:
        differences = find_config_differences(meta["config"], dict(config))
        if differences:
            raise ConfigMismatchError(
                f"{manager.directory} holds a run with a different configuration; "
                "use another store_path, or the stored settings. Differences: "
                + "; ".join(differences)
            )

    restored, damaged = _restore_newest_readable(manager, state, check)
    if damaged:
        _move_aside(manager, damaged)
    return restored


def restore_latest(
    manager: ocp.CheckpointManager,
    target: TrainState,
    data: Mapping[str, Any],
    input_shape: Sequence[int] | None = None,
) -> RestoredRun | None:
    """The latest readable checkpoint, for reading a finished run back rather
    than continuing it: only the data is compared with the stored run's.
    Damaged newer steps are skipped with a warning (and left as they are).

    Args:
      manager: from `open_manager`.
      target: the state's structure, e.g. abstract (`jax.eval_shape`) arrays
        with their placement; its values are not read.
      data: `{split name: Dataset.fingerprint}` of the "train" and "valid"
        splits the run is read with.
      input_shape: `(height, width, channels)` of those splits' frames; when
        given, compared first, so that frames of another shape are named as
        such rather than as other data.

    Raises:
      ConfigMismatchError: the data differs from what the run was trained on.
      DamagedCheckpointError: no stored step can be read.
    """

    def check(meta: Mapping[str, Any]) -> None:
        stored_shape = meta["config"].get("input_shape")
        if input_shape is not None and stored_shape not in (None, list(input_shape)):
            raise ConfigMismatchError(
                f"{manager.directory} was trained on frames of {_shape(stored_shape)}"
                f", the data it is read with has frames of {_shape(input_shape)}; "
                "read it with the data it was trained on"
            )
        differences = find_config_differences(
            meta["config"]["data"], to_json(dict(data)), "data"
        )
        if differences:
            raise ConfigMismatchError(
                f"{manager.directory} was trained on other data than it is read "
                "with now (was the data folder changed?). Differences: "
                + "; ".join(differences)
            )

    return _restore_newest_readable(manager, target, check)[0]
