"""The rotations and flips of `dlfb_localization.orientation`, under their
former path. They live there, outside this package, so that `train` can import
its augmentation without this package's `__init__` (which imports `score`,
evaluation code) running."""

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
    "d4_apply",
    "d4_compose",
    "d4_inverse",
    "d4_orbit",
    "d4_transform",
    "random_orientation",
    "rotate",
]
