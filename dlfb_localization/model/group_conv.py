"""Group convolutions over D4: an encoder whose codes turn with the image.

A cell has no preferred orientation, so rotating or mirroring a crop should not
change what the model says about it. `InvariantEncoder` builds that in (the
group-equivariant CNNs of Cohen & Welling 2016; O2-VAE, Burgess et al. 2023, for
microscopy): every feature map exists in 8 copies, one per element of D4 (the
4 quarter turns of the square, each with or without a mirror flip), and the
layers are built so that transforming the input by `g` transforms every
feature map spatially by `g` and permutes the 8 copies. Pooling over the copies
at the end leaves channels that do not depend on the orientation, on a grid
that turns with the image: `encoder(g x) == g encoder(x)`. The quantizer works
position by position, so the codes turn with the grid and a frame's codebook
histogram and mean quantized vector are invariant to D4 (exactly, but for float
rounding, which could flip a code only at a near-tie between two codes).

Group features are `[batch, h, w, channels, 8]`; copy `k` belongs to the D4
element `k`: flip left-right if `k >= 4`, then `k % 4` counter-clockwise
quarter turns (`d4_apply`; `invariance.d4_transform` applies the same elements
to image batches). The group's algebra lives here, below the `invariance`
package, which builds on the model.

Only D4 is exact on a pixel grid; other angles are matched approximately, by
the smoothness the network learns.
"""

import math
from typing import Any, Final

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

D4_ORDER: Final = 8

__all__ = [
    "D4_ORDER",
    "GroupConv",
    "GroupResnetBlock",
    "InvariantEncoder",
    "LiftingConv",
    "OrbitGroupNorm",
    "d4_apply",
    "d4_compose",
    "d4_inverse",
    "default_group_channels",
]

_MAX_GROUPS = 32


def _check_element(k: int) -> int:
    if not 0 <= int(k) < D4_ORDER:
        raise ValueError(f"a D4 element is an integer in [0, 8), got {k}")
    return int(k)


def d4_compose(a: int, b: int) -> int:
    """The D4 element `a * b`: first apply `b`, then `a`.

    With `g_k = R^r F^f` (rotation R, flip F) and `F R = R^-1 F`,
    `g_a g_b = R^(r_a + (-1)^f_a r_b) F^(f_a + f_b)`.

    Args:
      a, b: elements in `[0, 8)`.

    Returns:
      The element `c` with `d4_transform(d4_transform(x, b), a) ==
      d4_transform(x, c)`.
    """
    a, b = _check_element(a), _check_element(b)
    r_a, f_a = a % 4, a // 4
    r_b, f_b = b % 4, b // 4
    sign = -1 if f_a else 1
    return (r_a + sign * r_b) % 4 + 4 * ((f_a + f_b) % 2)


def d4_inverse(k: int) -> int:
    """The element undoing `k`: rotations invert, flips (mirrors) are their own."""
    k = _check_element(k)
    return k if k >= 4 else (-k) % 4


def d4_apply(x: jax.Array, k: int, axes: tuple[int, int]) -> jax.Array:
    """Applies D4 element `k` to two axes of any array (e.g. a conv kernel).

    Args:
      x: array with a square pair of `axes`.
      k: the element, a Python int in `[0, 8)`.
      axes: the (height, width) axes.

    Returns:
      `x` reversed along `axes[1]` if `k >= 4`, then `jnp.rot90(x, k % 4,
      axes)`: the same element `d4_transform` applies to images.
    """
    k = _check_element(k)
    if k >= 4:
        x = jnp.flip(x, axis=axes[1])
    return jnp.rot90(x, k % 4, axes=axes)


_EPSILON = 1e-6

