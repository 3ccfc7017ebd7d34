"""The protein patterns: one function per localization name in `PATTERNS`.

Each function takes a FOV (`_Fov`), a generator and the protein's traits and
returns a noise-free `[size, size]` float32 image, about 1 at the brightest
structures; `_PATTERN_FUNCTIONS` maps every name of `PATTERNS` to its function.
"""

import numpy as np

from dlfb_localization.dataset.synthetic.cells import (
    _Fov,
    _nucleus_centres,
    _nucleus_radius,
)
from dlfb_localization.dataset.synthetic.fields import (
    _field,
    _render_points,
    _sample_in,
)
from dlfb_localization.dataset.synthetic.spec import PATTERNS, _Protein

_F32 = np.float32


# Shared by the patterns that sit beside the nucleus ---------------------------------


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
