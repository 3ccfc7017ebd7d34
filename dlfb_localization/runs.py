"""A training run as a folder: its configuration, checkpoints and metrics.

The chapter's code builds the splits, the model and the optimizer by hand and
calls `train`. The command line and the demo do the same from one `RunConfig`,
kept in the run folder (its "store"), so that `evaluate`, `embed` and `figures`
can rebuild exactly the data and model a run was trained on::

    store/
      config.json    the RunConfig (written once the settings are checked,
                     through a temporary file)
      checkpoints/   Orbax steps written by `train` after every epoch
      metrics.json   the training history, once training has finished
      .lock          while a process writes the folder (`locks.lock_folder`)

`config.json` records the data folder (and the cache folder, if one was named)
as absolute paths, so a run is read back from any working directory. A run
whose data has moved is read with `load_run(store, data=NEW)` (`--data NEW`):
the data's fingerprints, stored in the checkpoint, must still match. Runs
written before recorded the path as typed; a relative one is looked up from
the working directory, then from the run folder's parent.

The settings are `run_config.RunConfig`'s; what differs between the model
families (module, optimizer, training batches) is `run_families.MODELS`.

Randomness follows the chapter: `PRNGKey(seed)` is split into `rng_frames` (for
figures), `rng_dataset` (splits), `rng_init` (weights) and `rng_train` (data
order and dropout).
"""

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax.training.train_state import TrainState

from dlfb_localization import checkpoint
from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.utils import count_unique_proteins
from dlfb_localization.files import write_json
from dlfb_localization.history import History
from dlfb_localization.locks import lock_folder
from dlfb_localization.loop import check_epochs
from dlfb_localization.model.interface import ModelState
from dlfb_localization.run_config import PATHS, RunConfig
from dlfb_localization.run_families import MODELS, TrainBatches
from dlfb_localization.train import check_arguments, train

logger = logging.getLogger(__name__)

__all__ = [
    "Run",
    "RunConfig",
    "build_splits",
    "create_state",
    "is_run_data",
    "load_new_data",
    "load_run",
    "train_run",
]


# The families a run can train (`RunConfig.model`) are `run_families.MODELS`:
# each builds its module and optimizer from the run's settings.

SPLITS = {"train": 0.80, "valid": 0.10, "test": 0.10}
CONFIG_FILE = "config.json"
# Training frames drawn at initialisation (data variance, k-means).
_INIT_FRAMES = 256
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"


class Run(NamedTuple):
    """A trained (or restored) run.

    Attributes:
      config: its `RunConfig`.
      splits: "train", "valid" and "test" `Dataset`s.
      state: the final `TrainState`.
      metrics: `train`'s history.
      rng_frames: the key the chapter uses to pick frames for figures.
    """

    config: RunConfig
    splits: dict[str, Dataset]
    state: TrainState
    metrics: History
    rng_frames: jax.Array


class _Keys(NamedTuple):
    frames: jax.Array
    dataset: jax.Array
    init: jax.Array
    train: jax.Array


def _keys(seed: int) -> _Keys:
    rng = jax.random.PRNGKey(seed)
    rng, rng_frames, rng_dataset = jax.random.split(rng, 3)
    _, rng_init, rng_train = jax.random.split(rng, 3)
    return _Keys(rng_frames, rng_dataset, rng_init, rng_train)


def build_splits(config: RunConfig, progress: bool = False) -> dict[str, Dataset]:
    """The chapter's fov-exclusive 80/10/10 splits of `config.data`."""
    builder = DatasetBuilder(
        config.data,
        channels=config.channels,
        cache_dir=config.cache_dir,
        progress=progress,
        cache_dtype=config.cache_dtype,
    )
    return builder.build(
        rng=_keys(config.seed).dataset,
        splits=SPLITS,
        exclusive_by="fov_id",
        n_proteins=config.n_proteins,
        max_frames=config.max_frames,
    )


def build_model(config: RunConfig, splits: dict[str, Dataset]) -> nn.Module:
    """The run's model, sized for its splits (the full model's loss divides by
    the variance of a seeded sample of training frames when inputs are raw)."""
    common = {
        "num_classes": count_unique_proteins(splits),
        "embedding_dim": config.embedding_dim,
        "num_embeddings": config.num_embeddings,
        "commitment_cost": config.commitment_cost,
        "dropout_rate": config.dropout_rate,
        "classification_head_layers": config.classification_head_layers,
        "standardize_inputs": config.standardize_inputs,
        "dtype": config.compute_dtype,
        "codebook": config.codebook_options(),
    }
    init_sample = functools.partial(_init_sample, config, splits)
    return MODELS[config.model].build(config, common, init_sample)


