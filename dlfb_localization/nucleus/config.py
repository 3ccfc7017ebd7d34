"""`PredictConfig`: the settings of a `predict` run (no heavy imports, so the
command line can read its defaults quickly)."""

import dataclasses

from dlfb_localization.settings import setting

__all__ = ["PredictConfig"]


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Everything that decides a `predict` run.

    Attributes:
      data: folder with the OpenCell release (channels 0 and 1 are read).
      cache_dir: where the data's cache is kept (None: `<data>/dlfb_cache`).
      seed: seed of the split, the weights and the data order.
      gan: also train pix2pix (the same U-Net against a PatchGAN).
      image_size: side the 100x100 crops are resized to (48 keeps CPU runs
        to minutes).
      features, depth, embedding_dim: the `ConditionalUNet`'s.
      num_epochs, batch_size: of each model's training.
      learning_rate: the U-Net's Adam.
      gan_learning_rate: pix2pix's Adam (beta1 0.5), for both networks.
      l1_weight: pix2pix's lambda.
    """

    data: str
    cache_dir: str | None = setting(
        None,
        "where to keep the data's cache, e.g. when DATA is read-only",
        unset="DATA/dlfb_cache",
    )
    seed: int = setting(42, "seed of the split, the weights and the data order")
    gan: bool = setting(False, "also train pix2pix (the U-Net against a PatchGAN)")
    image_size: int = setting(48, "side the crops are resized to")
    features: int = setting(8, "U-Net channels at full resolution")
    depth: int = setting(3, "U-Net levels (2x downsamplings)")
    embedding_dim: int = setting(32, "length of the protein's embedding")
    num_epochs: int = setting(
        30, "passes over the training split, per model", flag="--epochs"
    )
    batch_size: int = setting(32, "frames per step")
    learning_rate: float = setting(1e-3, "the U-Net's Adam")
    gan_learning_rate: float = setting(2e-4, "pix2pix's Adam, for both networks")
    l1_weight: float = setting(100.0, "pix2pix's lambda")

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", str(self.data))
        for name in ("image_size", "features", "depth", "num_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "gan_learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.l1_weight < 0:
            raise ValueError(f"l1_weight must be >= 0, got {self.l1_weight}")
