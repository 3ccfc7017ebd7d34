"""A synthetic OpenCell: deterministic, OpenCell-like crops in the release format.

The real OpenCell release that cytoself trains on is 42 GiB. This package draws a
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

The modules, by job:
  spec      what to generate (`SyntheticSpec`, `SyntheticStyle`, `SECOND_STYLE`)
            and the plan of labels, traits and crop counts drawn from it
  fields    smooth random fields, rendered points, sampling inside a mask
  cells     the cell layout of a FOV and its per-pixel maps (nuclei, nucleoli,
            chromatin)
  patterns  one function per localization pattern
  render    optics, camera and crops of a FOV; `generate_protein`
  writers   `write_release` and `write_sample_format`
"""

from dlfb_localization.dataset.formats import LABEL_COLUMNS
from dlfb_localization.dataset.synthetic.render import generate_protein
from dlfb_localization.dataset.synthetic.spec import (
    PATTERNS,
    SECOND_STYLE,
    SyntheticSpec,
    SyntheticStyle,
)
from dlfb_localization.dataset.synthetic.writers import (
    write_release,
    write_sample_format,
)

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
