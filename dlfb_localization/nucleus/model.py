"""The conditional U-Net (nucleus + protein identity -> protein) and PatchGAN."""

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ConditionalUNet", "ConvBlock", "FiLM", "PatchDiscriminator"]


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018) by a condition vector.

    Returns `x * (1 + gamma) + beta`, with `gamma` and `beta` one Dense layer of
    the condition: each protein rescales and shifts every feature map. The
    Dense layer starts at zero, so a fresh FiLM is the identity and training
    starts from a plain U-Net (as adaLN-Zero does in diffusion transformers);
    the first gradient step already makes it depend on the condition.
    """

    @nn.compact
    def __call__(self, x: jax.Array, condition: jax.Array) -> jax.Array:
        """Modulates `x` `[b, h, w, c]` by `condition` `[b, d]`."""
        dense = nn.Dense(2 * x.shape[-1], kernel_init=nn.initializers.zeros)
        gamma, beta = jnp.split(dense(condition), 2, axis=-1)
        return x * (1 + gamma[:, None, None]) + beta[:, None, None]


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by swish.

    Attributes:
      features: output channels.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(2):
            x = nn.swish(nn.Conv(self.features, kernel_size=(3, 3))(x))
        return x


class ConditionalUNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) from a nucleus image to its protein image.

    The protein's identity is a learned embedding (`nn.Embed` over the data's
    protein codes) that modulates the features by FiLM at the bottleneck and
    after every decoder level, so the same nucleus gives each protein its own
    pattern. Downsampling is 2x2 average pooling, upsampling a 2x2 stride-2
    transposed convolution followed by a `ConvBlock` on it and the skip
    connection. Images of any size are padded (by edge values) to a multiple
    of `2**depth` and the prediction is cropped back.

    Attributes:
      num_proteins: rows of the embedding table; protein codes must lie in
        `[0, num_proteins)`.
      features: channels at full resolution, doubled at each level down.
      depth: number of 2x downsamplings.
      embedding_dim: length of each protein's embedding.
    """

    num_proteins: int
    features: int = 16
    depth: int = 3
    embedding_dim: int = 32

    @nn.compact
    def __call__(self, nucleus: jax.Array, protein_ids: jax.Array) -> jax.Array:
        """Predicts protein images.

        Args:
          nucleus: `[b, h, w, 1]` nucleus (Hoechst) images.
          protein_ids: `[b]` int protein codes. Out-of-range codes are not caught
            here (a traced value cannot raise); the training and evaluation
            functions check them.

        Returns:
          `[b, h, w, 1]` predicted protein images (linear output).
        """
        height, width = nucleus.shape[1:3]
        multiple = 2**self.depth
        x = jnp.pad(
            nucleus,
            ((0, 0), (0, -height % multiple), (0, -width % multiple), (0, 0)),
            mode="edge",
        )
        condition = nn.Embed(
            self.num_proteins, self.embedding_dim, name="protein_embedding"
        )(protein_ids)
        skips = []
        for level in range(self.depth):
            x = ConvBlock(self.features * 2**level)(x)
            skips.append(x)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = FiLM()(ConvBlock(self.features * 2**self.depth)(x), condition)
        for level in reversed(range(self.depth)):
            features = self.features * 2**level
            x = nn.ConvTranspose(features, kernel_size=(2, 2), strides=(2, 2))(x)
            x = ConvBlock(features)(jnp.concatenate([x, skips[level]], axis=-1))
            x = FiLM()(x, condition)
        return nn.Conv(1, kernel_size=(1, 1))(x)[:, :height, :width]


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017, section 3.2.2), conditioned on the
    nucleus.

    The nucleus and a (real or predicted) protein image are concatenated and
    passed through `depth` 4x4 stride-2 convolutions, one 4x4 stride-1
    convolution (LeakyReLU 0.2 after each) and a 4x4 convolution to one logit
    per position: each logit judges one overlapping patch (34 px across for
    `depth=2`). Unlike pix2pix there is no BatchNorm, so the discriminator has
    no state beyond its parameters.

    Attributes:
      features: channels of the first convolution, doubled at each level.
      depth: number of stride-2 convolutions.
    """

    features: int = 16
    depth: int = 2

    @nn.compact
    def __call__(self, nucleus: jax.Array, protein: jax.Array) -> jax.Array:
        """Logits `[b, h', w', 1]` that each patch of `protein` `[b, h, w, 1]` is
        real, given `nucleus` `[b, h, w, 1]`; `h' = h / 2**depth - 2`."""
        x = jnp.concatenate([nucleus, protein], axis=-1)
        for level in range(self.depth + 1):
            stride = 2 if level < self.depth else 1
            x = nn.Conv(
                self.features * 2**level,
                kernel_size=(4, 4),
                strides=(stride, stride),
                padding=1,
            )(x)
            x = nn.leaky_relu(x, negative_slope=0.2)
        return nn.Conv(1, kernel_size=(4, 4), padding=1)(x)
