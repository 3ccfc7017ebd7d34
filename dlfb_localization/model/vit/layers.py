"""The vision transformer's parts: patches, pre-LN blocks and the encoder.

A crop `[h, w, c]` is cut into `(h / p) * (w / p)` non-overlapping `p x p`
patches, in row-major order; each patch's `p * p * c` pixels are one token.
The same cut gives the masked autoencoder its per-patch targets
(`model.vit.mae`), so `patchify` and `unpatchify` are plain functions.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "Transformer",
    "TransformerBlock",
    "TransformerSize",
    "ViTEncoder",
    "check_patches",
    "patchify",
    "unpatchify",
]

# ViT's and MAE's initialisation: xavier-uniform weights, small position
# embeddings (a truncated normal of std 0.02 in the reference code).
_DENSE_INIT = nn.initializers.xavier_uniform()
_POSITION_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    """The shape of a stack of transformer blocks.

    Attributes:
      width: token dimension D.
      depth: number of blocks.
      num_heads: attention heads; must divide `width`.
      mlp_dim: hidden width of each block's MLP (ViT uses 4 x width).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int

    def __post_init__(self) -> None:
        for name in ("width", "depth", "num_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide width ({self.width})"
            )


def check_patches(shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    """The patch grid `(rows, cols)` of `[batch, h, w, c]` images.

    Raises:
      ValueError: the images are not 4-d, or `patch_size` does not divide h
        and w.
    """
    if len(shape) != 4:
        raise ValueError(f"expected [batch, h, w, c] images, got shape {shape}")
    h, w = shape[1:3]
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(
            f"patch_size {patch_size} must divide the crop's height and width "
            f"({h}x{w}); choose e.g. 10 for 100x100 crops"
        )
    return h // patch_size, w // patch_size


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Cuts images into flattened patches.

    Args:
      images: `[batch, h, w, c]`; `patch_size` divides h and w.
      patch_size: p.

    Returns:
      `[batch, (h / p) * (w / p), p * p * c]`: patches in row-major order, each
      flattened as `[p, p, c]`.
    """
    rows, cols = check_patches(images.shape, patch_size)
    b, c, p = images.shape[0], images.shape[3], patch_size
    x = images.reshape(b, rows, p, cols, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, rows * cols, p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int]) -> jax.Array:
    """The inverse of `patchify`.

    Args:
      patches: `[batch, rows * cols, p * p * c]`.
      patch_size: p.
      grid: `(rows, cols)` of the patch grid.

    Returns:
      `[batch, rows * p, cols * p, c]` images.
    """
    b, n, d = patches.shape
    rows, cols = grid
    p = patch_size
    c = d // (p * p)
    if n != rows * cols or c * p * p != d:
        raise ValueError(
            f"{n} patches of {d} values do not fit a {rows}x{cols} grid of {p}x{p} "
            "patches"
        )
    x = patches.reshape(b, rows, cols, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, rows * p, cols * p, c)


class TransformerBlock(nn.Module):
    """A pre-LN transformer block (ViT, MAE):
    `x + attention(LN(x))`, then `x + MLP(LN(x))` with a GELU MLP.

    Attributes:
      num_heads: attention heads.
      mlp_dim: the MLP's hidden width.
      dtype: computation dtype (parameters stay float32).
    """

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, tokens, D]` to the same shape."""
        width = x.shape[-1]
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            kernel_init=_DENSE_INIT,
            deterministic=True,
        )(y, y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_DENSE_INIT)(y)
        y = nn.gelu(y)
        y = nn.Dense(width, dtype=self.dtype, kernel_init=_DENSE_INIT)(y)
        return x + y


class Transformer(nn.Module):
    """`size.depth` pre-LN blocks and a final LayerNorm.

    Attributes:
      size: width, depth, heads and MLP width (`TransformerSize`); the input
        must already have `size.width` channels.
      dtype: computation dtype (parameters stay float32).
    """

    size: TransformerSize
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, tokens, width]` to the same shape."""
        for _ in range(self.size.depth):
            x = TransformerBlock(self.size.num_heads, self.size.mlp_dim, self.dtype)(x)
        return nn.LayerNorm(dtype=self.dtype)(x)


class ViTEncoder(nn.Module):
    """A ViT without a class token: patch embedding, learned position
    embeddings, pre-LN blocks. Tokens are pooled afterwards
    (`model.vit.pooling`), which is what the class token would otherwise do.

    Attributes:
      size: the blocks' shape (`TransformerSize`).
      patch_size: side p of the square patches.
      dtype: computation dtype (parameters stay float32).
    """

    size: TransformerSize
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, keep_indices: jax.Array | None = None
    ) -> jax.Array:
        """Encodes images, or only some of their patches (MAE's visible ones).

        Args:
          images: `[batch, h, w, c]`; `patch_size` divides h and w.
          keep_indices: optional `[batch, n_keep]` int patch indices to encode;
            the others are dropped after the position embedding is added, so
            every token keeps its place (MAE, He et al. 2022, section 3).

        Returns:
          `[batch, n_tokens or n_keep, width]` tokens.
        """
        patches = patchify(images, self.patch_size)
        x = nn.Dense(
            self.size.width,
            dtype=self.dtype,
            kernel_init=_DENSE_INIT,
            name="patch_embedding",
        )(patches)
        positions = self.param(
            "position_embedding", _POSITION_INIT, (1, *x.shape[1:]), jnp.float32
        )
        x = x + positions.astype(x.dtype)
        if keep_indices is not None:
            x = jnp.take_along_axis(x, keep_indices[..., None], axis=1)
        return Transformer(self.size, self.dtype)(x)
