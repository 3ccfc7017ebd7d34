"""The field of view: cells, nuclei, nucleoli and the noise-free Hoechst image.

`_layout` places the cells of a FOV (seeds on a jittered, rotated hexagonal
lattice, nuclei fitted inside their cells, nucleoli, mitotic cells) without
drawing a pixel; `_build_fov` turns that layout into the per-pixel maps (`_Fov`)
that the nucleus channel and every protein pattern are drawn from.
"""

import math

import numpy as np

from dlfb_localization.dataset.channels import nuclear_distance
from dlfb_localization.dataset.synthetic.fields import _field, _grid

# Geometry, in pixels of a crop (~0.4 um/px, where a HEK293T nucleus is ~35 px).
_CELL_SPACING = 55.0  # Nucleus-to-nucleus distance of densely packed cells.
_NUCLEUS_SEMI_MAJOR = 19.8
_MEANDER_PX = 4.5  # How far cell boundaries wander off straight lines.
_MITOTIC_FRACTION = 0.04
_F32 = np.float32


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

    distance = nuclear_distance(nucleus)
    outside = np.maximum(-distance, _F32(0))  # EDT of the background, 0 inside.

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