def _init_sample(config: RunConfig, splits: dict[str, Dataset]) -> np.ndarray:
    """A seeded sample of training frames: the data's variance (the full
    model's loss divides by it) and k-means initialisation read it."""
    train_split = splits["train"]
    return next(
        train_split.get_batches(
            _keys(config.seed).init, min(_INIT_FRAMES, len(train_split))
        )
    )["images"]


def create_state(config: RunConfig, splits: dict[str, Dataset]) -> ModelState:
    """The initial train state of the run's model and its family's optimizer
    (`run_families.MODELS`: Adam for the VQ families, AdamW with a warm-up and
    decay over the run's steps for the ViT)."""
    plan = MODELS[config.model].train_batches(config, splits["train"])
    return _initial_state(config, splits, plan)


def _initial_state(
    config: RunConfig, splits: dict[str, Dataset], plan: TrainBatches
) -> ModelState:
    """`create_state` given the run's training batches (`plan`), which the
    optimizer's schedule counts steps of."""
    return build_model(config, splits).create_train_state(
        rng=_keys(config.seed).init,
        dummy_input=splits["train"].get_dummy_input(),
        tx=MODELS[config.model].optimizer(config, plan.steps_per_epoch),
        init_images=_init_sample(config, splits) if config.kmeans_init else None,
    )


def _abstract_state(config: RunConfig, splits: dict[str, Dataset]) -> ModelState:
    """The shapes, dtypes and placement of the run's train state, without
    initialising it (what a checkpoint is restored into)."""
    # k-means moves the codebook's values, not its shape (and runs on values).
    plain = dataclasses.replace(config, kmeans_init=False)
    abstract = jax.eval_shape(lambda: create_state(plain, splits))
    model = build_model(config, splits)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
    )
    return placed.replace(model=model, apply_fn=model.apply)


def _read_config(store: Path) -> RunConfig:
    path = store / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{store} is not a run folder (no {CONFIG_FILE}); train one with "
            "`dlfb-localization train --data DATA --store STORE`"
        )
    try:
        return RunConfig.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path} is not a valid run configuration: {error}") from None


def train_run(
    config: RunConfig, store: str | os.PathLike, progress: bool = True
) -> Run:
    """Trains (or resumes, or restores) the run `config` in the folder `store`.

    Nothing is written before every setting is checked: the epochs first, then,
    holding the folder's lock (`locks.lock_folder`), the data and the initial
    state are built and `train`'s arguments checked (`train.check_arguments`);
    only then is `config.json` written. A folder holding another configuration
    is refused with `checkpoint.ConfigMismatchError` naming the differing
    settings, and nothing in it is changed; a `config.json` with no finished
    epoch beside it (training stopped before its first checkpoint) trained
    nothing, and is replaced. The data (and cache) folder is recorded as an
    absolute path; where it lies is not compared (the checkpoint compares the
    data itself).

    Raises:
      ValueError: a setting is invalid; nothing was written.
      checkpoint.ConfigMismatchError: `store` holds a run with other settings.
      locks.FolderLockedError: another process is writing `store`.
    """
    store = Path(store)
    config = dataclasses.replace(
        config,
        **{
            name: _absolute(getattr(config, name))
            for name in PATHS
            if getattr(config, name) is not None
        },
    )
    check_epochs(config.num_epochs, config.eval_every)
    with lock_folder(store):
        _check_stored_config(config, store)
        splits = build_splits(config, progress=progress)
        plan = MODELS[config.model].train_batches(config, splits["train"])
        state = _initial_state(config, splits, plan)
        check_arguments(
            splits,
            config.num_epochs,
            plan.batch_size,
            config.eval_every,
            config.augment,
        )
        write_json(config.to_json(), store / CONFIG_FILE)
        state, metrics = train(
            state=state,
            rng=_keys(config.seed).train,
            dataset_splits=splits,
            num_epochs=config.num_epochs,
            batch_size=plan.batch_size,
            classification_weight=config.classification_weight,
            eval_every=config.eval_every,
            store_path=store / CHECKPOINTS,
            augment=config.augment,
            settings=config.settings(),
            batches=plan.batches,
            steps_per_epoch=plan.steps_per_epoch,
            label=store.name,
        )
        write_json(metrics, store / METRICS_FILE)
    return Run(config, splits, state, metrics, _keys(config.seed).frames)


def _check_stored_config(config: RunConfig, store: Path) -> None:
    """Raises `ConfigMismatchError` if `store` holds a checkpointed run of
    other settings."""
    if not (store / CONFIG_FILE).is_file():
        return
    differences = checkpoint.find_config_differences(
        _read_config(store).settings(), config.settings()
    )
    if differences and _has_checkpoint(store):
        raise checkpoint.ConfigMismatchError(
            f"{store} holds a run with other settings; use another --store. "
            "Differences: " + "; ".join(differences)
        )


