"""The decoder: from a quantized latent grid back to an image."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dlfb_localization.model.encoder import ResnetBlock

# Bilinear x2 upsampling (half-pixel centres) followed by a 3x3 convolution is
# linear, so each of the four output phases (even/odd row x even/odd column) is
# a 3x3 convolution of the *low-resolution* input. `_PHASE[a]` maps the conv's
# taps (columns: high-resolution offsets -1, 0, 1) to low-resolution offsets
# (rows: -1, 0, 1) for outputs 2k + a; e.g. upsampled row 2k is
# 0.25 x[k-1] + 0.75 x[k] and row 2k+1 is 0.75 x[k] + 0.25 x[k+1].
_PHASE = np.array(
    [
        [[0.75, 0.25, 0.0], [0.25, 0.75, 0.75], [0.0, 0.0, 0.25]],
        [[0.25, 0.0, 0.0], [0.75, 0.75, 0.25], [0.0, 0.25, 0.75]],
    ],
    np.float32,
)


def _conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _resize(x: jax.Array, height: int, width: int) -> jax.Array:
    return jax.image.resize(
        x, (x.shape[0], height, width, x.shape[3]), method="bilinear"
    )


def _upsample2_weights(n: int) -> np.ndarray:
    """`[n, 2n]`: column j holds the weights of bilinear x2 upsampling (half-
    pixel centres, edges repeated) for output j, the values
    `jax.image.resize` computes for it. As a constant, the strips below are
    two small contractions instead of the ~60 operations per call with which
    `jax.image.resize` computes these weights inside every program."""
    weights = np.zeros((n, 2 * n), np.float32)
    for k in range(n):
        weights[k, 2 * k] += 0.75
        weights[max(k - 1, 0), 2 * k] += 0.25
        weights[k, 2 * k + 1] += 0.75
        weights[min(k + 1, n - 1), 2 * k + 1] += 0.25
    return weights


def _upsampled_strip(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """`x` `[b, h, w, c]` resized by the weights `rows` `[h, H]` and `cols`
    `[w, W]`, as `jax.image.resize` contracts them."""
    return jnp.einsum(
        x,
        [0, 1, 2, 3],
        jnp.asarray(rows, x.dtype),
        [1, 4],
        jnp.asarray(cols, x.dtype),
        [2, 5],
        [0, 4, 5, 3],
        precision=lax.Precision.HIGHEST,
    )


def resize_then_conv(x: jax.Array, kernel: jax.Array, upfactor: int) -> jax.Array:
    """The chapter's upsampling: `jax.image.resize` (bilinear), then a 'same' conv.

    Args:
      x: `[batch, h, w, c]`.
      kernel: `[kh, kw, c, out]` convolution kernel (odd sizes).
      upfactor: spatial scale factor.

    Returns:
      `[batch, upfactor * h, upfactor * w, out]`, without bias.
    """
    _, height, width, _ = x.shape
    pad = [(kernel.shape[0] // 2,) * 2, (kernel.shape[1] // 2,) * 2]
    return _conv(_resize(x, upfactor * height, upfactor * width), kernel, pad)


def upsample2_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`resize_then_conv(x, kernel, 2)` for a 3x3 kernel, without the big image.

    The four output phases are one 3x3 convolution of the edge-padded input with
    `4 * out` channels (same FLOPs), so the upsampled `[batch, 2h, 2w, c]` tensor
    and its gradient (328 MB each at the chapter's batch of 256 in the last
    upsampling) are never built. The outer ring of output pixels, where the
    convolution's zero padding lies outside the upsampled image, is recomputed
    exactly from two-row and two-column strips. Equal to the chapter's form up
    to float rounding (tested).

    Args:
      x: `[batch, h, w, c]`.
      kernel: `[3, 3, c, out]`.

    Returns:
      `[batch, 2h, 2w, out]`, without bias.
    """
    batch, height, width, channels = x.shape
    out = kernel.shape[-1]
    phase_kernel = jnp.einsum(
        "apt,bqs,tsco->pqcabo", _PHASE, _PHASE, kernel.astype(jnp.float32)
    ).astype(kernel.dtype)
    # Edge padding, as two concatenations (`jnp.pad`'s "edge" mode traces
    # four times as many operations).
    padded = jnp.concatenate([x[:, :1], x, x[:, -1:]], axis=1)
    padded = jnp.concatenate([padded[:, :, :1], padded, padded[:, :, -1:]], axis=2)
    y = _conv(padded, phase_kernel.reshape(3, 3, channels, 4 * out), "VALID")
    y = y.reshape(batch, height, width, 2, 2, out).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(batch, 2 * height, 2 * width, out)

    # The first two and last two rows (columns) of the upsampled image, from
    # the input's first two and last two; each convolved with the zero row
    # (column) beyond the image that the chapter's 'same' padding adds.
    edges = _upsample2_weights(2)
    first, last = edges[:, :2], edges[:, 2:]
    across_w, across_h = _upsample2_weights(width), _upsample2_weights(height)
    same = (1, 1)
    top = _conv(_upsampled_strip(x[:, :2], first, across_w), kernel, ((1, 0), same))
    bottom = _conv(_upsampled_strip(x[:, -2:], last, across_w), kernel, ((0, 1), same))
    left = _conv(_upsampled_strip(x[:, :, :2], across_h, first), kernel, (same, (1, 0)))
    right = _conv(
        _upsampled_strip(x[:, :, -2:], across_h, last), kernel, (same, (0, 1))
    )
    y = y.at[:, :1].set(top[:, :1]).at[:, -1:].set(bottom[:, -1:])
    return y.at[:, :, :1].set(left[:, :, :1]).at[:, :, -1:].set(right[:, :, -1:])


