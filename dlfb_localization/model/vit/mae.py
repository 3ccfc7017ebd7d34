"""The masked autoencoder's parts (He et al. 2022, "Masked autoencoders are
scalable vision learners"): random masking, the decoder, normalised-pixel
targets and the loss on masked patches.

The encoder sees only the kept patches; the decoder gets their tokens back in
place, a shared learned mask token everywhere else, and predicts every patch's
pixels. The loss counts only the masked patches (MAE, section 3: "we compute
the loss only on masked patches"), against each patch's pixels standardised
by the patch's own mean and variance (MAE's `norm_pix_loss`), which the paper
finds gives better representations than raw pixels.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlfb_localization.model.vit.layers import Transformer, TransformerSize

__all__ = [
    "MAEDecoder",
    "Masking",
    "compute_reconstruction_loss",
    "count_kept",
    "denormalise_patches",
    "normalise_patches",
    "random_masking",
]

# MAE's epsilon in the patch standardisation: a flat patch gives zeros.
_PATCH_EPSILON = 1e-6


class Masking(NamedTuple):
    """Which patches of each image the encoder sees.

    Attributes:
      keep_indices: `[batch, n_keep]` int32 indices of the kept patches,
        ascending, distinct.
      mask: `[batch, n_tokens]` float32, 1 where a patch is masked (hidden from
        the encoder, counted by the loss), 0 where it is kept.
    """

    keep_indices: jax.Array
    mask: jax.Array


def count_kept(n_tokens: int, mask_ratio: float) -> int:
    """`round((1 - mask_ratio) * n_tokens)` patches kept, at least one.

    Raises:
      ValueError: `mask_ratio` is outside `[0, 1)`.
    """
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, round((1 - mask_ratio) * n_tokens))


def random_masking(
    rng: jax.Array, batch: int, n_tokens: int, mask_ratio: float
) -> Masking:
    """Draws, per image, a uniformly random set of patches to keep.

    Every image keeps exactly `count_kept(n_tokens, mask_ratio)` patches (MAE's
    "random sampling ... without replacement, following a uniform
    distribution"): the first ones of a random permutation, drawn by ranking
    uniform noise.

    Args:
      rng: JAX key; the same key gives the same masks.
      batch: number of images.
      n_tokens: patches per image.
      mask_ratio: share of patches to mask, in `[0, 1)`.

    Returns:
      `Masking` (kept indices and the `[batch, n_tokens]` mask).
    """
    n_keep = count_kept(n_tokens, mask_ratio)
    noise = jax.random.uniform(rng, (batch, n_tokens))
    keep_indices = jnp.sort(jnp.argsort(noise, axis=1)[:, :n_keep], axis=1)
    rows = jnp.arange(batch)[:, None]
    mask = jnp.ones((batch, n_tokens), jnp.float32).at[rows, keep_indices].set(0.0)
    return Masking(keep_indices.astype(jnp.int32), mask)


def normalise_patches(patches: jax.Array) -> jax.Array:
    """Standardises each patch by its own mean and variance (MAE's
    `norm_pix_loss` targets).

    Args:
      patches: `[batch, tokens, values]`.

    Returns:
      The same shape, float32: `(x - mean) / sqrt(var + 1e-6)` per patch.
    """
    patches = patches.astype(jnp.float32)
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True)
    return (patches - mean) / jnp.sqrt(var + _PATCH_EPSILON)


def denormalise_patches(normalised: jax.Array, patches: jax.Array) -> jax.Array:
    """Puts standardised patches back on the scale of `patches`, each with
    that patch's own mean and standard deviation: the inverse of
    `normalise_patches(patches)`, as MAE's figures show predictions of
    `norm_pix_loss` targets.

    Args:
      normalised: `[batch, tokens, values]`, e.g. the decoder's predictions.
      patches: `[batch, tokens, values]` whose per-patch moments to use.

    Returns:
      float32 `normalised * sqrt(var + 1e-6) + mean`, per patch.
    """
    patches = patches.astype(jnp.float32)
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True)
    return normalised.astype(jnp.float32) * jnp.sqrt(var + _PATCH_EPSILON) + mean


def compute_reconstruction_loss(
    predictions: jax.Array, targets: jax.Array, mask: jax.Array
) -> jax.Array:
    """Mean squared error over the masked patches only (MAE, section 3).

    Args:
      predictions: `[batch, tokens, values]` predicted patches.
      targets: `[batch, tokens, values]`, e.g. `normalise_patches(patches)`.
      mask: `[batch, tokens]`, 1 at masked patches, 0 at kept ones.

    Returns:
      Scalar float32: per patch the mean squared error over its values, averaged
      over the masked patches (0 when no patch is masked).
    """
    per_patch = jnp.mean(jnp.square(predictions.astype(jnp.float32) - targets), -1)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: kept tokens back in place, a learned mask
    token elsewhere, position embeddings, pre-LN blocks, and a linear layer to
    each patch's pixels.

    Attributes:
      size: the decoder blocks' shape (SubCell: 8 blocks of width 512).
      dtype: computation dtype (parameters stay float32; output is float32).
    """

    size: TransformerSize
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        keep_indices: jax.Array,
        n_tokens: int,
        patch_values: int,
    ) -> jax.Array:
        """Predicts every patch from the encoded kept ones.

        Args:
          tokens: `[batch, n_keep, encoder width]` encoder outputs.
          keep_indices: `[batch, n_keep]` where those tokens sit.
          n_tokens: patches per image.
          patch_values: values per patch to predict, `p * p * channels` (taken
            from the data, as the VQ decoders' output channels are).

        Returns:
          `[batch, n_tokens, patch_values]` float32 predicted patches.
        """
        width = self.size.width
        x = nn.Dense(width, dtype=self.dtype, name="embed")(tokens)
        mask_token = self.param(
            "mask_token", nn.initializers.normal(0.02), (width,), jnp.float32
        )
        full = jnp.broadcast_to(
            mask_token.astype(x.dtype), (x.shape[0], n_tokens, width)
        )
        rows = jnp.arange(x.shape[0])[:, None]
        full = full.at[rows, keep_indices].set(x)
        positions = self.param(
            "position_embedding",
            nn.initializers.normal(0.02),
            (1, n_tokens, width),
            jnp.float32,
        )
        x = Transformer(self.size, self.dtype)(full + positions.astype(x.dtype))
        x = nn.Dense(patch_values, dtype=self.dtype, name="predict")(x)
        return x.astype(jnp.float32)
