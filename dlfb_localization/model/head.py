"""The classification head (cytoself's "FcBlock")."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The chapter's hidden width.
HIDDEN_FEATURES = 1000


class ClassificationHead(nn.Module):
    """MLP that predicts the protein id from the flattened quantized latents.

    `layers - 1` blocks of Dense(1000), ReLU and dropout, then a Dense layer to
    the class logits. The auxiliary task pushes the codebook to encode what tells
    proteins apart, which keeps it from collapsing (Kobayashi et al. 2022).

    Attributes:
      num_classes: number of protein ids.
      dropout_rate: dropout probability after each hidden layer.
      layers: number of Dense layers, at least 1.
      dtype: computation dtype (parameters stay float32).
    """

    num_classes: int
    dropout_rate: float
    layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        """Maps `[batch, features]` to `[batch, num_classes]` logits.

        Dropout draws from the "dropout" rng stream when `is_training` is true.
        """
        for _ in range(self.layers - 1):
            x = nn.Dense(features=HIDDEN_FEATURES, dtype=self.dtype)(x)
            x = nn.relu(x)
            x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not is_training)
        return nn.Dense(features=self.num_classes, dtype=self.dtype)(x)
