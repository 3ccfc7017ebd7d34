"""Orientation invariance: cells have no preferred orientation.

- `transforms`: the 8 rotations and flips of D4, arbitrary rotations and the
  random orientations `train(..., augment=...)` gives training images (they
  live in `dlfb_localization.orientation`, outside this package, so that
  `train` imports them without `score`).
- `score`: how far embeddings move when a crop turns (`invariance_score`) and
  D4-averaged embeddings (`orbit_pooled_embeddings`).
- `align`: the rotation and flip between image pairs (Reddy & Chatterji).

`LocalizationModel(encoder_type="d4")` (`model.group_conv.InvariantEncoder`)
makes the codes equivariant by construction.
"""

from dlfb_localization.invariance.align import Alignment, align
from dlfb_localization.invariance.score import (
    DEFAULT_ANGLES,
    invariance_score,
    orbit_pooled_embeddings,
)
from dlfb_localization.orientation import (
    AUGMENT_MODES,
    D4_ORDER,
    d4_apply,
    d4_compose,
    d4_inverse,
    d4_orbit,
    d4_transform,
    random_orientation,
    rotate,
)

__all__ = [
    "AUGMENT_MODES",
    "D4_ORDER",
    "DEFAULT_ANGLES",
    "Alignment",
    "align",
    "d4_apply",
    "d4_compose",
    "d4_inverse",
    "d4_orbit",
    "d4_transform",
    "invariance_score",
    "orbit_pooled_embeddings",
    "random_orientation",
    "rotate",
]
