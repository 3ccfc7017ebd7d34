"""`PredictConfig`: the settings of a `predict` run (no heavy imports, so the
command line can read its defaults quickly)."""

import dataclasses

__all__ = ["PredictConfig"]


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Everything that decides a `predict` run.

    Attributes:
      data: folder with the OpenCell release (channels 0 and 1 are read).
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
    seed: int = 42
    gan: bool = False
    image_size: int = 48
    features: int = 8
    depth: int = 3
    embedding_dim: int = 32
    num_epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    gan_learning_rate: float = 2e-4
    l1_weight: float = 100.0

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