# `_PERMUTATIONS[g][h]`: the input copy that output copy g reads in the place of
# copy h, `g^-1 h` (a group convolution's kernel is transformed by g and its
# group axis re-indexed by g^-1, Cohen & Welling 2016, eq. 10).
_PERMUTATIONS = np.array(
    [[d4_compose(d4_inverse(g), h) for h in range(D4_ORDER)] for g in range(D4_ORDER)]
)


def default_group_channels(latent_dim: int) -> int:
    """Channels per group element that give about `Encoder`'s parameter count.

    A group convolution between `c` channels per element has `8 c^2` weights
    per kernel position where a plain one between `latent_dim` channels has
    `latent_dim^2`, so `c = latent_dim / sqrt(8)`, rounded to a multiple of 4
    (24 for the chapter's 64: about 250k parameters against `Encoder`'s 220k;
    each layer then holds `8 c = 192` activations per position, 3x `Encoder`'s).
    """
    return max(4, 4 * round(latent_dim / (4 * math.sqrt(D4_ORDER))))


def _conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class LiftingConv(nn.Module):
    """From images to group features: one conv per D4-transformed kernel.

    Output copy `g` is the input correlated with the kernel transformed by `g`,
    so `lift(h x)[..., g] == h lift(x)[..., h^-1 g]`. The sampling grid must be
    symmetric for this to hold exactly: a 4x4 kernel with stride 2 and padding
    1 on an even size, or an odd kernel with stride 1 and `padding =
    kernel_size // 2` (windows centred on pixels 2o + 1/2, symmetric about the
    image centre: 100 -> 50 -> 25 and 16 -> 8 -> 4 keep it).

    Attributes:
      features: output channels per group element.
      kernel_size: square kernel size.
      strides: the stride in both directions.
      padding: zero padding on every side.
      dtype: computation dtype (parameters stay float32).
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, h, w, c]` to `[batch, h', w', features, 8]`."""
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        kernels = jnp.stack(
            [d4_apply(kernel, g, axes=(0, 1)) for g in range(D4_ORDER)], axis=-1
        )
        kernels = kernels.reshape(k, k, x.shape[-1], self.features * D4_ORDER)
        y = _conv(
            x.astype(self.dtype), kernels.astype(self.dtype), self.strides, self.padding
        )
        y = y.reshape(*y.shape[:3], self.features, D4_ORDER)
        return y + bias.astype(self.dtype)[:, None]


class GroupConv(nn.Module):
    """A convolution between group features, equivariant to D4.

    One kernel `[k, k, c_in, 8, features]` over positions, channels and input
    copies; output copy `g` uses it transformed spatially by `g`, with its group
    axis re-indexed by `g^-1 h`. All 8 are stacked into one ordinary
    convolution over `c_in * 8` input and `features * 8` output channels. The
    bias is shared by a channel's 8 copies (a per-copy bias would break the
    symmetry).

    Attributes:
      features: output channels per group element.
      kernel_size, strides, padding, dtype: as in `LiftingConv`.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, h, w, c_in, 8]` to `[batch, h', w', features, 8]`."""
        k, c_in = self.kernel_size, x.shape[-2]
        # lecun_normal's fan-in is the product of all axes but the last (out)
        # and counts the 8 input copies: kh * kw * c_in * 8.
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (k, k, c_in, D4_ORDER, self.features),
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        kernels = jnp.stack(
            [
                d4_apply(kernel, g, axes=(0, 1))[:, :, :, _PERMUTATIONS[g]]
                for g in range(D4_ORDER)
            ],
            axis=-1,
        )
        kernels = kernels.reshape(k, k, c_in * D4_ORDER, self.features * D4_ORDER)
        inputs = x.reshape(*x.shape[:3], c_in * D4_ORDER).astype(self.dtype)
        y = _conv(inputs, kernels.astype(self.dtype), self.strides, self.padding)
        y = y.reshape(*y.shape[:3], self.features, D4_ORDER)
        return y + bias.astype(self.dtype)[:, None]


