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

Randomness follows the chapter: `PRNGKey(seed)` is split into `rng_frames` (for
figures), `rng_dataset` (splits), `rng_init` (weights) and `rng_train` (data
order and dropout).
"""

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training.train_state import TrainState

from dlfb_localization import checkpoint
from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.utils import count_unique_proteins
from dlfb_localization.files import write_json
from dlfb_localization.history import History
from dlfb_localization.locks import lock_folder
from dlfb_localization.loop import check_epochs
from dlfb_localization.model import LocalizationModel
from dlfb_localization.model.codebook import LOOKUPS, CodebookOptions
from dlfb_localization.model.cytoself import CytoselfModel
from dlfb_localization.model.interface import ModelState
from dlfb_localization.model.vqvae import ENCODERS
from dlfb_localization.orientation import AUGMENT_MODES
from dlfb_localization.settings import parse_channels, setting
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


def _chapter_model(config: "RunConfig", common: dict, splits) -> nn.Module:
    return LocalizationModel(**common, encoder_type=config.encoder)


def _cytoself_model(config: "RunConfig", common: dict, splits) -> nn.Module:
    variance = 1.0
    if not config.standardize_inputs:
        variance = float(np.var(_init_sample(config, splits)))
    return CytoselfModel(
        **common, global_splits=config.global_splits, data_variance=variance
    )


# The families a run can train (`RunConfig.model`): each builds its module from
# the run's settings and the fields every family shares (see `build_model`).
# Adding a family: its module under `model/` and an entry here.
MODELS = {"chapter": _chapter_model, "cytoself": _cytoself_model}

SPLITS = {"train": 0.80, "valid": 0.10, "test": 0.10}
CONFIG_FILE = "config.json"
# Training frames drawn at initialisation (data variance, k-means).
_INIT_FRAMES = 256
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
# RunConfig's fields that locate files rather than decide the result.
_PATHS = ("data", "cache_dir")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run, with the chapter's values as defaults.

    Attributes:
      data: folder with the OpenCell release (or the sample format).
      cache_dir: where the data's cache is kept (None: `<data>/dlfb_cache`).
      channels: image channels to train on (0 = protein).
      cache_dtype: "float32" or "float16" (halves the cache).
      seed: the run's seed (the chapter's 42).
      n_proteins, max_frames: subsample proteins, then frames (None: all).
      embedding_dim ... classification_head_layers: `LocalizationModel`'s.
      standardize_inputs: `LocalizationModel.standardize_inputs`.
      compute_dtype: `LocalizationModel.dtype`, "float32" or "bfloat16".
      encoder: `LocalizationModel.encoder_type`, "residual" (the chapter's) or
        "d4" (rotation- and flip-equivariant group convolutions).
      model: "chapter" (`LocalizationModel`) or "cytoself" (`CytoselfModel`:
        two levels, split quantization, two heads; `embedding_dim`,
        `num_embeddings` and `classification_head_layers` then apply to both
        levels, and cytoself's own values are 64, 2048 and 3).
      global_splits: `CytoselfModel.global_splits`.
      ema_decay, restart_dead_codes, kmeans_init, lookup: `CodebookOptions`
        ("cosine" lookup by default; "euclidean" is the chapter's).
      learning_rate: Adam's learning rate.
      num_epochs, batch_size, classification_weight, eval_every: `train`'s.
      augment: `train`'s: "none", "d4" or "rotate" (random orientations of the
        training images).
    """

    data: str
    cache_dir: str | None = setting(
        None,
        "where to keep the data's cache, e.g. when DATA is read-only",
        unset="DATA/dlfb_cache",
    )
    channels: tuple[int, ...] = setting(
        (0,),
        "comma-separated channels: 0=protein, 1=nucleus, 2=nuclear distance, "
        "3=nuclear segmentation",
        parse=parse_channels,
    )
    cache_dtype: str = setting(
        "float32",
        "float16 halves the cache; batches are float32 either way",
        choices=("float32", "float16"),
    )
    seed: int = setting(42, "seed of splits, weights and batches")
    n_proteins: int | None = setting(None, "use this many random proteins", unset="all")
    max_frames: int | None = setting(None, "use at most this many frames", unset="all")
    embedding_dim: int = setting(64, "code length D")
    num_embeddings: int = setting(512, "codebook size K")
    commitment_cost: float = setting(0.25, "beta, the commitment loss's weight")
    dropout_rate: float = setting(0.45, "dropout in the head")
    classification_head_layers: int = setting(
        2, "Dense layers in the head", flag="--head-layers"
    )
    standardize_inputs: bool = setting(
        True,
        "feed raw intensities, as the book does (default: standardize each image)",
        flag="--no-standardize",
    )
    compute_dtype: str = setting(
        "float32",
        "bfloat16: mixed precision (float32 parameters) for GPU and TPU",
        choices=("float32", "bfloat16"),
    )
    encoder: str = setting(
        "residual",
        "residual (the chapter's) or d4 (group convolutions: codes that rotate "
        "and flip with the image, histograms that do not change)",
        choices=ENCODERS,
    )
    model: str = setting(
        "chapter",
        "chapter (one level of codes) or cytoself (the paper's full model: local "
        "and global codes, split quantization, a head on each level; train it on "
        "--channels 0,1 with --num-embeddings 2048 --head-layers 3 for the "
        "paper's sizes)",
        choices=tuple(MODELS),
    )
    global_splits: int = setting(9, "cytoself: sub-vectors per global code")
    ema_decay: float | None = setting(
        None,
        "learn codebooks as moving averages with this decay, e.g. 0.99",
        unset="none: by gradient descent, as the chapter",
    )
    restart_dead_codes: bool = setting(
        False, "move codes that fell out of use onto poorly described encoder outputs"
    )
    kmeans_init: bool = setting(
        False, "start codebooks at k-means centroids of the untrained encoder's outputs"
    )
    lookup: str = setting(
        "cosine",
        "match encoder outputs with codes as unit vectors (cosine) or as raw "
        "vectors (euclidean, the chapter's: its codebook loss grows during training)",
        choices=LOOKUPS,
    )
    learning_rate: float = setting(1e-3, "Adam's learning rate")
    num_epochs: int = setting(10, "passes over the training split", flag="--epochs")
    batch_size: int = setting(256, "frames per step")
    classification_weight: float = setting(
        1.0, "weight of the protein-id loss; 0 trains without the head"
    )
    eval_every: int = setting(1, "validate every this many epochs")
    augment: str = setting(
        "none",
        "give each training image a random orientation: d4 (quarter turns and "
        "flips) or rotate (any angle, and flips)",
        choices=AUGMENT_MODES,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", str(self.data))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", str(self.cache_dir))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.classification_weight < 0:
            raise ValueError(
                f"classification_weight must be >= 0, got {self.classification_weight}"
            )
        if self.augment not in AUGMENT_MODES:
            raise ValueError(
                f"augment must be one of {AUGMENT_MODES}, got {self.augment!r}"
            )
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "cytoself" and self.encoder != "residual":
            raise ValueError(
                f"encoder {self.encoder!r} exists for the chapter's model only"
            )
        self.codebook_options()  # validates the codebook settings

    def codebook_options(self) -> CodebookOptions:
        return CodebookOptions(
            ema_decay=self.ema_decay,
            restart_dead_codes=self.restart_dead_codes,
            kmeans_init=self.kmeans_init,
            lookup=self.lookup,
        )

    def settings(self) -> dict[str, Any]:
        """What the checkpoint records and compares: every setting but the
        data's and the cache's folders, which the data's fingerprint stands for
        (so a run still resumes when its data is reached by another path)."""
        return {k: v for k, v in self.to_json().items() if k not in _PATHS}

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "RunConfig":
        # Runs written before the cosine lookup became the default used the
        # chapter's Euclidean one.
        values = {"lookup": "euclidean", **values}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown run settings {unknown}; known: {sorted(known)}")
        return cls(**values)


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
    return MODELS[config.model](config, common, splits)


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
    """The initial train state of the run's model and Adam optimizer."""
    return build_model(config, splits).create_train_state(
        rng=_keys(config.seed).init,
        dummy_input=splits["train"].get_dummy_input(),
        tx=optax.adam(config.learning_rate),
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
            for name in _PATHS
            if getattr(config, name) is not None
        },
    )
    check_epochs(config.num_epochs, config.eval_every)
    with lock_folder(store):
        _check_stored_config(config, store)
        splits = build_splits(config, progress=progress)
        state = create_state(config, splits)
        check_arguments(
            splits,
            config.num_epochs,
            config.batch_size,
            config.eval_every,
            config.augment,
        )
        write_json(config.to_json(), store / CONFIG_FILE)
        state, metrics = train(
            state=state,
            rng=_keys(config.seed).train,
            dataset_splits=splits,
            num_epochs=config.num_epochs,
            batch_size=config.batch_size,
            classification_weight=config.classification_weight,
            eval_every=config.eval_every,
            store_path=store / CHECKPOINTS,
            augment=config.augment,
            settings=config.settings(),
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
