"""`RunConfig`: every setting that decides a training run, each field also
the command line's flag (`settings.setting`).

A setting may apply to some model families only (`families=`): the codebook's
and the head's to the VQ-VAEs, the objective's and the patches' to the ViT. A
run records (`to_json`, `config.json`) and compares (`settings`, the
checkpoint) only its own family's, so that settings added for one family
leave the others' records, and their runs' resumption, unchanged; a record
without a later setting reads back with its default.
"""

import dataclasses
from typing import Any

from dlfb_localization.model.codebook import LOOKUPS, CodebookOptions
from dlfb_localization.model.contrastive import OBJECTIVES
from dlfb_localization.model.vit import VIT_SIZES
from dlfb_localization.model.vqvae import ENCODERS
from dlfb_localization.orientation import AUGMENT_MODES
from dlfb_localization.run_families import MODELS, VQ_FAMILIES
from dlfb_localization.settings import applies, parse_channels, setting

__all__ = ["PATHS", "RunConfig"]

# RunConfig's fields that locate files rather than decide the result.
PATHS = ("data", "cache_dir")


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
      model: "chapter" (`LocalizationModel`), "cytoself" (`CytoselfModel`:
        two levels, split quantization, two heads; `embedding_dim`,
        `num_embeddings` and `classification_head_layers` then apply to both
        levels, and cytoself's own values are 64, 2048 and 3) or "vit"
        (`ViTModel`, trained as SubCell; the codebook's and the head's
        settings do not apply to it, and are not recorded for it).
      global_splits: `CytoselfModel.global_splits`.
      ema_decay, restart_dead_codes, kmeans_init, lookup: `CodebookOptions`
        ("cosine" lookup by default; "euclidean" is the chapter's).
      objective, vit_size, patch_size: the ViT's `contrastive.OBJECTIVES`,
        `VIT_SIZES` and patch side.
      proteins_per_batch, crops_per_protein: the ViT's P x K batches
        (`dataset.protein_batches`), used in place of `batch_size` when its
        objective has the protein task.
      weight_decay: the ViT's AdamW weight decay.
      learning_rate: the optimizer's (None: the family's, `run_families`:
        Adam at 1e-3 for the VQ families, AdamW at 1e-4 for the ViT).
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
    embedding_dim: int = setting(64, "code length D", families=VQ_FAMILIES)
    num_embeddings: int = setting(512, "codebook size K", families=VQ_FAMILIES)
    commitment_cost: float = setting(
        0.25, "beta, the commitment loss's weight", families=VQ_FAMILIES
    )
    dropout_rate: float = setting(0.45, "dropout in the head", families=VQ_FAMILIES)
    classification_head_layers: int = setting(
        2, "Dense layers in the head", flag="--head-layers", families=VQ_FAMILIES
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
        families=VQ_FAMILIES,
    )
    model: str = setting(
        "chapter",
        "chapter (one level of codes), cytoself (the paper's full model: local "
        "and global codes, split quantization, a head on each level; train it on "
        "--channels 0,1 with --num-embeddings 2048 --head-layers 3 for the "
        "paper's sizes) or vit (a SubCell-style vision transformer: see "
        "--objective and --vit-size)",
        choices=tuple(MODELS),
    )
    global_splits: int = setting(
        9, "cytoself: sub-vectors per global code", families=VQ_FAMILIES
    )
    ema_decay: float | None = setting(
        None,
        "learn codebooks as moving averages with this decay, e.g. 0.99",
        unset="none: by gradient descent, as the chapter",
        families=VQ_FAMILIES,
    )
    restart_dead_codes: bool = setting(
        False,
        "move codes that fell out of use onto poorly described encoder outputs",
        families=VQ_FAMILIES,
    )
    kmeans_init: bool = setting(
        False,
        "start codebooks at k-means centroids of the untrained encoder's outputs",
        families=VQ_FAMILIES,
    )
    lookup: str = setting(
        "cosine",
        "match encoder outputs with codes as unit vectors (cosine) or as raw "
        "vectors (euclidean, the chapter's: its codebook loss grows during training)",
        choices=LOOKUPS,
        families=VQ_FAMILIES,
    )
    objective: str = setting(
        "subcell",
        "vit: subcell (MAE, cell- and protein-specific contrastive tasks, "
        "SubCell's weights), mae (reconstruction only) or protein (supervised "
        "contrastive only)",
        choices=tuple(OBJECTIVES),
        families=("vit",),
    )
    vit_size: str = setting(
        "tiny",
        "vit: tiny (trains in minutes on a CPU), small or base (SubCell's ViT-B)",
        choices=tuple(VIT_SIZES),
        families=("vit",),
    )
    patch_size: int = setting(
        10, "vit: patch side in pixels; divides the crop's", families=("vit",)
    )
    proteins_per_batch: int = setting(
        32,
        "vit, objectives with the protein task: P proteins per batch of P x K "
        "crops (replaces --batch-size)",
        families=("vit",),
    )
    crops_per_protein: int = setting(
        8, "vit: K crops of each protein per batch", families=("vit",)
    )
    weight_decay: float = setting(0.05, "vit: AdamW's weight decay", families=("vit",))
    learning_rate: float | None = setting(
        None,
        "the optimizer's learning rate",
        unset="1e-3 (Adam) for chapter and cytoself, 1e-4 (AdamW) for vit",
    )
    num_epochs: int = setting(10, "passes over the training split", flag="--epochs")
    batch_size: int = setting(256, "frames per step")
    classification_weight: float = setting(
        1.0,
        "weight of the protein-id loss; 0 trains without the head",
        families=VQ_FAMILIES,
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
        if self.model not in MODELS:
            raise ValueError(
                f"model must be one of {tuple(MODELS)}, got {self.model!r}"
            )
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", MODELS[self.model].learning_rate)
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
        return {k: v for k, v in self.to_json().items() if k not in PATHS}

    def to_json(self) -> dict[str, Any]:
        """The settings that apply to the run's family (`settings.applies`):
        another family's are left out, so that adding settings for one family
        changes nothing in the others' records (and comparisons)."""
        values = {**dataclasses.asdict(self), "channels": list(self.channels)}
        return {
            field.name: values[field.name]
            for field in dataclasses.fields(self)
            if applies(field, self.model)
        }

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
