"""A training run as a folder: its configuration, checkpoints and metrics.

The chapter's code builds the splits, the model and the optimizer by hand and
calls `train`. The command line and the demo do the same from one `RunConfig`,
kept in the run folder (its "store"), so that `evaluate`, `embed` and `figures`
can rebuild exactly the data and model a run was trained on::

    store/
      config.json    the RunConfig (written first, through a temporary file)
      checkpoints/   Orbax steps written by `train` after every epoch
      metrics.json   the training history, once training has finished

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

import jax
import numpy as np
import optax
from flax.training.train_state import TrainState

from dlfb_localization import checkpoint
from dlfb_localization.dataset import Dataset
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.utils import count_unique_proteins
from dlfb_localization.files import write_json
from dlfb_localization.metrics import History
from dlfb_localization.model import LocalizationModel
from dlfb_localization.model.codebook import CodebookOptions
from dlfb_localization.model.cytoself import CytoselfModel
from dlfb_localization.model.vqvae import ENCODERS
from dlfb_localization.orientation import AUGMENT_MODES
from dlfb_localization.train import train

logger = logging.getLogger(__name__)

__all__ = ["Run", "RunConfig", "build_splits", "create_state", "load_run", "train_run"]

MODELS = ("chapter", "cytoself")
SPLITS = {"train": 0.80, "valid": 0.10, "test": 0.10}
CONFIG_FILE = "config.json"
# Training frames drawn at initialisation (data variance, k-means).
_INIT_FRAMES = 256
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run, with the chapter's values as defaults.

    Attributes:
      data: folder with the OpenCell release (or the sample format).
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
    channels: tuple[int, ...] = (0,)
    cache_dtype: str = "float32"
    seed: int = 42
    n_proteins: int | None = None
    max_frames: int | None = None
    embedding_dim: int = 64
    num_embeddings: int = 512
    commitment_cost: float = 0.25
    dropout_rate: float = 0.45
    classification_head_layers: int = 2
    standardize_inputs: bool = True
    compute_dtype: str = "float32"
    encoder: str = "residual"
    model: str = "chapter"
    global_splits: int = 9
    ema_decay: float | None = None
    restart_dead_codes: bool = False
    kmeans_init: bool = False
    lookup: str = "cosine"
    learning_rate: float = 1e-3
    num_epochs: int = 10
    batch_size: int = 256
    classification_weight: float = 1.0
    eval_every: int = 1
    augment: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", str(self.data))
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


def create_state(config: RunConfig, splits: dict[str, Dataset]) -> TrainState:
    """The initial `TrainState` of the run's model and Adam optimizer."""
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
    keys = _keys(config.seed)
    # A seeded sample of training frames: the data's variance (the full
    # model's loss divides by it) and k-means initialisation read it.
    train_split = splits["train"]
    sample = next(
        train_split.get_batches(keys.init, min(_INIT_FRAMES, len(train_split)))
    )["images"]
    if config.model == "cytoself":
        variance = 1.0 if config.standardize_inputs else float(np.var(sample))
        model = CytoselfModel(
            **common, global_splits=config.global_splits, data_variance=variance
        )
    else:
        model = LocalizationModel(**common, encoder_type=config.encoder)
    return model.create_train_state(
        rng=keys.init,
        dummy_input=train_split.get_dummy_input(),
        tx=optax.adam(config.learning_rate),
        init_images=sample if config.kmeans_init else None,
    )


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

    A folder holding another configuration is refused with
    `checkpoint.ConfigMismatchError` naming the differing settings; nothing in
    it is changed.
    """
    store = Path(store)
    if (store / CONFIG_FILE).is_file():
        stored = _read_config(store)
        differences = checkpoint.find_config_differences(
            stored.to_json(), config.to_json()
        )
        if differences:
            raise checkpoint.ConfigMismatchError(
                f"{store} holds a run with other settings; use another --store. "
                "Differences: " + "; ".join(differences)
            )
    splits = build_splits(config, progress=progress)
    state = create_state(config, splits)
    store.mkdir(parents=True, exist_ok=True)
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
    )
    write_json(metrics, store / METRICS_FILE)
    return Run(config, splits, state, metrics, _keys(config.seed).frames)


def load_run(store: str | os.PathLike, progress: bool = False) -> Run:
    """The latest checkpoint of the run in `store`, with its data and metrics.

    Raises:
      FileNotFoundError: `store` is not a run folder or has no checkpoint yet.
      checkpoint.ConfigMismatchError: the data changed since training.
    """
    store = Path(store)
    config = _read_config(store)
    splits = build_splits(config, progress=progress)
    state = create_state(config, splits)
    run_config = checkpoint.build_run_config(
        state,
        _keys(config.seed).train,
        splits,
        num_epochs=config.num_epochs,
        batch_size=config.batch_size,
        classification_weight=config.classification_weight,
        eval_every=config.eval_every,
        augment=config.augment,
    )
    manager = checkpoint.open_manager(store / CHECKPOINTS)
    try:
        restored = checkpoint.restore_run(manager, state, run_config)
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
