"""Rendering: a protein's FOVs through the optics and camera into crops.

`_render_fov` lays out and builds one FOV, sums the protein's patterns, applies
the expression level of each cell, the PSF, shot and read noise and the per-FOV
scaling (`_image`), and cuts the crops centred on nuclei. `generate_protein`
returns all frames and label rows of one protein in memory.
"""

import math

import numpy as np
import pandas as pd
from scipy import ndimage

from dlfb_localization.dataset.channels import (
    SATURATED_NUCLEUS,
    SATURATED_PROTEIN,
    scale_to_unit,
)
from dlfb_localization.dataset.synthetic.cells import (
    _CELL_SPACING,
    _NUCLEUS_SEMI_MAJOR,
    _build_fov,
    _layout,
)
from dlfb_localization.dataset.synthetic.patterns import _PATTERN_FUNCTIONS
from dlfb_localization.dataset.synthetic.spec import (
    _FOV_STREAM,
    SyntheticSpec,
    SyntheticStyle,
    _label_rows,
    _plan,
    _Protein,
)

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
_PEDESTAL = 0.25  # Share of the background left after background subtraction.
_F32 = np.float32


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
    return scale_to_unit(signal, saturated)


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
        SATURATED_PROTEIN,
        spec.style,
    )
    hoechst = _image(
        rng,
        fov.chromatin,
        rng.uniform(250, 600),
        background,
        SATURATED_NUCLEUS,
        spec.style,
    )

    stack = np.stack([protein_image, hoechst, fov.distance, fov.nucleus], axis=-1)
    frames = np.empty((n_crops, crop, crop, 4), _F32)
    for k, i in enumerate(chosen):
        y0, x0 = cy[i] - crop // 2, cx[i] - crop // 2
        frames[k] = stack[y0 : y0 + crop, x0 : x0 + crop]
    return frames


# One protein in memory ---------------------------------------------------------


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
