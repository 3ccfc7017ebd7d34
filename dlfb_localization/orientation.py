"""Rotations and flips of NHWC image batches, jittable, for augmentation on the device.

The dihedral group D4 (the symmetries of a square: 4 rotations by multiples of
90 degrees, each with or without a mirror flip) acts on a square crop exactly,
by permuting pixels. Its 8 elements are numbered `k = r + 4 * f`:
`d4_transform(x, k)` flips `x` left-right if `f == 1`, then rotates it `r`
quarter turns counter-clockwise (as displayed, row 0 at the top; `jnp.rot90`'s
direction). So `k = 1` is one quarter turn and `k = 4` the plain flip.

Any other angle moves pixels between grid points: `rotate` interpolates
bilinearly and fills what comes from outside the crop by mirroring (see there).

`train` imports its augmentation (`random_orientation`) from here; this module
sits below `invariance`, which re-exports it (`invariance.transforms`) beside
the scoring code `train` must not import.
"""

import functools
from typing import Final

import jax
import jax.numpy as jnp

from dlfb_localization.model.group_conv import (
    D4_ORDER,
    d4_apply,
    d4_compose,
    d4_inverse,
)

__all__ = [
    "AUGMENT_MODES",
    "D4_ORDER",
    "d4_apply",
    "d4_compose",
    "d4_inverse",
    "d4_orbit",
    "d4_transform",
    "random_orientation",
    "rotate",
]

# `train`'s `augment` values: no augmentation, a random D4 element, or a
# random angle plus a random flip.
AUGMENT_MODES: Final = ("none", "d4", "rotate")
# The fill mode of `rotate` (jax.scipy.ndimage's name for whole-sample symmetric
# reflection: ... c b | a b c d | c b ...).
_FILL_MODE: Final = "mirror"


def d4_transform(images: jax.Array, k: int) -> jax.Array:
    """One D4 element applied to every image of a batch.

    Args:
      images: `[batch, h, w, c]` (any dtype; h == w for odd quarter turns to keep
        the shape).
      k: the element, a Python int in `[0, 8)`: flip left-right if `k >= 4`,
        then `k % 4` counter-clockwise quarter turns.

    Returns:
      The transformed batch, exact (pixels are permuted, not interpolated).
    """
    return d4_apply(images, k, axes=(1, 2))


def d4_orbit(images: jax.Array) -> jax.Array:
    """All 8 D4 transforms of a batch at once.

    Args:
      images: `[batch, h, w, c]` with h == w.

    Returns:
      `[8, batch, h, w, c]`; entry `k` is `d4_transform(images, k)`.
    """
    _check_square(images)
    return jnp.stack([d4_transform(images, k) for k in range(D4_ORDER)])


def _check_square(images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(
            f"expected square images [batch, h, h, c], got shape {images.shape}"
        )


def _rotate_one(image: jax.Array, angle: jax.Array, flip: jax.Array) -> jax.Array:
    """Bilinear rotation of one `[h, w, c]` image about its centre."""
    h, w = image.shape[:2]
    theta = jnp.deg2rad(angle)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32),
        jnp.arange(w, dtype=jnp.float32),
        indexing="ij",
    )
    y = rows - (h - 1) / 2
    x = cols - (w - 1) / 2
    # Output pixel p reads the input at R(-theta) p: with theta = 90 this is
    # out[i, j] = in[j, w - 1 - i], which is `jnp.rot90`'s counter-clockwise turn.
    source_y = cos * y + sin * x + (h - 1) / 2
    source_x = -sin * y + cos * x
    # The flip is applied to the input first, so read the mirrored column.
    source_x = jnp.where(flip, -source_x, source_x) + (w - 1) / 2

    def sample(channel: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(
            channel, [source_y, source_x], order=1, mode=_FILL_MODE
        )

    return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


@jax.jit
def rotate(
    images: jax.Array, angles: jax.Array, flips: jax.Array | None = None
) -> jax.Array:
    """Rotates each image of a batch by its own angle, with bilinear interpolation.

    The corners of the output come from outside the crop; they are filled by
    mirroring the crop at its border (`mode="mirror"`). A constant fill (zeros,
    or the mean) would draw a sharp-edged disc whose corners exist only in
    rotated crops: after the model's per-image standardization that is a strong
    signal of "was rotated", exactly what the augmentation should not teach, and
    it shifts the image statistics with the angle. The mirrored border continues
    the crop's own texture and intensity distribution (cell crops are cut out of
    a larger field, so there is always more cell texture beyond the edge) and
    has no edge of its own.

    Args:
      images: `[batch, h, w, c]` float images.
      angles: `[batch]` counter-clockwise angles in degrees (a scalar applies to
        all). 90 reproduces `d4_transform(images, 1)` up to float rounding.
      flips: optional `[batch]` bools; where true the image is flipped
        left-right before it is rotated (as in `d4_transform`).

    Returns:
      `[batch, h, w, c]` rotated images, same dtype as `images`.
    """
    if images.ndim != 4:
        raise ValueError(f"expected [batch, h, w, c] images, got shape {images.shape}")
    n = images.shape[0]
    angles = jnp.broadcast_to(jnp.asarray(angles, jnp.float32), (n,))
    flips = jnp.zeros((n,), bool) if flips is None else jnp.asarray(flips, bool)
    flips = jnp.broadcast_to(flips, (n,))
    rotated = jax.vmap(_rotate_one)(images.astype(jnp.float32), angles, flips)
    return rotated.astype(images.dtype)


def _d4_one(image: jax.Array, k: jax.Array) -> jax.Array:
    branches = [lambda x, k=k_: d4_apply(x, k, axes=(0, 1)) for k_ in range(D4_ORDER)]
    return jax.lax.switch(k, branches, image)


@functools.partial(jax.jit, static_argnames="mode")
def random_orientation(rng: jax.Array, images: jax.Array, mode: str) -> jax.Array:
    """Gives every image of a batch its own random orientation (jittable).

    Args:
      rng: JAX key; image `i` uses `split(rng, batch)[i]`, so the transform of
        an image depends on the key and its position only.
      images: `[batch, h, h, c]` square images.
      mode: "d4": one of the 8 D4 elements, uniformly (exact, no
        interpolation); "rotate": an angle uniform in [0, 360) and, with
        probability 1/2, a flip first (bilinear, mirrored corners; see
        `rotate`). "none" returns `images` unchanged.

    Returns:
      `[batch, h, h, c]` transformed images.
    """
    if mode not in AUGMENT_MODES:
        raise ValueError(f"mode must be one of {AUGMENT_MODES}, got {mode!r}")
    if mode == "none":
        return images
    _check_square(images)
    keys = jax.random.split(rng, images.shape[0])
    if mode == "d4":
        elements = jax.vmap(lambda key: jax.random.randint(key, (), 0, D4_ORDER))(keys)
        return jax.vmap(_d4_one)(images, elements)

    def draw(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        rng_angle, rng_flip = jax.random.split(key)
        return (
            jax.random.uniform(rng_angle, (), minval=0.0, maxval=360.0),
            jax.random.bernoulli(rng_flip),
        )

    angles, flips = jax.vmap(draw)(keys)
    return rotate(images, angles, flips)
