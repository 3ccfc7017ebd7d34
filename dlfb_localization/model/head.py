"""The classification head (cytoself's "FcBlock")."""

import flax.linen as nn
import jax

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
    """

    num_classes: int
    dropout_rate: float
    layers: int

    @nn.compact
    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        """Maps `[batch, features]` to `[batch, num_classes]` logits.

        Dropout draws from the "dropout" rng stream when `is_training` is true.
        """
        for _ in range(self.layers - 1):
            x = nn.Dense(features=HIDDEN_FEATURES)(x)
            x = nn.relu(x)
            x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not is_training)
        return nn.Dense(features=self.num_classes)(x)
