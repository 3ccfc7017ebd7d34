"""The release's derived channels and intensity scaling, shared by every writer.

The synthetic generator (`synthetic`) and the raw-image path (`raw`) both write
the release's four channels; computing the nuclear distance and the per-field
scaling here keeps the two identical in meaning.
"""

import numpy as np
from scipy import ndimage

# Share of a field's pixels that saturate at 1 (OpenCell images are
# contrast-stretched): few for the protein, more for the bright Hoechst stain.
SATURATED_PROTEIN = 0.002
SATURATED_NUCLEUS = 0.05


def nuclear_distance(nucleus: np.ndarray) -> np.ndarray:
    """The release's channel 2: signed Euclidean distance to the nucleus boundary.

    Args:
      nucleus: `[h, w]` bool, the nuclear segmentation of a whole field.

    Returns:
      `[h, w]` float32, in pixels: positive inside nuclei (distance to the nearest
      background pixel), negative outside (minus the distance to the nearest
      nucleus pixel).
    """
    nucleus = np.asarray(nucleus, dtype=bool)
    distance = ndimage.distance_transform_edt(nucleus).astype(np.float32)
    distance -= ndimage.distance_transform_edt(~nucleus).astype(np.float32)
    return distance


def scale_to_unit(image: np.ndarray, saturated: float) -> np.ndarray:
    """Scales a field in place to [0, 1], a share `saturated` of pixels at 1.

    The field is divided by its `1 - saturated` quantile (estimated on every 3rd
    pixel, as good and three times cheaper) and clipped to [0, 1].

    Args:
      image: `[h, w]` float32, background already subtracted; changed in place.
      saturated: share of pixels that end at 1, e.g. `SATURATED_PROTEIN`.

    Returns:
      `image`, scaled.
    """
    sample = image.ravel()[::3].copy()
    rank = min(sample.size - 1, int(sample.size * (1 - saturated)))
    sample.partition(rank)
    image /= max(float(sample[rank]), 1e-6)
    np.clip(image, 0, 1, out=image)
    return image