class OrbitGroupNorm(nn.Module):
    """GroupNorm whose groups are whole orbits, so it stays equivariant.

    Statistics are taken over positions and over channel groups that contain
    all 8 copies of their channels (a group-by-copy split would let the
    normalisation depend on the orientation), and the learned scale and bias
    are per channel, shared by its copies. Statistics in float32.

    Attributes:
      num_groups: channel groups; must divide the channels.
      dtype: output dtype.
    """

    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises `[batch, h, w, channels, 8]` group features."""
        channels = x.shape[-2]
        if channels % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} does not divide {channels} channels"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        b, h, w = x.shape[:3]
        grouped = x.astype(jnp.float32).reshape(
            b, h, w, self.num_groups, channels // self.num_groups, D4_ORDER
        )
        mean = jnp.mean(grouped, axis=(1, 2, 4, 5), keepdims=True)
        var = jnp.var(grouped, axis=(1, 2, 4, 5), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + _EPSILON)).reshape(x.shape)
        return (normed * scale[:, None] + bias[:, None]).astype(self.dtype)


class GroupResnetBlock(nn.Module):
    """`ResnetBlock` on group features: orbit GroupNorm, swish, 3x3 group conv,
    twice, plus the input.

    Attributes:
      features: channels per group element, in and out.
      dtype: computation dtype.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps `[batch, h, w, features, 8]` to the same shape."""
        num_groups = math.gcd(_MAX_GROUPS, self.features)
        h = OrbitGroupNorm(num_groups, dtype=self.dtype)(x)
        h = GroupConv(self.features, 3, padding=1, dtype=self.dtype)(nn.swish(h))
        h = OrbitGroupNorm(num_groups, dtype=self.dtype)(h)
        h = GroupConv(self.features, 3, padding=1, dtype=self.dtype)(nn.swish(h))
        return x + h


class InvariantEncoder(nn.Module):
    """`Encoder`'s shape and interface, equivariant to rotations by 90 degrees
    and flips.

    The layers of `Encoder` on group features: a 4x4 stride-2 lifting conv
    (`group_channels // 2` per element, ReLU), a 4x4 stride-2 group conv and
    a 3x3 one (`group_channels`), two `GroupResnetBlock`s; then the maximum over
    the 8 copies of each channel (group pooling: the strongest response over
    orientations, which does not change when the input turns) and a 1x1
    projection to `latent_dim`. `encoder(g x) == g encoder(x)` for every D4
    element `g` (up to float rounding), when the input is square with a side
    divisible by 4.

    Attributes:
      latent_dim: output channels; the quantizer's `embedding_dim`.
      dtype: computation dtype (parameters stay float32).
      group_channels: channels per group element (None:
        `default_group_channels(latent_dim)`, about `Encoder`'s parameters).
    """

    latent_dim: int
    dtype: Any = jnp.float32
    group_channels: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Encodes images.

        Args:
          x: `[batch, height, width, channels]` images, height == width.

        Returns:
          `[batch, height // 4, width // 4, latent_dim]` continuous latents.
        """
        if x.shape[1] != x.shape[2]:
            raise ValueError(
                f"the D4 encoder needs square images, got {x.shape[1]}x{x.shape[2]}"
            )
        channels = self.group_channels or default_group_channels(self.latent_dim)
        h = LiftingConv(
            max(channels // 2, 1), 4, strides=2, padding=1, dtype=self.dtype
        )(x)
        h = nn.relu(h)
        h = GroupConv(channels, 4, strides=2, padding=1, dtype=self.dtype)(h)
        h = nn.relu(h)
        h = GroupConv(channels, 3, padding=1, dtype=self.dtype)(h)
        h = GroupResnetBlock(channels, dtype=self.dtype)(h)
        h = GroupResnetBlock(channels, dtype=self.dtype)(h)
        pooled = jnp.max(h, axis=-1)
        return nn.Dense(self.latent_dim, dtype=self.dtype)(pooled)
