"""Epoch checkpoints of a training run with Orbax, and when to trust them.

A checkpoint is one Orbax step (numbered by the optimizer step) with two items:
"state", the train state's arrays (a `TrainState`'s, or e.g. the GAN's pair of
them), and "meta", JSON holding the run's configuration, the last finished
epoch and the metrics so far. `loop.fit` writes one after every epoch. Nothing is
pickled. Orbax writes each step into a temporary folder and renames it into
place only when complete, so a crash mid-save leaves no step that can be
restored; the previous step stays valid.

The configuration records everything that decides the result and can be
recorded (`run_record`: `build_run_config` for the VQ families; other families
build theirs with `describe_run`; all re-exported here). A stored run
is used only if its configuration matches; otherwise `ConfigMismatchError`
names the differing fields.
"""

import logging
import os
from collections.abc import Mapping
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
    manager.save(
        int(state.step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state_items(state)),
            meta=ocp.args.JsonSave(to_json(meta)),
        ),
    )
    manager.wait_until_finished()


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON "meta" item of a step (config, epoch, metrics, version)."""
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
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
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


def _latest_meta(manager: ocp.CheckpointManager) -> tuple[int, dict] | None:
    """The latest finished step and its "meta" item, in a format this library
    reads; None when the folder holds no finished step."""
    step = manager.latest_step()
    if step is None:
        return None
    meta = read_meta(manager, step)
    stored_format = meta.get("version", {}).get("format")
    if stored_format != FORMAT_VERSION:
        raise ConfigMismatchError(
            f"{manager.directory} holds checkpoint format {stored_format}, this "
            f"library reads format {FORMAT_VERSION}; use another store_path"
        )
    return step, meta


def restore_run(
    manager: ocp.CheckpointManager, state: TrainState, config: Mapping[str, Any]
) -> RestoredRun | None:
    """The latest checkpoint of the run described by `config`, if any.

    Args:
      manager: from `open_manager`.
      state: a state shaped like the stored one (e.g. the fresh initial state).
      config: `build_run_config` of the run being started.

    Returns:
      The restored run, or None if the folder holds no finished checkpoint.

    Raises:
      ConfigMismatchError: the stored run's configuration differs.
    """
    latest = _latest_meta(manager)
    if latest is None:
        return None
    step, meta = latest
    differences = find_config_differences(meta["config"], dict(config))
    if differences:
        raise ConfigMismatchError(
            f"{manager.directory} holds a run with a different configuration; "
            "use another store_path, or the stored settings. Differences: "
            + "; ".join(differences)
        )
    return RestoredRun(
        state=restore_state(manager, step, state),
        epoch=int(meta["epoch"]),
        metrics=meta["metrics"],
    )


def restore_latest(
    manager: ocp.CheckpointManager, target: TrainState, data: Mapping[str, Any]
) -> RestoredRun | None:
    """The latest checkpoint, for reading a finished run back rather than
    continuing it: only the data is compared with the stored run's.

    Args:
      manager: from `open_manager`.
      target: the state's structure, e.g. abstract (`jax.eval_shape`) arrays
        with their placement; its values are not read.
      data: `{split name: Dataset.fingerprint}` of the "train" and "valid"
        splits the run is read with.

    Raises:
      ConfigMismatchError: the data differs from what the run was trained on.
    """
    latest = _latest_meta(manager)
    if latest is None:
        return None
    step, meta = latest
    differences = find_config_differences(
        meta["config"]["data"], to_json(dict(data)), "data"
    )
    if differences:
        raise ConfigMismatchError(
            f"{manager.directory} was trained on other data than it is read with "
            "now (was the data folder changed?). Differences: " + "; ".join(differences)
        )
    return RestoredRun(
        state=restore_state(manager, step, target),
        epoch=int(meta["epoch"]),
        metrics=meta["metrics"],
    )
