"""Random fields and point rendering, the building blocks of every image.

`_field` draws a smooth Gaussian random field, `_render_points` draws Gaussian
spots (puncta, fibres) whose peak brightness does not depend on their size, and
`_sample_in` draws random sub-pixel positions inside a mask.
"""

import functools
import math

import numpy as np
from scipy import ndimage

from dlfb_localization.dataset.synthetic.spec import _PSF_SIGMA

_F32 = np.float32


# Random fields ------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _upsampler(size: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights for linear interpolation from a grid of spacing `step`."""
    position = np.arange(size) / step + 2.0
    lower = np.floor(position).astype(np.intp)
    frac = (position - lower).astype(_F32)
    lower.flags.writeable = False
    frac.flags.writeable = False
    return lower, frac


@functools.lru_cache(maxsize=64)
def _filter_gain(sigma: float) -> float:
    """Factor giving Gaussian-filtered white noise unit variance (as scipy filters)."""
    radius = int(3.0 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    return float(1.0 / (kernel**2).sum())


def _field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """A unit-variance smooth Gaussian random field, correlation length ~`sigma` px.

    It is white noise blurred by a Gaussian of `sigma`. Wide fields are blurred on
    a grid of `sigma / 2` px and interpolated linearly, a fraction of the cost of a
    wide filter, and without matrix products (BLAS threads thrash when other
    processes load the CPU).
    """
    if sigma < 3.0:
        white = rng.standard_normal((size, size), dtype=_F32)
        field = ndimage.gaussian_filter(white, sigma, mode="wrap", truncate=3.0)
        field *= _F32(_filter_gain(sigma))
        return field
    step = sigma / 2.0
    coarse = math.ceil(size / step) + 5
    white = rng.standard_normal((coarse, coarse), dtype=_F32)
    small = ndimage.gaussian_filter(white, 2.0, mode="wrap", truncate=3.0)
    small *= _F32(_filter_gain(2.0))
    lower, frac = _upsampler(size, step)
    weight = frac[:, None]
    # Interpolate along rows, then along the rows of the transpose: both gathers
    # copy whole rows. The result is transposed, which an isotropic field ignores.
    rows = small[lower] * (1 - weight) + small[lower + 1] * weight
    rows = np.ascontiguousarray(rows.T)
    return rows[lower] * (1 - weight) + rows[lower + 1] * weight


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(_F32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _render_points(
    size: int,
    ys: np.ndarray,
    xs: np.ndarray,
    amplitudes: np.ndarray,
    sigma: float,
) -> np.ndarray:
    """Gaussian spots whose peak, after the PSF, is about `amplitudes`.

    Points are splatted bilinearly (sub-pixel positions) and blurred once; the gain
    compensates the PSF applied later, so a punctum's brightness does not depend on
    its size.
    """
    image = np.zeros(size * size, np.float64)
    if len(ys):
        y0 = np.floor(ys)
        x0 = np.floor(xs)
        fy, fx = ys - y0, xs - x0
        iy, ix = y0.astype(np.intp), x0.astype(np.intp)
        keep = (iy >= 0) & (iy < size - 1) & (ix >= 0) & (ix < size - 1)
        iy, ix, fy, fx = iy[keep], ix[keep], fy[keep], fx[keep]
        amp = amplitudes[keep]
        flat = iy * size + ix
        index = np.concatenate([flat, flat + 1, flat + size, flat + size + 1])
        weight = np.concatenate(
            [
                amp * (1 - fy) * (1 - fx),
                amp * (1 - fy) * fx,
                amp * fy * (1 - fx),
                amp * fy * fx,
            ]
        )
        image = np.bincount(index, weights=weight, minlength=size * size)
    image = image.reshape(size, size).astype(_F32)
    if sigma > 0:
        image = ndimage.gaussian_filter(image, sigma, truncate=3.0)
    image *= _F32(2 * np.pi * (sigma**2 + _PSF_SIGMA**2))
    return image


def _sample_in(
    rng: np.random.Generator,
    mask: np.ndarray,
    count: int,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random sub-pixel positions inside `mask`.

    Args:
      mask: where points may fall.
      count: number of draws.
      weight: optional `[0, 1]` map; a draw is kept with this probability, which
        makes points denser where it is high.

    Returns:
      ys, xs of the kept points.
    """
    size = mask.shape[1]
    index = np.flatnonzero(mask)
    if index.size == 0 or count <= 0:
        return np.zeros(0), np.zeros(0)
    pick = index[rng.integers(0, index.size, count)]
    if weight is not None:
        pick = pick[rng.random(count) < weight.ravel()[pick]]
    ys = pick // size + rng.random(pick.size) - 0.5
    xs = pick % size + rng.random(pick.size) - 0.5
    return ys, xs