def _has_checkpoint(store: Path) -> bool:
    """Whether a finished epoch of the run in `store` is checkpointed."""
    if not (store / CHECKPOINTS).is_dir():
        return False
    manager = checkpoint.open_manager(store / CHECKPOINTS)
    try:
        return manager.latest_step() is not None
    finally:
        manager.close()


def _absolute(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _find_data(store: Path, stored: str, data: str | os.PathLike | None) -> str:
    """The data folder of the run in `store`: `data` if given, else the one
    recorded; a relative one (runs written before paths were made absolute)
    from the working directory, else from the run folder's parent."""
    if data is not None:
        if not Path(data).is_dir():
            raise FileNotFoundError(f"data folder {data} does not exist")
        return _absolute(data)
    candidates = [Path(stored)]
    if not Path(stored).is_absolute():
        candidates.append(store.absolute().parent / stored)
    for candidate in candidates:
        if candidate.is_dir():
            return _absolute(candidate)
    raise FileNotFoundError(
        f"the data folder {stored} of the run in {store} does not exist (moved?); "
        "pass its new place with --data (load_run's data=)"
    )


def load_run(
    store: str | os.PathLike,
    progress: bool = False,
    data: str | os.PathLike | None = None,
) -> Run:
    """The latest checkpoint of the run in `store`, with its data and metrics.

    The data is checked against the fingerprints the checkpoint stored; the
    state is restored into the shapes of the run's configuration, without
    initialising a model. A damaged latest checkpoint is skipped with a warning
    for the one before it.

    Args:
      store: the run folder.
      progress: show a progress bar if the data's cache is built.
      data: the run's data folder, where it has moved since training (default:
        the one `config.json` records).

    Raises:
      FileNotFoundError: `store` is not a run folder, has no checkpoint yet, or
        its data folder is missing.
      checkpoint.ConfigMismatchError: the data differs from the run's (frames
        of another shape, or other frames).
      checkpoint.DamagedCheckpointError: no checkpoint can be read.
    """
    store = Path(store)
    config = _read_config(store)
    config = dataclasses.replace(config, data=_find_data(store, config.data, data))
    splits = build_splits(config, progress=progress)
    manager = checkpoint.open_manager(store / CHECKPOINTS)
    try:
        restored = checkpoint.restore_latest(
            manager,
            _abstract_state(config, splits),
            data={name: splits[name].fingerprint for name in ("train", "valid")},
            input_shape=splits["train"].image_shape,
        )
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(
            f"{store / CHECKPOINTS} holds no finished epoch yet; train first"
        )
    if restored.epoch + 1 < config.num_epochs:
        logger.warning(
            "%s: training stopped after epoch %d of %d; using that checkpoint",
            store,
            restored.epoch + 1,
            config.num_epochs,
        )
    return Run(
        config, splits, restored.state, restored.metrics, _keys(config.seed).frames
    )


def is_run_data(store: str | os.PathLike, data: str | os.PathLike) -> bool:
    """Whether the folder `data` is the run's own data: the folder `config.json`
    records, or, where that no longer exists, its new place (`load_run` then
    checks the fingerprints). Any other folder is new data (`load_new_data`).
    """
    store = Path(store)
    try:
        recorded = _find_data(store, _read_config(store).data, None)
    except FileNotFoundError:
        return True
    return os.path.samefile(recorded, data)


def load_new_data(
    run: Run,
    data: str | os.PathLike,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Every frame of the data folder `data` (not the run's own), read as the
    run's model reads frames: the same channels and cache precision.

    The frames keep the folder's order (frame ids); nothing is split or
    sampled, so `embeddings.get_frame_embeddings(run.state, dataset)` and
    `export.export_embeddings` embed all of them. The folder's cache is built
    once, as for any data folder (`cache_dir`, default `DATA/dlfb_cache`).

    Raises:
      FileNotFoundError: `data` is not a folder.
      ValueError: its crops differ from the run's in size or channels (the
        message names both).
    """
    if not Path(data).is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    builder = DatasetBuilder(
        data,
        channels=run.config.channels,
        cache_dir=cache_dir,
        progress=progress,
        cache_dtype=run.config.cache_dtype,
    )
    dataset = builder.build(rng=0, splits={"all": 1.0})["all"]
    expected = run.splits["train"].image_shape
    if tuple(dataset.image_shape) != tuple(expected):
        raise ValueError(
            f"{data} holds crops of {_shape_text(dataset.image_shape)} but the run "
            f"was trained on crops of {_shape_text(expected)} (channels "
            f"{list(run.config.channels)} of {run.config.data}); the model reads "
            "only crops of its own size and channels"
        )
    return dataset


def _shape_text(shape) -> str:
    height, width, channels = shape
    return f"{height}x{width} pixels with {channels} channel(s)"
