"""The encoder, and the residual block it shares with the decoder."""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Flax's (and the chapter's) GroupNorm default.
_MAX_GROUPS = 32


class ResnetBlock(nn.Module):
    """Residual block: GroupNorm, swish, 3x3 conv, twice, plus the input.

    The GroupNorm + swish pairing follows the diffusion-model blocks the chapter
    borrows. GroupNorm uses `gcd(32, latent_dim)` groups: 32 for the chapter's
    `latent_dim=64` (Flax's default), and a valid count for small test models
    whose channels are not a multiple of 32.

    Attributes:
      latent_dim: channels in and out; the input must already have this many.
      dtype: computation dtype (parameters stay float32; GroupNorm's statistics
        are computed in float32 either way).
    """

    latent_dim: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        num_groups = math.gcd(_MAX_GROUPS, self.latent_dim)
        self.norm1 = nn.GroupNorm(num_groups=num_groups, dtype=self.dtype)
        self.conv1 = nn.Conv(
            self.latent_dim, kernel_size=(3, 3), padding=1, dtype=self.dtype
        )
        self.norm2 = nn.GroupNorm(num_groups=num_groups, dtype=self.dtype)
        self.conv2 = nn.Conv(
            self.latent_dim, kernel_size=(3, 3), padding=1, dtype=self.dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, h, w, latent_dim]` to the same shape."""
        h = self.conv1(nn.swish(self.norm1(x)))
        h = self.conv2(nn.swish(self.norm2(h)))
        return x + h


class Encoder(nn.Module):
    """Convolutional encoder: 4x spatial downsampling to `latent_dim` channels.

    Two 4x4 stride-2 convolutions (to `latent_dim // 2`, then `latent_dim`
    channels, each followed by ReLU), a 3x3 convolution and two residual blocks.
    A 100x100 crop becomes a 25x25 grid of `latent_dim`-vectors.

    Attributes:
      latent_dim: output channels; the quantizer's `embedding_dim`.
      dtype: computation dtype (parameters stay float32).
    """

    latent_dim: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        # padding=1 with a 4x4 kernel and stride 2 halves even sizes exactly.
        conv = functools.partial(nn.Conv, dtype=self.dtype)
        self.conv1 = conv(
            self.latent_dim // 2, kernel_size=(4, 4), strides=(2, 2), padding=1
        )
        self.conv2 = conv(
            self.latent_dim, kernel_size=(4, 4), strides=(2, 2), padding=1
        )
        self.conv3 = conv(self.latent_dim, kernel_size=(3, 3), padding=1)
        self.res_block1 = ResnetBlock(self.latent_dim, dtype=self.dtype)
        self.res_block2 = ResnetBlock(self.latent_dim, dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Encodes images.

        Args:
          x: `[batch, height, width, channels]` images.

        Returns:
          `[batch, height // 4, width // 4, latent_dim]` continuous latents.
        """
        x = nn.relu(self.conv1(x))
        x = nn.relu(self.conv2(x))
        x = self.conv3(x)
        x = self.res_block1(x)
        return self.res_block2(x)