class _UpsampleConv(nn.Module):
    """The 3x3 convolution after the resize; its parameters are `nn.Conv`'s
    (same names, shapes and initializers), so the parameter tree is the
    chapter's."""

    features: int
    upfactor: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (3, 3, x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.upfactor == 2 and min(x.shape[1:3]) >= 2:
            y = upsample2_conv3x3(x, kernel)
        else:
            y = resize_then_conv(x, kernel, self.upfactor)
        return y + bias.astype(y.dtype)


class Upsample(nn.Module):
    """Bilinear upsampling followed by a 3x3 convolution.

    Resizing then convolving avoids the checkerboard artefacts of transposed
    convolutions. For the decoder's factor of 2 the two are computed together
    from the low-resolution input (`upsample2_conv3x3`), which gives the same
    output with far less memory.

    Attributes:
      latent_dim: output channels of the convolution.
      upfactor: spatial scale factor.
      dtype: computation dtype (parameters stay float32).
    """

    latent_dim: int
    upfactor: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.conv = _UpsampleConv(self.latent_dim, self.upfactor, dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, h, w, c]` to `[batch, h * upfactor, w * upfactor,
        latent_dim]`."""
        return self.conv(x)


class Decoder(nn.Module):
    """Two residual blocks, then two x2 upsamplings back to image resolution.

    The output channel count is an argument of the call rather than a field: it
    is the input image's channel count, which the model only sees at call time,
    so one `LocalizationModel` decodes 1-channel and multi-channel data alike.

    Attributes:
      latent_dim: channels of the quantized latents.
      dtype: computation dtype (parameters stay float32).
    """

    latent_dim: int
    dtype: Any = jnp.float32

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
        x = ResnetBlock(self.latent_dim, dtype=self.dtype, name="res_block1")(x)
        x = ResnetBlock(self.latent_dim, dtype=self.dtype, name="res_block2")(x)
        x = Upsample(self.latent_dim // 2, 2, dtype=self.dtype, name="upsample1")(x)
        x = nn.relu(x)
        return Upsample(out_channels, 2, dtype=self.dtype, name="upsample2")(x)
