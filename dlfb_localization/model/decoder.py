"""The decoder: from a quantized latent grid back to an image."""

import flax.linen as nn
import jax

from dlfb_localization.model.encoder import ResnetBlock


class Upsample(nn.Module):
    """Bilinear upsampling followed by a 3x3 convolution.

    Resizing then convolving avoids the checkerboard artefacts of transposed
    convolutions.

    Attributes:
      latent_dim: output channels of the convolution.
      upfactor: spatial scale factor.
    """

    latent_dim: int
    upfactor: int

    def setup(self) -> None:
        self.conv = nn.Conv(self.latent_dim, kernel_size=(3, 3), padding=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, h, w, c]` to `[batch, h * upfactor, w * upfactor,
        latent_dim]`."""
        batch, height, width, channels = x.shape
        x = jax.image.resize(
            x,
            shape=(batch, height * self.upfactor, width * self.upfactor, channels),
            method="bilinear",
        )
        return self.conv(x)


class Decoder(nn.Module):
    """Two residual blocks, then two x2 upsamplings back to image resolution.

    The output channel count is an argument of the call rather than a field: it
    is the input image's channel count, which the model only sees at call time,
    so one `LocalizationModel` decodes 1-channel and multi-channel data alike.

    Attributes:
      latent_dim: channels of the quantized latents.
    """

    latent_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, out_channels: int) -> jax.Array:
        """Decodes latents.

        Args:
          x: `[batch, h, w, latent_dim]` quantized latents.
          out_channels: channels of the reconstruction (1 in the chapter).

        Returns:
          `[batch, 4 * h, 4 * w, out_channels]` reconstruction (no output
          activation, as in the chapter).
        """
        x = ResnetBlock(self.latent_dim, name="res_block1")(x)
        x = ResnetBlock(self.latent_dim, name="res_block2")(x)
        x = Upsample(self.latent_dim // 2, upfactor=2, name="upsample1")(x)
        x = nn.relu(x)
        return Upsample(out_channels, upfactor=2, name="upsample2")(x)
