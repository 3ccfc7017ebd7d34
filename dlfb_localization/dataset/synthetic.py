"""A synthetic OpenCell: deterministic, OpenCell-like crops in the release format.

The real OpenCell release that cytoself trains on is 42 GiB. This module draws a
stand-in that looks like it and is written in exactly the same on-disk formats,
so the data layer, the tests and the demo run anywhere in seconds.

How an image is made. A field of view (FOV) larger than a crop is tiled with
densely packed cells: a jittered, rotated hexagonal lattice of seeds, a power
diagram (weighted Voronoi) whose boundaries meander along a smooth random field
(so cell edges curve) and thin gaps between neighbours. Each cell has one nucleus,
an ellipse about 35 px across with a low-frequency boundary wobble, 1-4 nucleoli
and, rarely, the smaller, brighter, elongated look of a mitotic cell. The Hoechst
channel is a chromatin texture that is darker in the nucleoli. The protein channel
is a weighted sum of localization patterns (one function per name in `PATTERNS`),
scaled cell by cell by a log-normal expression level, blurred by a Gaussian PSF,
given shot and read noise and scaled per FOV to [0, 1] with a few of the
brightest pixels saturated. Crops are 100x100 windows centred on nuclei that lie
wholly inside the FOV, so the crops of one FOV overlap, as in OpenCell.

Every random draw comes from a generator seeded by
`numpy.random.SeedSequence([seed, stream, protein_index, ...])`, so any one
protein or FOV can be regenerated alone, bit for bit, and the same spec always
writes byte-identical files.
"""

import dataclasses
import functools
import math
import mmap
import os
import pathlib
import re
import sys

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from dlfb_localization.dataset.localizations import LOCALIZATIONS_OF_INTEREST
from dlfb_localization.dataset.sources import LABEL_COLUMNS

__all__ = [
    "LABEL_COLUMNS",
    "PATTERNS",
    "SECOND_STYLE",
    "SyntheticSpec",
    "SyntheticStyle",
    "generate_protein",
    "write_release",
    "write_sample_format",
]

# The nine localizations the chapter colours come first; the extras follow.
_EXTRA_PATTERNS = (
    "membrane",
    "centrosome",
    "nuclear_punctae",
    "cytoskeleton",
    "nucleolus_fc_dfc",
)
PATTERNS: tuple[str, ...] = LOCALIZATIONS_OF_INTEREST + _EXTRA_PATTERNS

# Plausible secondary localizations for each main one (what OpenCell annotates
# together), so multi-localized proteins look like real ones rather than random mixes.
_PARTNERS = {
    "mitochondria": ("cytoplasmic", "nucleoplasm"),
    "cytoplasmic": ("nucleoplasm", "membrane", "vesicles"),
    "er": ("nuclear_membrane", "cytoplasmic", "golgi"),
    "golgi": ("vesicles", "cytoplasmic", "er"),
    "vesicles": ("golgi", "cytoplasmic", "membrane"),
    "nucleoplasm": ("cytoplasmic", "nuclear_punctae", "nucleolus_gc", "chromatin"),
    "nuclear_membrane": ("er", "nucleoplasm"),
    "chromatin": ("nucleoplasm", "nucleolus_gc"),
    "nucleolus_gc": ("nucleoplasm", "nucleolus_fc_dfc"),
    "membrane": ("cytoplasmic", "vesicles"),
    "centrosome": ("cytoplasmic", "nucleoplasm"),
    "nuclear_punctae": ("nucleoplasm", "cytoplasmic"),
    "cytoskeleton": ("cytoplasmic", "centrosome"),
    "nucleolus_fc_dfc": ("nucleolus_gc", "nucleoplasm"),
}
# Inside the nucleus these disperse when the nuclear envelope breaks down in mitosis.
_NUCLEAR_PATTERNS = frozenset(
    {
        "nucleoplasm",
        "nuclear_membrane",
        "nucleolus_gc",
        "nucleolus_fc_dfc",
        "nuclear_punctae",
    }
)
# Relative intensity of a secondary localization by the grade it is annotated with.
_GRADE_WEIGHT = {1: (0.45, 0.75), 2: (0.25, 0.45), 3: (0.15, 0.3)}
# Thin or punctate patterns cover few pixels; over a diffuse main pattern they need
# a higher peak to be as visible as a diffuse secondary would be.
_SPARSE_GAIN = {
    "membrane": 2.0,
    "centrosome": 2.0,
    "nuclear_punctae": 2.0,
    "nucleolus_fc_dfc": 2.0,
    "nuclear_membrane": 1.6,
    "vesicles": 1.6,
    "golgi": 1.6,
    "cytoskeleton": 1.6,
}

# Geometry, in pixels of a crop (~0.4 um/px, where a HEK293T nucleus is ~35 px).
_CELL_SPACING = 55.0  # Nucleus-to-nucleus distance of densely packed cells.
_NUCLEUS_SEMI_MAJOR = 19.8
_MEANDER_PX = 4.5  # How far cell boundaries wander off straight lines.
_MITOTIC_FRACTION = 0.04
_PSF_SIGMA = 0.85
_READ_NOISE = 1.5  # Photon-equivalents per pixel.
_PEDESTAL = 0.25  # Share of the background left after background subtraction.
# Share of a FOV's pixels that saturate at 1 (OpenCell images are contrast-stretched).
_SATURATED_PROTEIN = 0.002
_SATURATED_HOECHST = 0.05

# Stream tags of the SeedSequence, so the generators of the plan, of a protein and of
# a FOV can never coincide.
_PLAN_STREAM, _PROTEIN_STREAM, _FOV_STREAM = 0, 1, 2
_F32 = np.float32
# File-backed pages of the output memmap count towards the process' resident memory;
# handing them back every this many bytes keeps a 32 GB release in a few hundred MB.
_RELEASE_EVERY_BYTES = 64 * 2**20
_IMAGE_RE = re.compile(r"^Image_data(\d+)\.npy$")
_LABEL_RE = re.compile(r"^Label_data(\d+)\.csv$")


@dataclasses.dataclass(frozen=True)
class SyntheticStyle:
    """Imaging and biology knobs of the generator; the defaults are its own look.

    A second setting (`SECOND_STYLE`) checks that a result is not a property of
    one generator.

    Attributes:
      cell_scale: multiplies the cells' spacing and the nuclei's size.
      brightness: multiplies every protein's photon count (lower is noisier).
      psf_sigma: the optics' Gaussian blur, in pixels.
      read_noise: the camera's read noise, in photon-equivalents per pixel.
      texture_scale: multiplies the length scale of the proteins' patterns.
      expression_spread: multiplies the cell-to-cell spread of expression.
    """

    cell_scale: float = 1.0
    brightness: float = 1.0
    psf_sigma: float = _PSF_SIGMA
    read_noise: float = _READ_NOISE
    texture_scale: float = 1.0
    expression_spread: float = 1.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"SyntheticStyle.{field.name} must be a number")
            if not 0 < value < 100:
                raise ValueError(
                    f"SyntheticStyle.{field.name}={value} is outside (0, 100)"
                )


