"""From a segmented field to release crops, and the field's QC picture.

`resample` brings a field to the target pixel size; `select_nuclei` picks the
nuclei that get a crop (one each, centred, wholly inside the field);
`cut_crops` stacks the release's four channels and cuts them; `qc_image` draws
the field, the nuclei and the crop boxes as an RGB array.
"""

import numpy as np
from skimage import draw, measure, segmentation, transform

from dlfb_localization.dataset.channels import (
    SATURATED_NUCLEUS,
    SATURATED_PROTEIN,
    nuclear_distance,
    scale_to_unit,
)

__all__ = ["cut_crops", "qc_image", "resample", "select_nuclei"]

_BACKGROUND_QUANTILE = 1.0  # Percent of a field's pixels taken as background.
_F32 = np.float32


def resample(image: np.ndarray, source_um: float, target_um: float) -> np.ndarray:
    """`image` at pixel size `target_um`, as float32 in the original units.

    Downsampling low-pass filters first (anti-aliasing), so a 2x smaller image is
    close to the mean of 2x2 blocks; interpolation is bilinear.
    """
    image = image.astype(_F32)
    if np.isclose(source_um, target_um):
        return image
    scaled = transform.rescale(
        image,
        source_um / target_um,
        order=1,
        anti_aliasing=source_um < target_um,
        preserve_range=True,
    )
    return scaled.astype(_F32)


def select_nuclei(labels: np.ndarray, crop_size: int) -> np.ndarray:
    """The nuclei that get a crop, with their crop centres.

    A nucleus is cropped when it does not touch the field's border and the
    `crop_size` window centred on its centroid lies inside the field. Each nucleus
    gets at most one crop.

    Args:
      labels: `[h, w]` nucleus labels from `segment_nuclei`.
      crop_size: side of a crop in px.

    Returns:
      `[n, 3]` int64 rows `(label, row, col)`: the nucleus and its crop centre, in
      label order.
    """
    height, width = labels.shape
    inner = segmentation.clear_border(labels)
    half = crop_size // 2
    rows = []
    for region in measure.regionprops(inner):
        row, col = (round(c) for c in region.centroid)
        top, left = row - half, col - half
        inside = top >= 0 and left >= 0
        inside &= top + crop_size <= height and left + crop_size <= width
        if inside:
            rows.append((region.label, row, col))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def cut_crops(
    nucleus: np.ndarray,
    protein: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
    crop_size: int,
) -> np.ndarray:
    """The release frames of one field: `[n, crop, crop, 4]` float32.

    Channels: protein and nucleus with the field's background (its 1st
    percentile) subtracted and scaled to [0, 1] as the synthetic release is
    (`channels.scale_to_unit`: 0.2% of protein, 5% of nucleus pixels at 1); the
    signed nuclear distance in px (positive inside); the nuclear segmentation
    (0/1). Distance and segmentation are computed on the whole field, so a crop's
    edge does not count as a nucleus boundary.

    Args:
      nucleus: `[h, w]` Hoechst intensities at the target pixel size.
      protein: `[h, w]` protein intensities at the target pixel size.
      labels: `[h, w]` nucleus labels.
      centres: `[n, 3]` rows `(label, row, col)` from `select_nuclei`.
      crop_size: side of a crop in px.
    """
    mask = labels > 0
    stack = np.stack(
        [
            _scaled(protein, SATURATED_PROTEIN),
            _scaled(nucleus, SATURATED_NUCLEUS),
            nuclear_distance(mask),
            mask.astype(_F32),
        ],
        axis=-1,
    )
    half = crop_size // 2
    frames = np.empty((len(centres), crop_size, crop_size, 4), _F32)
    for k, (_, row, col) in enumerate(centres):
        frames[k] = stack[
            row - half : row - half + crop_size, col - half : col - half + crop_size
        ]
    return frames


def _scaled(image: np.ndarray, saturated: float) -> np.ndarray:
    image = image.astype(_F32, copy=True)
    image -= _F32(np.percentile(image, _BACKGROUND_QUANTILE))
    return scale_to_unit(image, saturated)


def qc_image(
    nucleus: np.ndarray, labels: np.ndarray, centres: np.ndarray, crop_size: int
) -> np.ndarray:
    """A picture of one field to check the segmentation by eye: `[h, w, 3]` uint8.

    The nucleus channel in grey (square root of intensity, so dim and bright
    nuclei both show), cropped nuclei outlined in yellow, nuclei left uncropped
    (at the border or too close to it for a whole crop) in red, crop boxes in
    cyan.
    """
    signal = np.maximum(nucleus - np.percentile(nucleus, _BACKGROUND_QUANTILE), 0)
    grey = np.sqrt(signal / max(float(np.percentile(signal, 99.8)), 1e-6))
    rgb = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
    cropped = np.isin(labels, centres[:, 0]) & (labels > 0)
    outline = segmentation.find_boundaries(labels, mode="inner")
    rgb[outline & ~cropped] = (1.0, 0.2, 0.2)
    rgb[outline & cropped] = (1.0, 0.9, 0.1)
    half = crop_size // 2
    for _, row, col in centres:
        top, left = row - half, col - half
        rr, cc = draw.rectangle_perimeter(
            (top, left),
            end=(top + crop_size - 1, left + crop_size - 1),
            shape=labels.shape,
        )
        rgb[rr, cc] = (0.1, 0.9, 1.0)
    return np.rint(rgb * 255).astype(np.uint8)
