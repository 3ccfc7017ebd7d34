"""Gated attention pooling: tokens to one embedding per crop, with weights
that show where the model looks.

SubCell pools its ViT's tokens with the gated attention of Ilse et al. 2018
(attention-based multiple-instance learning, eq. 9): a tanh branch times a
sigmoid gate, a linear layer to one score per head and token, a softmax over
tokens, and per head the weighted sum of the tokens. With 2 heads a ViT-B's
embedding is 2 x 768 = 1,536 values. The weights are returned, so that
attention maps can be drawn over the crops.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["GatedAttentionPooling", "PooledTokens", "pool_tokens"]


class PooledTokens(NamedTuple):
    """What pooling returns.

    Attributes:
      pooled: `[batch, num_heads * width]` float32, the heads' weighted sums
        concatenated (head 0 first).
      weights: `[batch, tokens, num_heads]` float32, each head's softmax over
        tokens (sums to one over the token axis).
    """

    pooled: jax.Array
    weights: jax.Array


def pool_tokens(tokens: jax.Array, scores: jax.Array) -> PooledTokens:
    """Softmax over tokens of each head's scores, and the weighted sums.

    Args:
      tokens: `[batch, tokens, width]`.
      scores: `[batch, tokens, num_heads]` unnormalised scores.

    Returns:
      `PooledTokens`: `pooled[b, h * width + d] = sum_t weights[b, t, h] *
      tokens[b, t, d]`, computed in float32.
    """
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=1)
    pooled = jnp.einsum("bth,btd->bhd", weights, tokens.astype(jnp.float32))
    return PooledTokens(pooled.reshape(pooled.shape[0], -1), weights)


class GatedAttentionPooling(nn.Module):
    """Gated attention pooling (Ilse et al. 2018, eq. 9; SubCell's pooler).

    `scores = Linear(tanh(Linear(h)) * sigmoid(Linear(h)))`, one per head; see
    `pool_tokens` for the rest.

    Attributes:
      num_heads: pooling heads (SubCell: 2); the embedding has `num_heads *
        width` values.
      hidden_dim: width of the tanh and gate branches (None: the tokens').
      dtype: computation dtype of the branches (parameters stay float32; the
        softmax and sums are float32).
    """

    num_heads: int = 2
    hidden_dim: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> PooledTokens:
        """Pools `[batch, tokens, width]` (see `PooledTokens`)."""
        hidden = self.hidden_dim or tokens.shape[-1]
        content = jnp.tanh(nn.Dense(hidden, dtype=self.dtype, name="tanh")(tokens))
        gate = nn.sigmoid(nn.Dense(hidden, dtype=self.dtype, name="gate")(tokens))
        scores = nn.Dense(self.num_heads, dtype=self.dtype, name="scores")(
            content * gate
        )
        return pool_tokens(tokens, scores)