# Smaller, more crowded cells, dimmer and noisier proteins, more blur, coarser
# patterns and more cell-to-cell variation than the default look.
SECOND_STYLE = SyntheticStyle(
    cell_scale=0.82,
    brightness=0.35,
    psf_sigma=1.3,
    read_noise=3.0,
    texture_scale=1.35,
    expression_spread=1.6,
)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Attributes:
      n_proteins: number of proteins (classes).
      fovs_per_protein: fields of view per protein.
      crops_per_fov: mean number of crops per FOV; each FOV draws its own count
        (1 + Poisson(crops_per_fov - 1)), decided before any pixel is drawn.
      n_blocks: number of `Image_dataNN.npy` / `Label_dataNN.csv` pairs; frames are
        split into contiguous blocks of nearly equal size.
      image_size: side of a square crop in pixels. The cells keep their physical
        size (nuclei ~35 px) whatever the crop size.
      secondary_fraction: share of proteins given secondary localizations.
      seed: non-negative integer; the same spec always writes the same bytes.
      style: the imaging and biology knobs (`SyntheticStyle`).
    """

    n_proteins: int = 30
    fovs_per_protein: int = 4
    crops_per_fov: int = 10
    n_blocks: int = 2
    image_size: int = 100
    secondary_fraction: float = 0.3
    seed: int = 0
    style: SyntheticStyle = SyntheticStyle()

    def __post_init__(self):
        for field, minimum in (
            ("n_proteins", 1),
            ("fovs_per_protein", 1),
            ("crops_per_fov", 1),
            ("n_blocks", 1),
            ("image_size", 16),
            ("seed", 0),
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(
                    f"SyntheticSpec.{field} must be an int, got {value!r} "
                    f"({type(value).__name__}); change {field}"
                )
            if value < minimum:
                raise ValueError(
                    f"SyntheticSpec.{field}={value} is too small; set {field} >= "
                    f"{minimum}"
                )
        if self.image_size > 512:
            raise ValueError(
                f"SyntheticSpec.image_size={self.image_size} is larger than this "
                "generator supports; set image_size <= 512 (OpenCell crops are 100)"
            )
        n_fovs = self.n_proteins * self.fovs_per_protein
        if self.n_blocks > n_fovs:
            raise ValueError(
                f"SyntheticSpec.n_blocks={self.n_blocks} exceeds the {n_fovs} fields "
                "of view (n_proteins * fovs_per_protein), so some blocks could be "
                "empty; lower n_blocks or raise n_proteins / fovs_per_protein"
            )
        fraction = self.secondary_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(
                f"SyntheticSpec.secondary_fraction must be a number in [0, 1], got "
                f"{fraction!r}; change secondary_fraction"
            )
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(
                f"SyntheticSpec.secondary_fraction={fraction} is outside [0, 1]; "
                "set secondary_fraction to a share such as 0.3"
            )


# The plan: labels, traits and crop counts, decided before any pixel -----------------


@dataclasses.dataclass(frozen=True)
class _Protein:
    """Everything about one protein except its pixels."""

    index: int
    ensg: str
    name: str
    grades: tuple[str, str, str]  # loc_grade1..3 cells, ";"-joined.
    components: tuple[tuple[str, float], ...]  # (pattern, relative intensity).
    crops: tuple[int, ...]  # Crops in each of its FOVs.
    brightness: float  # Photons at the brightest structures of an average cell.
    expression_sigma: float  # Cell-to-cell log-normal spread of expression.
    texture: float  # Scales the length of texture correlations.
    puncta_density: float
    puncta_size: float
    diffuse: float  # Soluble pool, a fraction of the main pattern's intensity.
    diffuse_nuclear: float  # How much of the soluble pool enters the nucleus.
    style: tuple[float, float, float, float]  # Free per-pattern knobs in [0, 1).


@functools.lru_cache(maxsize=8)
def _plan(spec: SyntheticSpec) -> tuple[_Protein, ...]:
    """Labels, traits and crop counts of every protein of `spec`.

    Cheap (no pixels), and cached so that `generate_protein` can be called protein
    by protein.
    """
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _PLAN_STREAM]))
    n = spec.n_proteins
    # ~75% on the chapter's nine, round-robin so all nine appear once n >= 9.
    n_chapter = min(n, max(9, round(0.75 * n)))
    mains = [LOCALIZATIONS_OF_INTEREST[i % 9] for i in range(n_chapter)]
    mains += [_EXTRA_PATTERNS[i % len(_EXTRA_PATTERNS)] for i in range(n - n_chapter)]
    # Shuffled, so protein order (and any split by protein) is not by localization.
    mains = [mains[i] for i in rng.permutation(n)]
    n_secondary = round(spec.secondary_fraction * n)
    has_secondary = np.zeros(n, bool)
    has_secondary[rng.permutation(n)[:n_secondary]] = True

    width = max(3, len(str(n - 1)))
    proteins = []
    for index in range(n):
        prng = np.random.default_rng(
            np.random.SeedSequence([spec.seed, _PROTEIN_STREAM, index])
        )
        crops = 1 + prng.poisson(spec.crops_per_fov - 1, spec.fovs_per_protein)
        main = mains[index]
        grades: list[list[str]] = [[main], [], []]
        components = [(main, 1.0)]
        if has_secondary[index]:
            partners = _PARTNERS[main]
            count = min(len(partners), int(prng.integers(1, 3)))
            for j in prng.choice(len(partners), count, replace=False):
                grade = int(prng.choice(3, p=[0.3, 0.45, 0.25])) + 1
                low, high = _GRADE_WEIGHT[grade]
                grades[grade - 1].append(partners[j])
                weight = prng.uniform(low, high) * _SPARSE_GAIN.get(partners[j], 1.0)
                components.append((partners[j], float(min(weight, 0.9))))
        proteins.append(
            _Protein(
                index=index,
                ensg=f"ENSG9{index:010d}",
                name=f"SYN{index:0{width}d}",
                grades=tuple(";".join(g) for g in grades),
                components=tuple(components),
                crops=tuple(int(c) for c in crops),
                # Log-normal: most proteins are well expressed, some dim and noisy.
                brightness=float(
                    np.clip(
                        120.0 * spec.style.brightness * np.exp(0.9 * prng.normal()),
                        8 * spec.style.brightness,
                        4000,
                    )
                ),
                expression_sigma=float(
                    prng.uniform(0.1, 0.4) * spec.style.expression_spread
                ),
                texture=float(prng.uniform(0.8, 1.3) * spec.style.texture_scale),
                puncta_density=float(np.exp(0.35 * prng.normal())),
                puncta_size=float(prng.uniform(0.8, 1.3)),
                diffuse=float(np.exp(prng.uniform(np.log(0.005), np.log(0.08)))),
                diffuse_nuclear=float(prng.uniform(0.2, 1.0)),
                style=tuple(float(x) for x in prng.random(4)),
            )
        )
    return tuple(proteins)


def _fov_id(spec: SyntheticSpec, protein_index: int, fov_index: int) -> int:
    return protein_index * spec.fovs_per_protein + fov_index


def _label_rows(spec: SyntheticSpec, protein: _Protein) -> pd.DataFrame:
    fov_ids = np.repeat(
        [_fov_id(spec, protein.index, f) for f in range(len(protein.crops))],
        protein.crops,
    )
    n = len(fov_ids)
    return pd.DataFrame(
        {
            "ensg": [protein.ensg] * n,
            "name": [protein.name] * n,
            "loc_grade1": [protein.grades[0]] * n,
            "loc_grade2": [protein.grades[1]] * n,
            "loc_grade3": [protein.grades[2]] * n,
            "protein_id": np.full(n, protein.index, np.int64),
            "FOV_id": fov_ids.astype(np.int64),
        },
        columns=list(LABEL_COLUMNS),
    )


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


# The field of view: cells, nuclei, nucleoli and the Hoechst image -------------------


class _Fov:
    """Geometry of one field of view, shared by the nucleus and protein channels.

    Attributes (arrays are `[size, size]`):
      size: side in pixels.
      label: index of the cell a pixel belongs to, -1 in the gaps between cells.
      owner: like `label`, but gap pixels belong to the nearest cell.
      cell: pixel belongs to a cell (float 0/1).
      nucleus: the nuclear segmentation (bool).
      cytoplasm: in a cell, outside its nucleus (float 0/1).
      signed: smooth signed distance to the own nucleus' boundary in px,
        negative inside (for sub-pixel rims).
      distance: the nuclear distance channel (EDT, positive inside).
      outside: distance to the nearest nucleus for pixels outside nuclei, else 0.
      edge: approximate distance to the cell's boundary in px (0 at the gap).
      gap_width: half-width of the gap the boundary runs in.
      nucleoli: soft nucleolus mask in [0, 1].
      chromatin: noise-free Hoechst-like intensity (~1 at bright chromatin).
      mitotic_px: pixel belongs to a mitotic cell (None when there is none).
      cells: per-cell arrays (see `_layout`).
    """

    def __init__(self, **arrays):
        self.__dict__.update(arrays)


def _layout(
    rng: np.random.Generator, size: int, spacing: float, cell_scale: float
) -> dict:
    """Cell seeds and nuclei of a FOV of side `size` px.

    Seeds form a rotated, jittered hexagonal lattice reaching past the border, so
    cells at the edge are cut by the border rather than missing. Each nucleus is
    centred on its seed and scaled down where needed to fit inside its cell.
    """
    row = spacing * math.sqrt(3) / 2
    extent = size / 2 + 2 * spacing
    i, j = np.mgrid[
        -int(extent / row) - 1 : int(extent / row) + 2,
        -int(extent / spacing) - 1 : int(extent / spacing) + 2,
    ]
    x = (j + 0.5 * (i % 2)) * spacing
    y = i * row
    theta = rng.uniform(0, np.pi / 3)
    cx = size / 2 + x * np.cos(theta) - y * np.sin(theta)
    cy = size / 2 + x * np.sin(theta) + y * np.cos(theta)
    keep = (cx > -spacing) & (cx < size + spacing)
    keep &= (cy > -spacing) & (cy < size + spacing)
    cx, cy = cx[keep].ravel(), cy[keep].ravel()
    n = cx.size
    cx = cx + rng.uniform(-0.14, 0.14, n) * spacing
    cy = cy + rng.uniform(-0.14, 0.14, n) * spacing
    # Power-diagram weights vary cell sizes; a meander loading per cell makes each
    # boundary follow a smooth random field (scaled by the difference of its two
    # cells' loadings), so edges curve instead of being straight.
    weight = spacing**2 * rng.uniform(-0.08, 0.08, n)
    meander = rng.uniform(-1, 1, n) * (2 * spacing * _MEANDER_PX)

    mitotic = rng.random(n) < _MITOTIC_FRACTION
    a = _NUCLEUS_SEMI_MAJOR * cell_scale * np.exp(0.07 * rng.normal(size=n))
    b = a * rng.uniform(0.74, 0.95, n)
    a = np.where(mitotic, a * 0.8, a)
    b = np.where(mitotic, a * rng.uniform(0.32, 0.45, n), b)
    # Fourier coefficients of the boundary wobble (modes 2-4, smaller for higher):
    # ovals, beans and the odd lobe. Condensed mitotic chromatin is more ragged.
    wobble = rng.normal(size=(n, 3, 2)) * np.array([0.05, 0.03, 0.018])[:, None]
    wobble *= np.where(mitotic, 2.2, 1.0)[:, None, None]
    angle = rng.uniform(0, np.pi, n)

    # Fit each nucleus inside its cell: its support function towards every other
    # seed must stay short of their power bisector.
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    modes = np.arange(2, 5)[:, None] * t  # [3, 32]
    radial = 1 + np.einsum("nk,kt->nt", wobble[..., 0], np.cos(modes))
    radial += np.einsum("nk,kt->nt", wobble[..., 1], np.sin(modes))
    u = a[:, None] * np.cos(t) * radial
    v = b[:, None] * np.sin(t) * radial
    px = u * np.cos(angle)[:, None] - v * np.sin(angle)[:, None]
    py = u * np.sin(angle)[:, None] + v * np.cos(angle)[:, None]
    dx, dy = cx[None] - cx[:, None], cy[None] - cy[:, None]
    dist = np.hypot(dx, dy)
    np.fill_diagonal(dist, np.inf)
    support = np.einsum("it,ij->ijt", px, dx / dist) + np.einsum(
        "it,ij->ijt", py, dy / dist
    )
    with np.errstate(invalid="ignore"):  # inf / inf on the diagonal
        room = (dist**2 + weight[:, None] - weight[None]) / (2 * dist) - 1.0
    np.fill_diagonal(room, np.inf)
    fit = np.min(room / np.maximum(support.max(axis=2), 1e-3), axis=1)
    scale = np.clip(fit, 0.3, 1.0)
    a, b = a * scale, b * scale

    # Nucleoli in the nucleus frame: 1-4 per interphase cell, none in mitosis.
    n_nucleoli = np.where(mitotic, 0, rng.choice(4, n, p=[0.25, 0.35, 0.25, 0.15]) + 1)
    radius = 4.2 * np.exp(0.22 * rng.normal(size=(n, 4)))
    radius = np.minimum(radius, 0.4 * b[:, None])
    radius[np.arange(4)[None] >= n_nucleoli[:, None]] = 0.0
    q = np.sqrt(rng.random((n, 4))) * 0.5
    phi = rng.uniform(0, 2 * np.pi, (n, 4))
    return {
        "n": n,
        "sx": cx.astype(_F32),
        "sy": cy.astype(_F32),
        "weight": weight.astype(_F32),
        "meander": meander.astype(_F32),
        "a": a.astype(_F32),
        "b": b.astype(_F32),
        "angle": angle,
        "wobble": wobble.astype(_F32),
        "mitotic": mitotic,
        "nucleolus_u": (q * np.cos(phi) * a[:, None]).astype(_F32),
        "nucleolus_v": (q * np.sin(phi) * b[:, None]).astype(_F32),
        "nucleolus_r": radius.astype(_F32),
        "dna": np.exp(0.18 * rng.normal(size=n)).astype(_F32),
        "spacing": spacing,
    }


def _with_dummy(values: np.ndarray, fill) -> np.ndarray:
    """Appends one entry, so that indexing with label -1 (gap) reads `fill`."""
    return np.concatenate([values, np.asarray([fill], dtype=values.dtype)])


def _build_fov(
    rng: np.random.Generator, cells: dict, size: int, texture: float
) -> _Fov:
    """Cells, nuclei, nucleoli and the noise-free chromatin image of one FOV."""
    spacing = cells["spacing"]
    yy, xx = _grid(size)
    meander = _field(rng, size, 12.0)

    # Two power diagrams in one pass, visiting each seed only within a window it
    # can win: `core` (plain) owns the nuclei, which therefore never straddle a
    # boundary; the meandering one draws the cell boundaries and, from its nearest
    # and second-nearest seeds, the distance to them.
    core_best = np.full((size, size), np.inf, _F32)
    core = np.zeros((size, size), np.int32)
    best = np.full((size, size), np.inf, _F32)
    second = np.full((size, size), np.inf, _F32)
    label = np.zeros((size, size), np.int32)
    # A pixel's two nearest seeds lie within ~0.75 spacing on this lattice.
    reach = 0.9 * spacing + 2 * _MEANDER_PX
    for i in range(cells["n"]):
        sx, sy = cells["sx"][i], cells["sy"][i]
        y0, y1 = max(0, int(sy - reach)), min(size, int(sy + reach) + 1)
        x0, x1 = max(0, int(sx - reach)), min(size, int(sx + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        window = np.s_[y0:y1, x0:x1]
        d = xx[window] - sx
        d *= d
        dy = yy[window] - sy
        d += dy * dy
        d -= cells["weight"][i]
        c1 = core_best[window]
        core[window][d < c1] = i
        np.minimum(c1, d, out=c1)
        d += cells["meander"][i] * meander[window]
        b1, b2 = best[window], second[window]
        closer = d < b1
        # The new second nearest is min(second, max(best, d)).
        np.minimum(b2, np.maximum(b1, d), out=b2)
        np.minimum(b1, d, out=b1)
        label[window][closer] = i
    # Distance to the bisector, (d2^2 - d1^2) / (2 |s1 - s2|), taking the lattice
    # spacing for |s1 - s2|.
    edge = (second - best) / _F32(2 * spacing)
    # Thin gaps between cells, a pixel or less in most places, wider in a few.
    gap_width = 0.3 + 0.7 * np.maximum(_field(rng, size, 12.0), 0)

    # The nucleus of each pixel's own cell, in its frame, with the boundary wobble
    # (cell parameters gathered per pixel in one `take`).
    table = np.concatenate(
        [
            np.stack(
                [
                    np.cos(cells["angle"]),
                    np.sin(cells["angle"]),
                    cells["sx"],
                    cells["sy"],
                    1 / cells["a"],
                    1 / cells["b"],
                ]
            ),
            cells["wobble"].reshape(-1, 6).T,
        ]
    ).astype(_F32)
    cos_a, sin_a, sx, sy, inv_a, inv_b, *wob = np.take(table, core, axis=1)
    dx, dy = xx - sx, yy - sy
    u = dx * cos_a + dy * sin_a
    v = dy * cos_a - dx * sin_a
    ur, vr = u * inv_a, v * inv_b
    r = np.sqrt(ur * ur + vr * vr) + _F32(1e-6)
    c1, s1 = ur / r, vr / r
    c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
    c3, s3 = c2 * c1 - s2 * s1, s2 * c1 + c2 * s1
    c4, s4 = c2 * c2 - s2 * s2, 2 * c2 * s2
    boundary = 1 + wob[0] * c2 + wob[1] * s2
    boundary += wob[2] * c3 + wob[3] * s3
    boundary += wob[4] * c4 + wob[5] * s4
    rho = r / boundary
    nucleus = rho < 1
    # Smooth signed distance to the boundary (px, negative inside), for thin rims.
    signed = (rho - 1) / np.sqrt(inv_a * inv_b)
    label[nucleus] = core[nucleus]
    owner = label.copy()
    label[(edge < gap_width) & ~nucleus] = -1

    distance = ndimage.distance_transform_edt(nucleus).astype(_F32)
    outside = ndimage.distance_transform_edt(~nucleus).astype(_F32)
    distance -= outside

    # Nucleoli: soft discs with ragged edges, only evaluated inside nuclei.
    inside = np.flatnonzero(nucleus)
    cell_in = core.ravel()[inside]
    u_in, v_in = u.ravel()[inside], v.ravel()[inside]
    fine = _field(rng, size, 1.1 * texture).ravel()[inside]
    ragged = fine * _F32(0.4)
    nucleoli_in = np.zeros(inside.size, _F32)
    for k in range(4):
        du = u_in - cells["nucleolus_u"][cell_in, k]
        dv = v_in - cells["nucleolus_v"][cell_in, k]
        rad = cells["nucleolus_r"][cell_in, k]
        blob = (rad - np.sqrt(du * du + dv * dv) + ragged) / _F32(1.2) + _F32(0.5)
        np.maximum(nucleoli_in, np.clip(blob, 0, 1) * (rad > 0), out=nucleoli_in)
    nucleoli = np.zeros(size * size, _F32)
    nucleoli[inside] = nucleoli_in
    nucleoli = nucleoli.reshape(size, size)

    # Chromatin: mottled at two scales, darker nucleoli, a slightly brighter
    # periphery; condensed and bright in mitosis.
    medium = _field(rng, size, 3.0 * texture).ravel()[inside]
    rho_in = rho.ravel()[inside]
    chrom = 0.62 + 0.2 * fine + 0.22 * medium
    chrom += 0.1 * np.exp(-(((1 - rho_in) * 10) ** 2))
    chrom *= 1 - 0.85 * nucleoli_in
    chrom *= cells["dna"][cell_in]
    mitotic = cells["mitotic"]
    mitotic_px = None
    if mitotic.any():
        condensed = mitotic[cell_in]
        dna = cells["dna"][cell_in[condensed]]
        chrom[condensed] = (1.5 + 0.35 * fine[condensed]) * dna
        mitotic_px = _with_dummy(mitotic, False)[label]
    chromatin = np.zeros(size * size, _F32)
    chromatin[inside] = np.maximum(chrom, 0)
    chromatin = chromatin.reshape(size, size)

    cell = (label >= 0).astype(_F32)
    cytoplasm = cell * ~nucleus
    return _Fov(
        size=size,
        label=label,
        owner=owner,
        cell=cell,
        nucleus=nucleus,
        cytoplasm=cytoplasm,
        signed=signed,
        distance=distance,
        outside=outside,
        edge=edge,
        gap_width=gap_width,
        nucleoli=nucleoli,
        chromatin=chromatin,
        mitotic_px=mitotic_px,
        cells=cells,
    )


def _nucleus_centres(fov: _Fov) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (y, x) of the nucleus centres, i.e. of the seeds."""
    return fov.cells["sy"].astype(np.float64), fov.cells["sx"].astype(np.float64)


def _nucleus_radius(fov: _Fov, cell: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Radius (px) of the nuclei of `cell` in pixel directions `phi`."""
    cells = fov.cells
    rel = phi - cells["angle"][cell]
    a, b = cells["a"][cell], cells["b"][cell]
    ur, vr = np.cos(rel) / a, np.sin(rel) / b
    r = 1 / np.sqrt(ur * ur + vr * vr)
    theta = np.arctan2(vr, ur)
    w = cells["wobble"][cell]
    boundary = 1.0
    for k in range(3):
        m = k + 2
        boundary = boundary + w[:, k, 0] * np.cos(m * theta)
        boundary = boundary + w[:, k, 1] * np.sin(m * theta)
    return r * boundary


def _perinuclear_points(
    fov: _Fov,
    rng: np.random.Generator,
    per_cell: np.ndarray,
    spread: float,
    depth: tuple[float, float],
    phi_cell: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points hugging each interphase nucleus on one side, kept inside their cell.

    Args:
      per_cell: points per cell.
      spread: angular standard deviation (rad) around the cell's chosen side.
      depth: (offset, scale) of the exponential distance beyond the nuclear rim.
      phi_cell: side of each cell; random when None.

    Returns:
      ys, xs and the cell index of the kept points.
    """
    cells = fov.cells
    n = cells["n"]
    if phi_cell is None:
        phi_cell = rng.uniform(0, 2 * np.pi, n)
    counts = np.where(cells["mitotic"], 0, per_cell)
    cell = np.repeat(np.arange(n), counts)
    phi = phi_cell[cell] + spread * rng.normal(size=cell.size)
    reach = _nucleus_radius(fov, cell, phi)
    reach = reach + depth[0] + rng.exponential(depth[1], cell.size)
    cy, cx = _nucleus_centres(fov)
    ys = cy[cell] + reach * np.sin(phi)
    xs = cx[cell] + reach * np.cos(phi)
    iy = np.rint(ys).astype(np.intp)
    ix = np.rint(xs).astype(np.intp)
    ok = (iy >= 0) & (iy < fov.size) & (ix >= 0) & (ix < fov.size)
    iy, ix, ys, xs, cell = iy[ok], ix[ok], ys[ok], xs[ok], cell[ok]
    ok = (fov.label[iy, ix] == cell) & ~fov.nucleus[iy, ix]
    return ys[ok], xs[ok], cell[ok]


# Protein patterns: one per localization, ~1 at the brightest structures -------------


def _mitochondria(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # Zero crossings of a smooth random field form a network of worm-like tubes;
    # a second, coarser field breaks it into fragments of protein-specific length.
    # Mitochondria crowd around the nucleus.
    tubes = _field(rng, fov.size, 1.7 * p.texture)
    width = 0.35 + 0.2 * p.style[0]
    tubes = np.exp(-((tubes / _F32(width)) ** 2))
    fragments = _field(rng, fov.size, 5.0)
    keep = np.clip(0.85 + (0.3 + 0.5 * p.style[1]) * fragments, 0, 1)
    # Crowded near the nucleus, in clumps rather than an even ring.
    crowd = np.exp(-fov.outside / _F32(16 + 16 * p.style[2]))
    crowd *= np.clip(1 + 0.5 * _field(rng, fov.size, 10.0), 0.1, None)
    return tubes * keep * (0.3 + crowd) * fov.cytoplasm


def _cytoplasmic(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # Thicker (brighter) cytoplasm near the nucleus, gentle unevenness, a faint leak
    # into the nucleus.
    body = 0.78 + 0.22 * np.exp(-fov.outside / _F32(20))
    body *= 1 + 0.1 * _field(rng, fov.size, 4.0 * p.texture)
    return body * fov.cytoplasm + 0.05 * p.style[0] * fov.nucleus


def _er(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # A fine reticulum (zero crossings of a fine field) over a diffuse lumen,
    # brighter around the nucleus, continuous with the nuclear envelope.
    net = np.exp(-((_field(rng, fov.size, 1.3 * p.texture) / _F32(0.5)) ** 2))
    crowd = 0.45 + 0.55 * np.exp(-fov.outside / _F32(10 + 10 * p.style[0]))
    image = (0.3 + 0.7 * net) * crowd * fov.cytoplasm
    rim = np.exp(-((fov.signed / _F32(1.1)) ** 2)) * fov.cell
    return image + (0.45 + 0.3 * p.style[1]) * rim


def _golgi(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # A compact cap of ribbon fragments beside the nucleus, on one side per cell,
    # in a faint glow of unresolved membranes.
    n = fov.cells["n"]
    per_cell = rng.poisson(50 * p.puncta_density, n) + 12
    spread = 0.22 + 0.25 * p.style[0]
    ys, xs, _ = _perinuclear_points(fov, rng, per_cell, spread, (0.5, 4.5))
    amp = np.exp(0.5 * rng.normal(size=ys.size))
    big = rng.random(ys.size) < 0.2
    sigma = 0.4 * p.puncta_size
    image = _render_points(fov.size, ys[~big], xs[~big], amp[~big], sigma)
    image += _render_points(fov.size, ys[big], xs[big], 0.8 * amp[big], 2.5 * sigma)
    image += _render_points(fov.size, ys, xs, np.full(ys.size, 0.02), 3.0)
    return image


def _vesicles(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # Many puncta of varied size and brightness all over the cytoplasm, a little
    # denser around the nucleus, over a diffuse haze.
    area = float(fov.cytoplasm.sum())
    count = int(area * 0.03 * p.puncta_density)
    weight = 0.5 + 0.5 * np.exp(-fov.outside / _F32(15))
    ys, xs = _sample_in(rng, fov.cytoplasm > 0, count, weight)
    amp = np.exp(0.5 * rng.normal(size=ys.size))
    big = rng.random(ys.size) < 0.25
    sigma = 0.45 * p.puncta_size
    image = _render_points(fov.size, ys[~big], xs[~big], amp[~big], sigma)
    image += _render_points(fov.size, ys[big], xs[big], 0.8 * amp[big], 2.0 * sigma)
    return image + (0.1 + 0.2 * p.style[0]) * fov.cytoplasm


def _nucleoplasm(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    grain = 1 + 0.07 * _field(rng, fov.size, 1.5 * p.texture)
    return fov.nucleus * (1 - 0.88 * fov.nucleoli) * grain


def _nuclear_membrane(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # A thin lamina right at the boundary, slightly beaded.
    width = 0.6 + 0.4 * p.style[0]
    rim = np.exp(-(((fov.signed + 0.3) / _F32(width)) ** 2)) * fov.cell
    beads = 1 + 0.2 * _field(rng, fov.size, 1.5)
    return rim * beads + 0.03 * fov.nucleus


def _chromatin(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    del rng  # The Hoechst texture is the pattern: histones sit on the DNA.
    return fov.chromatin ** _F32(1.3 + 0.7 * p.style[0])


def _nucleolus_gc(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    grain = 0.85 + 0.15 * _field(rng, fov.size, 1.2)
    return fov.nucleoli * grain + (0.02 + 0.06 * p.style[0]) * fov.nucleus


def _membrane(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # Plasma membranes of neighbours, one line along each boundary, uneven
    # (ruffles), over some cytoplasm.
    width = 1.0 + 0.6 * p.style[0]
    line = np.exp(-((fov.edge / _F32(width)) ** 2))
    ruffles = np.clip(1 + 0.35 * _field(rng, fov.size, 4.0), 0.2, None)
    return line * ruffles + (0.1 + 0.3 * p.style[1]) * fov.cytoplasm


def _centrosome(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # One or two dots (the centriole pair) just beside each nucleus, with a faint
    # pericentriolar haze.
    n = fov.cells["n"]
    ys, xs, _ = _perinuclear_points(fov, rng, np.ones(n, int), 0.0, (1.5, 2.0))
    pair = rng.random(ys.size) < 0.7
    turn = rng.uniform(0, 2 * np.pi, int(pair.sum()))
    gap = rng.uniform(1.5, 2.8, turn.size)
    ys2, xs2 = ys[pair] + gap * np.sin(turn), xs[pair] + gap * np.cos(turn)
    ys_all = np.concatenate([ys, ys2])
    xs_all = np.concatenate([xs, xs2])
    amp = np.concatenate([np.ones(ys.size), rng.uniform(0.5, 1.0, ys2.size)])
    image = _render_points(fov.size, ys_all, xs_all, amp, 0.6)
    halo = _render_points(fov.size, ys, xs, np.full(ys.size, 0.12), 2.5)
    return image + halo


def _nuclear_punctae(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # Many small dots (e.g. telomeres, speckles) in the nucleoplasm.
    area = float(fov.nucleus.sum())
    count = int(area * 0.035 * p.puncta_density)
    ys, xs = _sample_in(rng, fov.nucleus & (fov.nucleoli < 0.3), count)
    amp = np.exp(0.7 * rng.normal(size=ys.size))
    image = _render_points(fov.size, ys, xs, amp, 0.2 * p.puncta_size)
    return image + 0.05 * fov.nucleus + 0.02 * fov.cytoplasm


def _cytoskeleton(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # Long, slightly curved fibres with one dominant direction per cell plus an
    # aster around the centrosome; fibres stop at their cell's boundary and are
    # dimmer over the nucleus (they run above and below it).
    cells = fov.cells
    n = cells["n"]
    cy, cx = _nucleus_centres(fov)
    n_lines = int(70 + 50 * p.style[0])
    direction = rng.uniform(0, np.pi, n)
    cell = np.repeat(np.arange(n), n_lines)
    m = cell.size
    radius = cells["spacing"] * 0.6 * np.sqrt(rng.random(m))
    turn = rng.uniform(0, 2 * np.pi, m)
    y0 = cy[cell] + radius * np.sin(turn)
    x0 = cx[cell] + radius * np.cos(turn)
    heading = direction[cell] + (0.3 + 0.4 * p.style[1]) * rng.normal(size=m)
    length = rng.uniform(25, 90, m)
    bend = 0.025 * rng.normal(size=m)
    # Asters: rays from a point beside the nucleus.
    n_rays = 10
    acell = np.repeat(np.arange(n), n_rays)
    aphi = rng.uniform(0, 2 * np.pi, n)[acell]
    areach = _nucleus_radius(fov, acell, aphi) + 3.0
    cell = np.concatenate([cell, acell])
    y0 = np.concatenate([y0, cy[acell] + areach * np.sin(aphi)])
    x0 = np.concatenate([x0, cx[acell] + areach * np.cos(aphi)])
    heading = np.concatenate([heading, rng.uniform(0, 2 * np.pi, acell.size)])
    length = np.concatenate([length, rng.uniform(12, 35, acell.size)])
    bend = np.concatenate([bend, 0.01 * rng.normal(size=acell.size)])
    # Lines run both ways from their start, sampled every ~length/80 px; the
    # amplitude scales with the step so every fibre is equally bright.
    t = np.linspace(-0.5, 0.5, 64)[None] * length[:, None]
    angle = heading[:, None] + bend[:, None] * t
    ys = (y0[:, None] + t * np.sin(angle)).ravel()
    xs = (x0[:, None] + t * np.cos(angle)).ravel()
    owner = np.repeat(cell, t.shape[1])
    amp = np.exp(0.5 * rng.normal(size=cell.size)) * (length / 64.0)
    amp = np.repeat(amp, t.shape[1])
    iy, ix = np.rint(ys).astype(np.intp), np.rint(xs).astype(np.intp)
    ok = (iy >= 0) & (iy < fov.size) & (ix >= 0) & (ix < fov.size)
    ys, xs, iy, ix, owner, amp = ys[ok], xs[ok], iy[ok], ix[ok], owner[ok], amp[ok]
    ok = fov.label[iy, ix] == owner
    amp = amp * np.where(fov.nucleus[iy, ix], 0.35, 1.0)
    # A 1 px step adds ~3 overlapping spots across a fibre's profile.
    image = _render_points(fov.size, ys[ok], xs[ok], 0.3 * amp[ok], 0.3)
    return image + (0.25 + 0.2 * p.style[2]) * fov.cytoplasm


def _nucleolus_fc_dfc(fov: _Fov, rng: np.random.Generator, p: _Protein) -> np.ndarray:
    # Clusters of tiny dots (fibrillar centres) inside each nucleolus.
    core = fov.nucleoli > 0.6
    count = int(core.sum() * 0.22 * p.puncta_density)
    ys, xs = _sample_in(rng, core, count)
    amp = np.exp(0.3 * rng.normal(size=ys.size))
    image = _render_points(fov.size, ys, xs, amp, 0.45)
    return image + 0.1 * fov.nucleoli + 0.02 * fov.nucleus


_PATTERN_FUNCTIONS = {
    "mitochondria": _mitochondria,
    "cytoplasmic": _cytoplasmic,
    "er": _er,
    "golgi": _golgi,
    "vesicles": _vesicles,
    "nucleoplasm": _nucleoplasm,
    "nuclear_membrane": _nuclear_membrane,
    "chromatin": _chromatin,
    "nucleolus_gc": _nucleolus_gc,
    "membrane": _membrane,
    "centrosome": _centrosome,
    "nuclear_punctae": _nuclear_punctae,
    "cytoskeleton": _cytoskeleton,
    "nucleolus_fc_dfc": _nucleolus_fc_dfc,
}
assert tuple(_PATTERN_FUNCTIONS) == PATTERNS


# Imaging -------------------------------------------------------------------------


def _image(
    rng: np.random.Generator,
    clean: np.ndarray,
    photons: float,
    background: float,
    saturated: float,
    style: SyntheticStyle,
) -> np.ndarray:
    """Optics and camera: PSF blur, shot and read noise, per-FOV scaling to [0, 1].

    `background` photons per pixel (out-of-focus light, camera offset) add shot
    noise; all but a small pedestal of their mean is subtracted, as in processed
    OpenCell images, so the background sits a little above 0 and dim proteins look
    noisy. Shot noise is the Gaussian approximation of Poisson (variance = mean),
    far faster than drawing Poisson variates and indistinguishable at these counts.
    The FOV is scaled so that a share `saturated` of its pixels reach 1 and are
    clipped there, like the contrast-stretched OpenCell images.
    """
    signal = ndimage.gaussian_filter(clean, style.psf_sigma, truncate=3.0)
    signal *= _F32(photons)
    noise = rng.standard_normal(signal.shape, dtype=_F32)
    noise *= np.sqrt(signal + _F32(background + style.read_noise**2))
    signal += noise
    signal += _F32(_PEDESTAL * background)
    # The quantile of every 3rd pixel is as good and three times cheaper.
    sample = signal.ravel()[::3].copy()
    rank = min(sample.size - 1, int(sample.size * (1 - saturated)))
    sample.partition(rank)
    scale = sample[rank]
    signal /= max(float(scale), 1e-6)
    np.clip(signal, 0, 1, out=signal)
    return signal


def _fov_size(n_crops: int, image_size: int, spacing: float) -> int:
    """A FOV side expected to hold about `n_crops` usable nuclei."""
    margin = max(image_size // 2, int(_NUCLEUS_SEMI_MAJOR * 1.4) + 3)
    side = math.sqrt(n_crops * spacing * spacing * math.sqrt(3) / 2)
    return 2 * margin + math.ceil(side / 4.0) * 4


def _render_fov(spec: SyntheticSpec, protein: _Protein, fov_index: int) -> np.ndarray:
    """The crops `[n, S, S, 4]` (float32) of one FOV of one protein."""
    rng = np.random.default_rng(
        np.random.SeedSequence([spec.seed, _FOV_STREAM, protein.index, fov_index])
    )
    n_crops = protein.crops[fov_index]
    crop = spec.image_size
    spacing = _CELL_SPACING * spec.style.cell_scale * rng.uniform(0.93, 1.07)
    size = _fov_size(n_crops, crop, spacing)
    while True:
        # The layout alone tells which nuclei can be cropped, so a FOV too small
        # for `n_crops` is enlarged before any pixel is drawn.
        cells = _layout(rng, size, spacing, spec.style.cell_scale)
        cy = np.rint(cells["sy"]).astype(np.intp)
        cx = np.rint(cells["sx"]).astype(np.intp)
        # Usable: the crop window and the whole nucleus lie inside the FOV.
        reach = np.maximum(crop // 2, np.ceil(cells["a"] * 1.3).astype(int) + 2)
        ok = (cy - reach >= 0) & (cx - reach >= 0)
        ok &= (cy - crop // 2 + crop <= size) & (cx - crop // 2 + crop <= size)
        ok &= (cy + reach < size) & (cx + reach < size)
        if ok.sum() >= n_crops:
            break
        size += 8
    fov = _build_fov(rng, cells, size, protein.texture)
    # Nuclei are centred on their seeds, so the centre pixel is always nucleus.
    ok[ok] &= fov.nucleus[cy[ok], cx[ok]]
    chosen = np.sort(rng.choice(np.flatnonzero(ok), n_crops, replace=False))

    protein_clean = np.zeros((size, size), _F32)
    for name, weight in protein.components:
        pattern = _PATTERN_FUNCTIONS[name](fov, rng, protein)
        if fov.mitotic_px is not None and name in _NUCLEAR_PATTERNS:
            # Nuclear proteins disperse through the cell in mitosis.
            pattern = np.where(fov.mitotic_px, _F32(0.08) * fov.cell, pattern)
        protein_clean += _F32(weight) * pattern
    soluble = fov.cytoplasm + _F32(protein.diffuse_nuclear) * fov.nucleus
    protein_clean += _F32(protein.diffuse) * soluble
    expression = np.exp(protein.expression_sigma * rng.normal(size=fov.cells["n"]))
    protein_clean *= expression.astype(_F32)[fov.owner]
    background = rng.uniform(2.0, 6.0)
    protein_image = _image(
        rng,
        protein_clean,
        protein.brightness,
        background,
        _SATURATED_PROTEIN,
        spec.style,
    )
    hoechst = _image(
        rng,
        fov.chromatin,
        rng.uniform(250, 600),
        background,
        _SATURATED_HOECHST,
        spec.style,
    )

    stack = np.stack([protein_image, hoechst, fov.distance, fov.nucleus], axis=-1)
    frames = np.empty((n_crops, crop, crop, 4), _F32)
    for k, i in enumerate(chosen):
        y0, x0 = cy[i] - crop // 2, cx[i] - crop // 2
        frames[k] = stack[y0 : y0 + crop, x0 : x0 + crop]
    return frames


# Public API ----------------------------------------------------------------------


def generate_protein(
    spec: SyntheticSpec, protein_index: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """All frames and label rows of one protein, identical to its release rows.

    Meant for small uses and tests: it holds the whole protein in memory, whereas
    `write_release` streams FOV by FOV.

    Args:
      spec: what to generate.
      protein_index: 0 .. spec.n_proteins - 1.

    Returns:
      frames `[n, S, S, 4]` float32 (protein, nucleus, nuclear distance, nuclear
      segmentation) and a table with the release's columns `LABEL_COLUMNS` (empty
      grades are "").
    """
    if not 0 <= protein_index < spec.n_proteins:
        raise IndexError(
            f"protein_index={protein_index} is outside 0..{spec.n_proteins - 1} "
            "(spec.n_proteins)"
        )
    protein = _plan(spec)[protein_index]
    frames = np.concatenate(
        [_render_fov(spec, protein, f) for f in range(spec.fovs_per_protein)]
    )
    return frames, _label_rows(spec, protein)


def write_release(
    out_dir: str | os.PathLike,
    spec: SyntheticSpec = SyntheticSpec(),
    *,
    progress: bool = False,
) -> list[pathlib.Path]:
    """Writes a synthetic release: `Image_dataNN.npy` and `Label_dataNN.csv`.

    Images are float32 `[n_i, S, S, 4]` with channels (protein, nucleus, nuclear
    distance, nuclear segmentation). Protein and nucleus are scaled per FOV to
    [0, 1], the brightest ~0.2% (protein) or ~5% (Hoechst) of a FOV's pixels
    saturating at 1; the nuclear distance is the signed Euclidean distance in px
    to the nucleus boundary (positive inside); the segmentation is 0 or 1. Each
    CSV has one row per frame with header
    `ensg,name,loc_grade1,loc_grade2,loc_grade3,protein_id,FOV_id`; empty grades
    are empty cells. Frames are ordered by protein, then FOV; a protein may
    straddle two blocks.

    Only one FOV of pixels is in memory at a time (plus the pages of the output
    memmap, which are handed back as they are written). Every file is written
    under a temporary name and renamed when complete, so an interrupted run leaves
    no partial file (but, over an earlier release, a mix of new and old blocks).
    Blocks of an earlier, larger release in `out_dir` (higher numbers than this one
    writes) are removed at the end, since a release is read as blocks 00, 01, …
    together.

    Args:
      out_dir: folder to write into (created if missing).
      spec: what to generate.
      progress: show a progress bar over frames.

    Returns:
      The written paths: Image_data00.npy, Label_data00.csv, Image_data01.npy, …
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proteins = _plan(spec)
    fovs = [(p, f) for p in proteins for f in range(spec.fovs_per_protein)]
    total = sum(sum(p.crops) for p in proteins)
    bounds = [total * b // spec.n_blocks for b in range(spec.n_blocks + 1)]
    labels = pd.concat([_label_rows(spec, p) for p in proteins], ignore_index=True)
    shape = (spec.image_size, spec.image_size, 4)

    written: list[pathlib.Path] = []
    fov_iter = iter(fovs)
    pending = np.empty((0, *shape), _F32)  # Crops of the current FOV not yet written.
    with tqdm(total=total, disable=not progress, unit="frame") as bar:
        for block in range(spec.n_blocks):
            start, stop = bounds[block], bounds[block + 1]
            image_path = out / f"Image_data{block:02d}.npy"
            label_path = out / f"Label_data{block:02d}.csv"
            tmp = image_path.with_name(image_path.name + ".tmp")
            try:
                array = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=_F32, shape=(stop - start, *shape)
                )
                filled, released = 0, 0
                while filled < stop - start:
                    if not len(pending):
                        protein, fov_index = next(fov_iter)
                        pending = _render_fov(spec, protein, fov_index)
                    take = min(len(pending), stop - start - filled)
                    array[filled : filled + take] = pending[:take]
                    pending = pending[take:]
                    filled += take
                    bar.update(take)
                    released = _release_pages(array, filled, released)
                array.flush()
                del array
                os.replace(tmp, image_path)
            finally:
                tmp.unlink(missing_ok=True)
            _write_csv(labels.iloc[start:stop], label_path)
            written += [image_path, label_path]
    _remove_stale_blocks(out, spec.n_blocks)
    return written


def write_sample_format(
    out_dir: str | os.PathLike,
    spec: SyntheticSpec = SyntheticSpec(),
) -> list[pathlib.Path]:
    """Writes cytoself's per-protein sample format, one protein at a time.

    For each protein: `<name>_pro.npy` and `<name>_nuc.npy` (`[n, S, S]` uint16,
    intensities x 65535, clipped to [0, 1] first), `<name>_nucdist.npy` (float32)
    and `<name>_label.npy`, an `[n, 3]` object array (ensg, name, main
    localization) saved with pickling, as cytoself ships it. The pixels are those
    of the release (`generate_protein`); the segmentation channel is not part of
    this format.

    Args:
      out_dir: folder to write into (created if missing).
      spec: what to generate (n_blocks is ignored).

    Returns:
      The written paths, four per protein in protein order.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for protein in _plan(spec):
        frames, _ = generate_protein(spec, protein.index)
        main = protein.grades[0].split(";")[0]
        label = np.empty((len(frames), 3), dtype=object)
        label[:, 0], label[:, 1], label[:, 2] = protein.ensg, protein.name, main
        for suffix, array in (
            ("_pro.npy", _as_uint16(frames[..., 0])),
            ("_nuc.npy", _as_uint16(frames[..., 1])),
            ("_nucdist.npy", np.ascontiguousarray(frames[..., 2])),
            ("_label.npy", label),
        ):
            path = out / f"{protein.name}{suffix}"
            tmp = path.with_name(path.name + ".tmp")
            try:
                with open(tmp, "wb") as file:
                    np.save(file, array, allow_pickle=array.dtype == object)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            written.append(path)
    return written


# Writing helpers -------------------------------------------------------------------


def _as_uint16(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0, 1) * 65535).astype(np.uint16)


def _write_csv(table: pd.DataFrame, path: pathlib.Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        table.to_csv(tmp, index=False, lineterminator="\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _release_pages(array: np.memmap, filled: int, released: int) -> int:
    """Drops written pages of `array` from this process' resident set (Linux).

    The pages stay in the page cache and reach the file as usual (MADV_DONTNEED on
    a shared file mapping discards no data); this only stops a multi-GB block from
    showing as resident memory. Returns the number of frames now released.
    """
    frame_bytes = array.itemsize * int(np.prod(array.shape[1:]))
    if (filled - released) * frame_bytes < _RELEASE_EVERY_BYTES:
        return released
    raw = getattr(array, "_mmap", None)
    if raw is None or not sys.platform.startswith("linux"):
        return filled
    # The mapping starts at a page boundary before the .npy header; release whole
    # pages up to the last complete one written.
    start_in_map = array.offset % mmap.ALLOCATIONGRANULARITY
    end = start_in_map + filled * frame_bytes
    end -= end % mmap.PAGESIZE
    if end > 0:
        raw.madvise(mmap.MADV_DONTNEED, 0, end)
    return filled


def _remove_stale_blocks(out: pathlib.Path, n_blocks: int) -> None:
    for path in out.iterdir():
        match = _IMAGE_RE.match(path.name) or _LABEL_RE.match(path.name)
        if match and int(match[1]) >= n_blocks:
            path.unlink()
